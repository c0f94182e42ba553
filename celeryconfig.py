"""Celery settings for kmsq workers and callers (JSON only, late acks, one message in flight per child)."""

from __future__ import annotations

import os

broker_url = os.environ.get("KMSQ_BROKER_URL", "redis://127.0.0.1:6379/0")
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
worker_cancel_long_running_tasks_on_connection_loss = True
# A message not acknowledged within this many seconds is redelivered to another worker; it must exceed the
# longest task (an RSA-4096 root key creation takes a few seconds on SoftHSM2).
broker_transport_options = {"visibility_timeout": 300}
task_default_queue = "kms.default"

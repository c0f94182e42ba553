"""Celery settings for kmsq workers and callers (JSON only, late acks, one message in flight per child).

The broker URL is not set here: ``tasks.app.make_app`` takes it from ``KMSQ_BROKER_URL`` or, by default,
the embedded Redis socket under ``KMSQ_HOME``. Replies do not use a Celery result backend: the worker
publishes each signed reply to the reply queue named in the request.
"""

from __future__ import annotations

task_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]
result_backend = None
task_ignore_result = True
# A message is acknowledged only after its task returned: a worker killed mid-task leaves it unacked, and
# reject_on_worker_lost puts it back at once so that another child runs it (the requests table makes the
# second run re-send the first run's reply when that one committed).
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
worker_cancel_long_running_tasks_on_connection_loss = True
# Redis redelivers a message that stayed unacknowledged this many seconds (a worker host lost with its
# messages). It must exceed the longest task: RSA-4096 root key creation takes seconds, requests far less.
# Requests expire after 10 minutes by default (schemas.wire.DEFAULT_REQUEST_TTL_SECONDS), longer than this,
# so a redelivered request is still fresh.
broker_transport_options = {"visibility_timeout": 300}
# The worker's own hard limit per task (messages' own time limits are ignored: tasks.worker.SignedOnlyRequest),
# below the visibility timeout so that a stuck task is ended before Redis hands its message out again. No
# request comes near it: messages are bounded in size (schemas.limits) and in PBKDF2 work.
task_time_limit = 240
# Messages a worker cannot use are dropped with a line that quotes none of their content.
worker_consumer = "tasks.worker:QuietConsumer"
broker_connection_retry_on_startup = True
task_default_queue = "kms.default"
worker_send_task_events = False
task_send_sent_event = False

"""A Celery app for Celery's own tools, which find an app by import path: ``celery -A tasks.monitor:app flower``
(or ``inspect``, ``events``) on a deployment's broker and namespace, from the settings (``KMSQ_*``, ``kmsq.toml``)
when this module is imported. kmsq itself never imports it: its entry points build their apps from the settings
they are given (``tasks.worker.PoolWorker``, ``tasks.client.KmsClient``)."""

from __future__ import annotations

from tasks.app import make_app
from worker.config import load_settings

_settings = load_settings()
app = make_app(_settings.effective_broker_url, name="kmsq-monitor", namespace=_settings.namespace)

"""The Celery application factory (settings from ``celeryconfig``)."""

from __future__ import annotations

from celery import Celery

import celeryconfig


def make_app(broker_url: str, name: str = "kmsq") -> Celery:
    """Returns a Celery app on ``broker_url`` with kmsq's settings; it is not made the current app."""
    app = Celery(name, set_as_current=False)
    app.config_from_object(celeryconfig)
    app.conf.broker_url = broker_url
    return app

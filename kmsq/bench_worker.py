"""``python -m kmsq.bench_worker``: the benchmark's worker, which is ``kmsq worker`` plus one task, ``kmsq.noop``.

B (``kmsq bench``) measures a Celery round trip with no work at all: the same broker, queue, worker settings
and reply path as a request, through a task that only publishes a bare reply. The task exists only in this
entry point, which the benchmark starts; ``kmsq worker`` has no such task and no switch that adds one.
"""

from __future__ import annotations

import argparse
from typing import Any

from schemas.wire import REPLY_QUEUE_PREFIX

NOOP_TASK = "kmsq.noop"


def add_noop(pool_worker: Any) -> None:
    """Registers ``kmsq.noop`` on a :class:`tasks.worker.PoolWorker`: its reply is ``{"noop": <task id>}`` on
    the message's reply queue, when that is a kmsq reply queue."""
    from celery import Task

    from worker.pipeline import Delivery

    @pool_worker.app.task(name=NOOP_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
    def noop(self: Task, *args: Any) -> None:
        reply_to = self.request.reply_to
        if isinstance(reply_to, str) and reply_to.startswith(REPLY_QUEUE_PREFIX):
            pool_worker.publish(Delivery(reply_to, {"noop": str(self.request.id)}, str(self.request.id), None))


def main(argv: list[str] | None = None) -> None:
    """Runs the benchmark's worker (``--pool``, ``--concurrency``, ``--loglevel``) until it is stopped."""
    from kmsq.commands.worker import run_worker

    parser = argparse.ArgumentParser(prog="python -m kmsq.bench_worker", description=__doc__)
    parser.add_argument("--pool", required=True)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--loglevel", default="warning")
    options = parser.parse_args(argv)
    run_worker(options.pool, options.concurrency, options.loglevel, extend=add_noop)


if __name__ == "__main__":
    main()

"""A background job a worker process runs every so often (replication, the schedule)."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Periodic(threading.Thread, Generic[T]):
    """Calls ``run_once`` every ``interval`` seconds (with jitter, so that a fleet's workers spread out) until
    :meth:`stop`, and ``report`` with each result. A failed run is logged on ``log`` and tried again at the next
    interval: the thread never dies."""

    def __init__(
        self, name: str, run_once: Callable[[], T], interval: float, log: logging.Logger, what: str,
        report: Callable[[T], None] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(name=name, daemon=True)
        self._run_once, self._interval, self._log, self._what, self._report = run_once, interval, log, what, report
        self._stopped = threading.Event()
        self.runs = 0

    def run(self) -> None:
        while not self._stopped.wait(self._interval * random.uniform(0.5, 1.5)):  # noqa: S311 - jitter only
            try:
                done = self._run_once()
            except Exception as e:  # never let the thread die: the next run tries again
                self._log.warning("%s failed (%s)", self._what, getattr(e, "message", type(e).__name__))
                continue
            self.runs += 1
            if self._report is not None:
                self._report(done)

    def stop(self) -> None:
        """Stops after the current run."""
        self._stopped.set()

"""How a client backs off a pool whose quota refused it (docs/OPERATIONS.md, "Sharing a pool").

After a ``rate_limited`` reply the client sends nothing to that pool for the wait the reply named: its requests are
refused at once, in the client, with the wait left. Then it is careful for ``CAREFUL_SECONDS``: one request at a time
tries the quota, each the last refusal's wait after the one before was answered (the others are refused in the
client), so that the concurrent requests of a caller over its quota do not all reach the workers when the wait
ends, only to be refused there but one. A careful period that passes without a refusal ends it. Thread-safe.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

CAREFUL_SECONDS = 1.0  # a quota's bucket holds one second of its rate (worker.quotas.BURST_SECONDS)
MAX_WAIT_SECONDS = 60.0  # the longest a rate_limited reply keeps a client from sending to its pool


@dataclass
class _Pool:
    quiet_until: float  # monotonic: nothing is sent before
    careful_until: float  # monotonic: one request at a time before
    wait: float  # the last refusal's wait (the wait a request refused in the client is told meanwhile)
    trying: bool = False  # one request is out, trying the quota


class Backoff:
    """The pools a client is backing off, by name."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._pools: dict[str, _Pool] = {}

    def refused(self, pool: str, retry_after: float | None) -> None:
        """Notes a ``rate_limited`` reply from ``pool`` that named ``retry_after`` seconds."""
        wait = min(retry_after or 1.0, MAX_WAIT_SECONDS)
        now = self._clock()
        with self._lock:
            state = self._pools.get(pool)
            quiet = max(now + wait, state.quiet_until if state else 0.0)
            trying = state.trying if state else False
            self._pools[pool] = _Pool(quiet, quiet + CAREFUL_SECONDS, wait, trying)

    def admit(self, pool: str) -> tuple[float | None, bool]:
        """Whether a request to ``pool`` may go: returns the seconds it should wait instead (None: it may go), and
        whether it goes as the one that tries the quota (then call :meth:`tried` when it is answered)."""
        now = self._clock()
        with self._lock:
            state = self._pools.get(pool)
            if state is None:
                return None, False
            if now < state.quiet_until:
                return state.quiet_until - now, False
            if now >= state.careful_until:
                del self._pools[pool]
                return None, False
            if state.trying:
                return state.wait, False
            state.trying = True
            return None, True

    def tried(self, pool: str) -> None:
        """The request that tried ``pool``'s quota was answered (a refusal was noted first, by :meth:`refused`).
        The next one tries after the last refusal's wait: while careful, the client sends at about the rate the
        quota refills, rather than finding the bucket empty every other time."""
        now = self._clock()
        with self._lock:
            state = self._pools.get(pool)
            if state is not None:
                state.trying = False
                state.quiet_until = max(state.quiet_until, min(now + state.wait, state.careful_until))

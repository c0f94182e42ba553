"""A per-process, time-limited cache of rarely changing rows (callers, root keys) for worker processes.

Each worker process's :class:`worker.policy.TrustedRows` has one (``KMSQ_CACHE_SECONDS``, default 2), so that a
request does not spend three queries on rows that change a few times a year. The price: disabling a caller or a
root key, or rotating one, reaches running workers within that many seconds. Cached values are detached copies,
never objects of a session. With a ``ttl`` of 0 (operator commands, most tests) nothing is kept.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from sqlalchemy import inspect

T = TypeVar("T")


def detached_copy(row: T) -> T:
    """Returns a transient copy of a mapped row with its column values (no session, no relationships)."""
    mapper = inspect(type(row))
    values = {attr.key: getattr(row, attr.key) for attr in mapper.column_attrs}
    return type(row)(**values)


class TtlCache:
    """Maps keys to values loaded at most once per ``ttl`` seconds, at most ``max_entries`` of them (misses
    are cached too, and anyone can name an unknown caller). Thread-safe."""

    def __init__(self, ttl: float = 0.0, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._data: dict[Hashable, tuple[float, Any]] = {}

    def get(self, key: Hashable, load: Callable[[], T]) -> T:
        """Returns the cached value of ``key``, or ``load()`` (cached when caching is on)."""
        if self.ttl <= 0:
            return load()
        now = time.monotonic()
        with self._lock:
            hit = self._data.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]  # type: ignore[no-any-return]
        value = load()
        with self._lock:
            if len(self._data) >= self.max_entries and key not in self._data:
                self._evict(now)
            self._data[key] = (now + self.ttl, value)
        return value

    def _evict(self, now: float) -> None:
        """Drops the expired entries, and if none were, the oldest tenth (insertion order)."""
        expired = [k for k, (until, _) in self._data.items() if until <= now]
        for k in expired or list(self._data)[: max(1, self.max_entries // 10)]:
            del self._data[k]

    def forget(self, key: Hashable) -> None:
        """Drops ``key``: the next :meth:`get` loads it."""
        with self._lock:
            self._data.pop(key, None)

    def clear(self) -> None:
        """Forgets everything."""
        with self._lock:
            self._data.clear()

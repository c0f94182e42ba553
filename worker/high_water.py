"""A worker host's memory of the newest approval it honoured per policy row (dual control, docs/DUAL_CONTROL.md):
against someone holding the token's PIN and the database who puts back an older row that the operators did
approve once (a caller before its disabling, say), with its MAC, and moves the policy anchor to it. The anchor
cannot refuse that row (the PIN moves it), the row's evidence verifies; but the row's sequence number and its
approval time are both older than what this host honoured, and it is refused.

A row is refused only when both are older: a quorum that approves the rows again (after a database restored
from a backup, say) gives them a newer approval time, and an operator whose clock is behind still makes a higher
sequence number. The marks are kept per deployment in a file of the host (``$KMSQ_HOME/state/``), merged under a
lock by the processes that share it, so that a restarted worker remembers them.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from datetime import datetime
from pathlib import Path

log = logging.getLogger("kmsq.policy")
Mark = tuple[int, float]  # (sequence number, approval time as a POSIX timestamp)


class HighWater:
    """The newest (sequence number, approval time) honoured per row, in memory and, with ``path``, in that file.
    Thread-safe."""

    def __init__(self, path: Path | None = None) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._marks: dict[str, Mark] = self._read() if path is not None else {}

    def admits(self, scope: str | None, row: str, seq: int, approved_at: datetime | None) -> bool:
        """False when ``row`` of deployment ``scope`` is older, in sequence and in approval time, than what was
        honoured before; else True, and the mark moves up to it (written to the file when it did)."""
        key = f"{scope or '-'}/{row}"
        moment = approved_at.timestamp() if approved_at is not None else 0.0
        with self._lock:
            mark = self._marks.get(key)
            if mark is not None and seq < mark[0] and moment < mark[1]:
                return False
            new = (max(seq, mark[0]), max(moment, mark[1])) if mark is not None else (seq, moment)
            if new != mark:
                self._marks[key] = new
                self._write(key, new)
        return True

    def mark(self, scope: str | None, row: str) -> Mark | None:
        """The mark of ``row``, or None."""
        with self._lock:
            return self._marks.get(f"{scope or '-'}/{row}")

    def _read(self) -> dict[str, Mark]:
        assert self._path is not None
        try:
            data = json.loads(self._path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:  # a damaged file forgets nothing the anchor does not guard
            log.error("cannot read the policy high-water marks %s (%s): starting from none", self._path,
                      type(e).__name__)  # fmt: skip
            return {}
        return {str(k): (int(v[0]), float(v[1])) for k, v in data.items() if isinstance(v, list) and len(v) == 2}

    def _write(self, key: str, new: Mark) -> None:
        """Merges this process's marks (``key`` moved to ``new``) into the file, under an exclusive lock (other
        processes of the host write it too)."""
        if self._path is None:
            return
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            with open(self._path.with_name(self._path.name + ".lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                merged = self._read()
                for name, mark in list(self._marks.items()):  # (``key`` is there already, at ``new``)
                    old = merged.get(name)
                    merged[name] = mark if old is None else (max(old[0], mark[0]), max(old[1], mark[1]))
                self._marks.update(merged)
                temporary = self._path.with_name(self._path.name + f".{os.getpid()}.tmp")
                temporary.write_text(json.dumps({k: list(v) for k, v in merged.items()}), encoding="utf-8")
                os.replace(temporary, self._path)
        except OSError as e:  # kept in memory: this process still refuses; logged so that the host is fixed
            log.error("cannot write the policy high-water marks %s (%s)", self._path, type(e).__name__)

"""worker.high_water: a row older in both its sequence number and its approval time than one honoured before is
refused; the marks survive a restart and are merged between the processes of a host."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from worker.high_water import HighWater

T0 = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def test_an_older_copy_is_refused_a_newer_approval_is_not(tmp_path: Path) -> None:
    marks = HighWater(tmp_path / "hw.json")
    assert marks.admits("dep", "caller:alice", 1, T0)
    assert marks.admits("dep", "caller:alice", 2, T0 + timedelta(hours=1))  # disabled, say
    assert not marks.admits("dep", "caller:alice", 1, T0)  # the enabled row put back
    assert marks.admits("dep", "caller:alice", 2, T0 + timedelta(hours=1))  # the same again
    assert marks.admits("other", "caller:alice", 1, T0)  # another deployment's row of the same name
    # An operator whose clock is behind still makes a higher sequence number; a quorum's re-approval after a
    # restored database makes a newer approval time: neither is refused.
    assert marks.admits("dep", "caller:alice", 3, T0)
    assert marks.admits("dep", "caller:alice", 1, T0 + timedelta(days=1))
    assert marks.mark("dep", "caller:alice") == (3, (T0 + timedelta(days=1)).timestamp())


def test_the_marks_survive_a_restart_and_merge_between_processes(tmp_path: Path) -> None:
    path = tmp_path / "state" / "hw.json"
    first, second = HighWater(path), HighWater(path)  # two processes of the host
    assert first.admits("dep", "caller:a", 5, T0)
    assert second.admits("dep", "pool:p", 2, T0)
    restarted = HighWater(path)
    assert not restarted.admits("dep", "caller:a", 4, T0 - timedelta(seconds=1))
    assert not restarted.admits("dep", "pool:p", 1, T0 - timedelta(seconds=1))
    assert set(json.loads(path.read_text())) == {"dep/caller:a", "dep/pool:p"}
    path.write_text("{not json")
    assert HighWater(path).admits("dep", "caller:a", 1, T0)  # a damaged file is logged and forgets its marks

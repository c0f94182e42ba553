"""kmsq.procfs reads /proc as the bench, the chaos run and the queue tests need it."""

from __future__ import annotations

import os
import subprocess
import uuid

from kmsq.procfs import alive, children_of, cpu_seconds, processes_named


def test_a_child_is_found_by_parent_and_by_name_until_it_is_gone() -> None:
    marker = f"{uuid.uuid4().int % 10**6 + 10**6}"  # a sleep no other process has
    child = subprocess.Popen(["sleep", marker])
    try:
        assert child.pid in children_of(os.getpid())
        assert processes_named("sleep", marker) == [child.pid]
        assert processes_named("sleep", marker + "0") == []
        assert alive(child.pid)
    finally:
        child.kill()
        child.wait()
    assert child.pid not in children_of(os.getpid())
    assert not alive(child.pid) and cpu_seconds(child.pid) == 0.0


def test_cpu_seconds_grow_with_work() -> None:
    before = cpu_seconds(os.getpid())
    sum(i * i for i in range(3_000_000))
    assert cpu_seconds(os.getpid()) > before

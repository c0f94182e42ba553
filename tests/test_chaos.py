"""`kmsq chaos --schedule short` (every fault once) against its own private deployment: real redis-server,
Postgres cluster, SoftHSM2 behind the fault-injecting module, and worker processes. Nothing may be lost or
done twice, and every check of the checker must hold."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from kmsq.chaos.faults import schedule_of
from tests.queue_fixtures import kmsq_command

pytestmark = [pytest.mark.hsm, pytest.mark.db, pytest.mark.queue]


def test_a_short_chaos_run_loses_nothing(tmp_path: Path) -> None:
    work = tmp_path / "chaos"
    result = subprocess.run(
        [*kmsq_command(), "chaos", "--keys", "1000", "--schedule", "short", "--work-dir", str(work), "--json"],
        capture_output=True, text=True, timeout=1200, check=False,
    )  # fmt: skip
    assert result.stdout, result.stderr[-3000:]
    report = json.loads(result.stdout)
    failed = [c for c in report["checks"] if not c["ok"]]
    assert not failed and result.returncode == 0, (failed, result.stderr[-3000:])
    assert report["requests"]["lost"] == 0 and report["requests"]["duplicated_effects"] == 0
    assert report["requests"]["sent"] > 500 and report["job"]["keys"] == 1000
    assert report["standby"] == "sync" and report["database_failovers"] == 1  # kmsq chaos's default
    assert [f["fault"] for f in report["faults"]] == list(schedule_of("sync"))
    assert all(f["recovery_s"] is not None for f in report["faults"])  # service came back after every fault
    assert json.loads((work / "report.json").read_text())["ok"] is True
    assert len((work / "history.jsonl").read_text().splitlines()) == report["requests"]["sent"]

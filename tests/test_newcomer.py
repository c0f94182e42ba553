"""A newcomer's path, run as commands: `kmsq init`, `kmsq demo`, then a first call of their own. Each error on
the way says what to run next, and following it works; `scripts/run.sh --json` prints one JSON document."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_kmsq, softhsm_library


@pytest.mark.hsm
def test_init_writes_the_fleet_file(tmp_path: Path) -> None:
    softhsm_library()
    first = run_kmsq(tmp_path, "init", "--json")
    assert first.returncode == 0, first.stderr
    path = tmp_path / "fleet.json"
    assert json.loads(first.stdout)["fleet_file"] == {"path": str(path), "written": True}
    exported = run_kmsq(tmp_path, "fleet-key", "export")
    assert exported.returncode == 0, exported.stderr
    assert path.read_text() == exported.stdout  # what `kmsq fleet-key export --out` writes
    mtime = path.stat().st_mtime_ns
    again = run_kmsq(tmp_path, "init", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["fleet_file"] == {"path": str(path), "written": False}
    assert path.stat().st_mtime_ns == mtime  # idempotent: an unchanged file is left alone
    created = run_kmsq(tmp_path, "root-key", "create", "--pool", "eu-1", "--json")
    assert created.returncode == 0, created.stderr
    assert json.loads(run_kmsq(tmp_path, "init", "--json").stdout)["fleet_file"]["written"] is True
    assert sorted(json.loads(path.read_text())["pools"]) == ["default", "eu-1"]
    assert "fleet file" in run_kmsq(tmp_path, "init").stdout

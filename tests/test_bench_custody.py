"""``python -m kmsq.bench_custody`` at a tiny size: every figure is produced, from a restore that put back every key
(the run raises otherwise), and the figures are figures (the real run's are in docs/PERFORMANCE.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.process


def test_the_custody_benchmark_produces_every_figure(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kmsq.bench_custody", "--root-keys", "4", "--stored", "10,100", "--repeat", "1",
         "--work-dir", str(tmp_path / "work"), "--json"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    k1, k2 = report["K1_replication"], report["K2_backup_restore"]
    assert k1["keys"] == k2["keys"] == 5  # 4 root keys and the policy key
    assert k1["export_per_s"] > 0 and k1["import_per_s"] > 0 and k1["baseline_data_keys_per_s"] > 0
    assert set(k2["restore_median_seconds"]) == {"10", "100"} and k2["restore_ratio_largest_over_smallest"] > 0

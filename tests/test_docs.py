"""What docs/COMMANDS.md shows operators to copy works: the systemd unit for workers parses cleanly."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

COMMANDS = Path(__file__).resolve().parent.parent / "docs" / "COMMANDS.md"


def test_the_worker_systemd_unit_parses(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    found = re.search(r"```ini\n(# /etc/systemd/system/kmsq-worker@\.service\n.*?)```", COMMANDS.read_text(), re.S)
    assert found, "docs/COMMANDS.md lost its systemd unit"
    unit = found.group(1)
    # Only what cannot exist on a test machine changes: the install path, the user, the environment file.
    unit = unit.replace("/opt/kmsq/.venv/bin/kmsq", str(Path(sys.executable).with_name("kmsq")))
    unit = unit.replace("User=kmsq", "User=root").replace("Group=kmsq", "Group=root")
    unit = unit.replace("EnvironmentFile=/etc/kmsq/kmsq.env", "EnvironmentFile=-/etc/kmsq/kmsq.env")
    path = tmp_path / "kmsq-worker@default.service"
    path.write_text(unit)
    result = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr

"""`kmsq chaos --broker rabbitmq --schedule broker`: the workload against a private three-node RabbitMQ cluster
(quorum queues, confirmed publishes) while a node other than the pool queue's leader, then the leader, is killed
-9 and restarted, and the queue is flooded with messages that are not kmsq's. Nothing may be lost or done twice,
and no request the broker accepted may need its caller to send it again (RELIABILITY.md, "RabbitMQ")."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from kmsq.chaos.faults import schedule_of
from tests.conftest import missing_service
from tests.queue_fixtures import kmsq_command

pytestmark = [pytest.mark.hsm, pytest.mark.db, pytest.mark.queue]


def test_a_rabbitmq_node_lost_under_load_loses_nothing_and_needs_no_resend(tmp_path: Path) -> None:
    if not (shutil.which("rabbitmq-server") or Path("/usr/sbin/rabbitmq-server").exists()):
        missing_service("rabbitmq-server")
    work = tmp_path / "chaos"
    result = subprocess.run(
        [*kmsq_command(), "chaos", "--broker", "rabbitmq", "--schedule", "broker", "--standby", "none", "--keys",
         "1000", "--work-dir", str(work), "--json"],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert result.stdout, result.stderr[-3000:]
    report = json.loads(result.stdout)
    failed = [c for c in report["checks"] if not c["ok"]]
    assert not failed and result.returncode == 0, (failed, result.stderr[-3000:])
    assert report["broker"] == "rabbitmq" and report["requests"]["lost"] == 0
    assert report["requests"]["duplicated_effects"] == 0 and report["requests"]["resent"] == 0
    assert any(c["check"] == "no accepted request needed a resend" and c["ok"] for c in report["checks"])
    assert [f["fault"] for f in report["faults"]] == list(schedule_of("none", "rabbitmq", broker_only=True))
    assert all(f["recovery_s"] is not None for f in report["faults"])
    assert report["requests"]["sent"] > 200

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


@pytest.mark.unit
def test_a_resend_is_reported_with_its_operation_its_times_and_the_fault_it_met() -> None:
    """A resend on RabbitMQ fails the check and says which request, when, and during which fault: the next failure
    tells its own story (one in a fresh-clone CI run of 2026-12-05 said only "1 requests resent")."""
    from types import SimpleNamespace

    from kmsq.chaos.faults import FaultRecord
    from kmsq.chaos.run import _rabbitmq_checks
    from kmsq.chaos.workload import Record

    slow = Record("alice", "decrypt_data_key", "rid-1", 100.0, done=113.0, outcome="ok", resent=1, resent_at=[110.0])
    history = SimpleNamespace(records=[slow, Record("bob", "get_key", "rid-2", 101.0, done=101.2, outcome="ok")])
    faults = [FaultRecord("broker flood of invalid messages", 95.0, 104.0), FaultRecord("later", 200.0, 210.0)]
    (check,) = _rabbitmq_checks("rabbitmq", {"resent": 1}, SimpleNamespace(runs=[1]), history, faults)
    assert not check.ok
    assert check.detail.endswith("decrypt_data_key rid-1 sent at 100.0, resent 10.0 s after, answered 13.0 s after, "
                                 "during ['broker flood of invalid messages']")  # fmt: skip
    assert _rabbitmq_checks("redis", {"resent": 1}, SimpleNamespace(runs=[1]), history, faults) == []

"""The run behind ``kmsq chaos`` (kmsq.commands.chaos): what is lost under faults? A workload runs against
a private deployment while faults are injected on a schedule; every request is recorded; a checker then says
what was lost or done twice.

The schedule ``short`` injects every fault once (for CI), ``long`` twice. The run ends when the schedule and
the provisioning job are done; the report (``report.json`` and the history in the work directory) lists
requests sent, answered, retried, lost and duplicated effects, each fault's recovery time and the throughput
during and after it, and every check.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

CALLERS = ("alice", "bob", "carol")
# rounds of every fault, seconds between faults; "broker": the broker's faults alone, once (CI's RabbitMQ run)
SCHEDULES = {"short": (1, 2.0), "long": (2, 15.0), "broker": (1, 2.0)}


def _register(deployment: Any, names: tuple[str, ...]) -> None:
    callers = deployment.home / "callers"
    ops = "generate_data_key,generate_data_key_without_plaintext,decrypt_data_key,put_key,get_key"
    for name in names:
        deployment.kmsq("caller", "keygen", name, "--dir", str(callers))
        deployment.kmsq("caller", "add", name, "--public-key", str(callers / f"{name}.pub.json"), "--allow", ops,
                        "--all-root-keys", "--plaintext")  # fmt: skip
    deployment.kmsq("fleet-key", "export", "--out", str(deployment.home / "fleet.json"))


def _rabbitmq_checks(broker: str, figures: dict[str, Any], job: Any, history: Any, injected: list[Any]) -> list[Any]:
    """With RabbitMQ (confirmed publishes to quorum queues) no request may need its caller to send it again. The
    detail names each resent request: its operation, when it was sent and resent, when it was answered, and the
    fault that was under way."""
    from kmsq.chaos.checker import Check
    from kmsq.chaos.workload import ATTEMPT_SECONDS

    if broker != "rabbitmq":
        return []
    resent = figures["resent"]
    detail = f"{resent} requests resent after no reply in {ATTEMPT_SECONDS:.0f} s; the job ran {len(job.runs)} times"
    for record in [r for r in history.records if r.resent][:5]:
        detail += f"; {_resend_story(record, injected)}"
    return [Check("no accepted request needed a resend", resent == 0 and len(job.runs) == 1, detail)]


def _resend_story(record: Any, injected: list[Any]) -> str:
    """One resent request in a line: its operation and times (s, wall clock), and the fault it met, if any."""
    until = record.resent_at[0] if record.resent_at else record.sent
    during = [f.name for f in injected if f.injected_at <= until and (f.healed_at or until) >= record.sent]
    answered = "never" if record.done is None else f"{record.done - record.sent:.1f} s after"
    resends = ", ".join(f"{t - record.sent:.1f}" for t in record.resent_at)
    return (f"{record.op} {record.request_id} sent at {record.sent:.1f}, resent {resends} s after, answered "
            f"{answered}, during {during or 'no fault'}")  # fmt: skip


def run(keys: int, schedule: str, work: Path, log: Any, standby: str = "sync", broker: str = "redis") -> dict[str, Any]:
    """Runs the whole thing (the database with a ``standby``: sync, async or none; the ``broker``: redis, or a
    three-node rabbitmq cluster) and returns the report. Raises ChaosError when the deployment cannot start."""
    from kmsq.chaos import checker, environment, faults
    from kmsq.chaos.workload import History, ProvisionJob, Stream
    from tasks.client import KmsClient

    rounds, gap = SCHEDULES[schedule]
    started = time.time()
    log(f"building the deployment in {work} (Postgres standby: {standby}; broker: {broker})")
    # The broker's schedule loses no token: its second worker shares the first one's (no enrollment to wait for).
    deployment = environment.create(work, workers=2, standby=standby, broker=broker, two_tokens=schedule != "broker")
    try:
        _register(deployment, (*CALLERS, "provisioner"))
        history = History()
        stop = threading.Event()
        fleet = deployment.home / "fleet.json"
        clients = [KmsClient.from_files(deployment.broker_url, deployment.home / "callers" / f"{name}.key.json",
                                        fleet, timeout=60, namespace=None) for name in CALLERS]  # fmt: skip
        streams = [Stream(client, history, stop) for client in clients]
        job_env = deployment.env | {"KMSQ_IDENTITY": str(deployment.home / "callers" / "provisioner.key.json"),
                                    "KMSQ_FLEET": str(fleet)}  # fmt: skip
        job = ProvisionJob(job_env, work, keys)
        log(f"workload: {len(streams)} callers sending every operation, and a job storing {keys} keys")
        for thread in (*streams, job):
            thread.start()
        log(f"faults: every fault {rounds}x, {gap:.0f} s apart")
        injected = faults.run_schedule(deployment, rounds, gap, stop=lambda: False, log=log,
                                       broker_only=schedule == "broker")  # fmt: skip
        log(f"faults done ({len(injected)}); waiting for the job")
        job.finished.wait(timeout=3600)
        time.sleep(gap)  # a last stretch without faults
        stop.set()
        for stream in streams:
            stream.join(timeout=300)
        for client in clients:
            client.close()
        log("checking")
        job_checks, job_duplicates = checker.job_checks(deployment, job)
        figures = checker.request_figures(history)
        duplicates = figures["outcomes"].get("conflict", 0) + job_duplicates
        checks = [
            checker.Check("no request lost", figures["lost"] == 0, f"{figures['lost']} of {figures['sent']}"),
            checker.Check("no duplicated effect", duplicates == 0, f"{duplicates}"),
            checker.Check(
                "every outcome as expected",
                figures["unexpected"] == 0 and figures["wrong_answers"] == 0,
                f"{figures['unexpected']} unexpected, {figures['wrong_answers']} wrong answers; "
                f"outcomes {figures['outcomes']}",
            ),
            *job_checks,
            *_rabbitmq_checks(broker, figures, job, history, injected),
            *checker.stream_checks(deployment, history, streams),
            checker.scan_check(deployment, history, job),
        ]
        history.dump(work / "history.jsonl")
        job_seconds = (job.runs[-1].started + job.runs[-1].seconds - job.runs[0].started) if job.runs else 0
        return {
            "schedule": schedule,
            "standby": standby,
            "broker": broker,
            "database_failovers": deployment.postgres.failovers,
            "keys": keys,
            "seconds": round(time.time() - started, 1),
            "requests": {k: v for k, v in figures.items() if k != "by_op"} | {"duplicated_effects": duplicates},
            "job": {"keys": keys, "runs": len(job.runs), "exit_codes": [r.exit_code for r in job.runs],
                    "seconds": round(job_seconds, 1),
                    "keys_per_s": round(keys / job_seconds, 1) if job_seconds else None},
            "workers_restarted": deployment.restarts,
            "faults": checker.fault_figures(history, injected),
            "checks": [{"check": c.name, "ok": c.ok, "detail": c.detail} for c in checks],
            "ok": all(c.ok for c in checks),
            "work": str(work),
        }  # fmt: skip
    finally:
        deployment.close()

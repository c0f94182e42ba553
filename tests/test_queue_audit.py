"""The audit chain with real workers: concurrent requests through two worker processes leave one intact chain
per pool, each accepted request recorded exactly once; `kmsq audit verify` and `export` on it."""

from __future__ import annotations

import json
import subprocess

from sqlalchemy import select

from tasks.client import KmsClient
from tests.queue_fixtures import Deployment, kmsq_command
from worker.storage.models import AuditRecord

REQUESTS = 200


def test_concurrent_requests_leave_one_intact_chain(deployment: Deployment, client: KmsClient) -> None:
    futures = [client.submit_generate_data_key(with_plaintext=False) for _ in range(REQUESTS)]
    for future in futures:
        client.wait(future)
    ids = {str(f.request_id) for f in futures}
    assert len(ids) == REQUESTS
    with deployment.sessions() as db:
        rows = list(db.scalars(select(AuditRecord).where(AuditRecord.pool == "alpha").order_by(AuditRecord.seq)))
    assert [r.seq for r in rows] == list(range(1, len(rows) + 1))  # two processes, one unforked chain
    ours = [r for r in rows if r.request_id in ids]
    assert len(ours) == REQUESTS and {(r.actor, r.action, r.outcome) for r in ours} == {
        ("full", "generate_data_key_without_plaintext", "ok")}  # fmt: skip
    verified = subprocess.run([*kmsq_command(), "audit", "verify", "--json"], env=deployment.env(),
                              capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert verified.returncode == 0, verified.stderr
    reports = {r["pool"]: r for r in json.loads(verified.stdout)}
    assert reports["alpha"]["ok"] and reports["alpha"]["records"] >= len(rows)
    assert all(r["ok"] for r in reports.values()) and "*" in reports
    command = [*kmsq_command(), "audit", "export", "--pool", "alpha", "--json"]
    exported = subprocess.run(command, env=deployment.env(), capture_output=True, text=True, timeout=300, check=False)
    lines = [json.loads(line) for line in exported.stdout.splitlines()]
    assert exported.returncode == 0 and len(lines) >= len(rows)
    assert {line["request_id"] for line in lines} >= ids

"""``kmsq status``: per pool, the workers alive (Celery ping), the queue, the root keys and the audit head;
and the callers. Reads the database and the broker; needs no HSM. Exits 4 (unavailable), printing no
report, when either cannot be reached: a report of no workers and unknown queues would look like a stopped
pool."""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import click

from kmsq.commands.common import check_broker, service, settings
from kmsq.output import console, one_line_errors, print_json, print_table
from schemas.wire import pool_queue

PING_SECONDS = 1.5
BROKER_WAIT_SECONDS = 3.0  # how long status waits for the broker to accept a connection before it exits 4


@dataclass
class PoolStatus:
    """One pool as `kmsq status` shows it."""

    pool: str
    state: str
    workers: list[str] = field(default_factory=list)  # Celery hostnames that answered the ping
    queue_depth: int | None = None  # the interactive lane's (kms.<pool>); None: the broker could not be read
    oldest_message_age_s: float | None = None
    bulk_queue_depth: int | None = None  # the bulk lane's (kms.<pool>.bulk)
    bulk_oldest_message_age_s: float | None = None
    root_keys: list[dict[str, Any]] = field(default_factory=list)
    audit_head: str | None = None  # SEQ:HASH of the pool's newest audit record


def _pings(broker_url: str, namespace: str | None) -> list[str]:
    """The hostnames of the workers that answer a ping within PING_SECONDS (empty when the broker is down)."""
    from tasks.app import make_app

    app = make_app(broker_url, namespace=namespace)
    try:
        replies = app.control.ping(timeout=PING_SECONDS) or []
    except Exception:  # the broker is down: no worker can be seen; the queue column says so too
        return []
    return sorted(name for reply in replies for name in reply)


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def status(as_json: bool) -> None:
    """Per pool: workers alive, queue depth and oldest message, root keys and versions, the audit head; and
    the callers. Exits 4 when the database or the broker cannot be reached."""
    from sqlalchemy import select

    from tasks.metrics import queue_sampler
    from worker import audit_log, callers
    from worker.storage.db import transaction
    from worker.storage.models import AuditHead
    from worker.storage.standby import replication_of

    config = settings()
    keys = service()
    with transaction(keys.sessions) as db:
        pools = keys.list_pools()
        roots = keys.list_root_keys()
        heads = {h.pool: f"{h.seq}:{h.hash}" for h in db.scalars(select(AuditHead))}
        caller_list = callers.list_callers(db)
        tokens = _tokens(db)
    database = replication_of(keys.engine)
    check_broker(config, BROKER_WAIT_SECONDS)  # KmsError unavailable (exit 4), saying what to start
    workers = _pings(config.effective_broker_url, config.namespace)
    report: list[PoolStatus] = []
    for info in pools:
        entry = PoolStatus(info.name, info.state, [w for w in workers if w.split(".", 1)[0] == info.name])
        with contextlib.suppress(Exception):  # the broker is down: the queue stays None ("?")
            entry.queue_depth, age = queue_sampler(
                config.effective_broker_url, config.namespace, pool_queue(info.name)
            )()
            entry.oldest_message_age_s = round(age, 3) if age is not None else None
            entry.bulk_queue_depth, age = queue_sampler(
                config.effective_broker_url, config.namespace, pool_queue(info.name, "bulk")
            )()
            entry.bulk_oldest_message_age_s = round(age, 3) if age is not None else None
        entry.root_keys = [
            {"id": k.id, "type": k.type, "state": k.state, "version": k.version,
             "decrypts": [k.min_decryption_version, k.version], "destroyed": list(k.destroyed_versions),
             "pending_destruction": [{"version": v, "due": due.isoformat() if due else None}
                                     for v, due in k.pending_destruction],
             "rotation_period_days": k.rotation_period_days,
             "next_rotation": k.next_rotation.isoformat() if k.next_rotation else None}
            for k in roots if k.pool == info.name
        ]  # fmt: skip
        entry.audit_head = heads.get(info.name)
        report.append(entry)
    enabled = sum(c.state == "enabled" for c in caller_list)
    summary = {"pools": [asdict(p) for p in report], "callers": {"enabled": enabled, "total": len(caller_list)},
               "audit_head_global": heads.get(audit_log.GLOBAL_CHAIN), "tokens": tokens,
               "database_replication": asdict(database)}  # fmt: skip
    if as_json:
        print_json(summary)
        return
    rows = [[p.pool, p.state, len(p.workers), "?" if p.queue_depth is None else p.queue_depth,
             "-" if p.oldest_message_age_s is None else f"{p.oldest_message_age_s:.1f} s",
             "?" if p.bulk_queue_depth is None else p.bulk_queue_depth,
             ", ".join(f"{k['id']} v{k['version']}" + ("" if k["state"] == "enabled" else f" ({k['state']})")
                       + "".join(f" (v{d['version']} destroyed after {str(d['due'])[:16]})"
                                 for d in k["pending_destruction"])
                       + (f" (rotates after {str(k['next_rotation'])[:16]})" if k["next_rotation"] else "")
                       for k in p.root_keys) or "-",
             (p.audit_head or "-")[:24]] for p in report]  # fmt: skip
    print_table("pools", ["pool", "state", "workers", "queue", "oldest", "bulk", "root keys", "audit head"], rows)
    console.print(f"callers: {enabled} enabled of {len(caller_list)}; "
                  f"audit head of `*`: {summary['audit_head_global'] or '-'}")  # fmt: skip
    console.print(database.line())
    if tokens["keys"]:
        held = ", ".join(f"{name} {count}" for name, count in sorted(tokens["keys"].items()))
        short = len(tokens["on_fewer_than_all"])
        warning = f"; [red]{short} keys are not on every token[/red] (kmsq hsm list)" if short else ""
        console.print(f"tokens (keys held, as last reported): {held}{warning}")
    for name, check in tokens["checks"].items():
        verdict = ("[red]lacks[/red] " + ", ".join(check["missing"])) if check["missing"] else "has what kmsq needs"
        console.print(f"token {name}: {verdict} ({check['checked_by']}, {check['checked_at'][:19]})")


def _tokens(db: Any) -> dict[str, Any]:
    """The deployment's tokens as they last reported what they hold (worker.replication): keys per token, and the
    keys not on every one of them."""
    from sqlalchemy import select

    from worker.replication import ANCHOR
    from worker.storage.models import TokenCheck, TokenKey

    checks = {row.token: {"checked_at": row.checked_at.isoformat(), "checked_by": row.checked_by,
                          "missing": json.loads(row.missing)}
              for row in db.scalars(select(TokenCheck).order_by(TokenCheck.token))}  # fmt: skip
    held: dict[str, set[str]] = {}
    for row in db.scalars(select(TokenKey).where(TokenKey.kind != ANCHOR)):
        held.setdefault(row.token, set()).add(row.label)
    every = set.union(*held.values()) if held else set()
    fewer = sorted(label for label in every if sum(label in labels for labels in held.values()) < len(held))
    return {"keys": {name: len(labels) for name, labels in held.items()}, "on_fewer_than_all": fewer, "checks": checks}

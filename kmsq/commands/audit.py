"""``kmsq audit verify|tail|export``: the audit chains (worker.audit_log). Verifying needs the HSM (the
records' MACs); reading needs only the database."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from datetime import datetime
from typing import TYPE_CHECKING, Any

import click

from kmsq.commands.common import service
from kmsq.output import EXIT_INVALID, console, one_line_errors, print_json, print_table

if TYPE_CHECKING:
    from worker.audit_log import AuditEntry


def _since(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter("expected an ISO time, e.g. 2026-11-30 or 2026-11-30T12:00:00+00:00") from None


def _expect(value: str | None) -> tuple[int, str] | None:
    if value is None:
        return None
    seq, _, digest = value.partition(":")
    if not seq.isdigit() or len(digest) != 64:
        raise click.BadParameter("expected SEQ:HASH, as `kmsq audit tail` prints the newest record")
    return int(seq), digest.lower()


@click.group("audit")
def audit_group() -> None:
    """The audit chains: one per pool (and `*` for callers and policy), each record MACed in the HSM."""


@audit_group.command("verify")
@click.option("--pool", default=None, help="Only this chain (default: every chain).")
@click.option("--since", default=None, help="Start at the first record at or after this ISO time.")
@click.option("--expect", default=None, help="SEQ:HASH of a record noted earlier (catches a truncated chain).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def audit_verify(pool: str | None, since: str | None, expect: str | None, as_json: bool) -> None:
    """Prove the chains intact; exit 7 and name the first bad record when a record was altered, deleted,
    reordered or inserted."""
    reports = service().verify_audit(pool, _since(since), _expect(expect))
    if as_json:
        print_json([asdict(r) for r in reports])
    else:
        rows = [[r.pool, f"{r.records}" + (f" (1-{r.pruned_through} pruned)" if r.pruned_through else ""),
                 f"{r.head_seq}:{r.head_hash[:16]}…",
                 "intact" if r.ok else f"[red]BROKEN at {r.bad_seq}[/red]: {r.problem}"] for r in reports]  # fmt: skip
        print_table("audit chains", ["chain", "records checked", "head", "result"], rows)
    if not all(r.ok for r in reports):
        sys.exit(EXIT_INVALID)


def _rows(entries: list[AuditEntry]) -> list[list[Any]]:
    return [[e.pool, e.seq, e.at.strftime("%Y-%m-%d %H:%M:%S"), e.actor, e.action, e.outcome,
             f"{e.root_key_id} v{e.root_key_version}" if e.root_key_id else "-", e.request_id or "-", e.detail]
            for e in entries]  # fmt: skip


COLUMNS = ["chain", "seq", "at (UTC)", "actor", "action", "outcome", "root key", "request", "detail"]


@audit_group.command("tail")
@click.option("--pool", default=None, help="Only this chain.")
@click.option("-n", "count", type=click.IntRange(1, 100_000), default=20, show_default=True, help="Records.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def audit_tail(pool: str | None, count: int, as_json: bool) -> None:
    """Show the newest records, and each chain's head (SEQ:HASH, worth noting elsewhere: `verify --expect`)."""
    from worker import audit_log
    from worker.storage.db import transaction

    with transaction(service().sessions) as db:
        entries = audit_log.tail(db, pool, count)
    if as_json:
        print_json([asdict(e) for e in entries])
        return
    print_table("audit log", COLUMNS, _rows(entries))
    heads = {e.pool: e for e in entries}
    for name, e in sorted(heads.items()):
        console.print(f"chain {name}: newest shown {e.seq}:{e.hash}")


@audit_group.command("export")
@click.option("--pool", default=None, help="Only this chain.")
@click.option("--since", default=None, help="From this ISO time on.")
@click.option("--json", "as_json", is_flag=True, help="JSON, one record per line (for log pipelines).")
@one_line_errors
def audit_export(pool: str | None, since: str | None, as_json: bool) -> None:
    """Print every record (of a chain, from a time on), in chain order."""
    from worker import audit_log
    from worker.storage.db import transaction

    with transaction(service().sessions) as db:
        if as_json:
            for record in audit_log.records(db, pool, _since(since)):
                sys.stdout.write(json.dumps(asdict(audit_log.entry(record)), default=str) + "\n")
            return
        entries = [audit_log.entry(r) for r in audit_log.records(db, pool, _since(since))]
    print_table("audit log", COLUMNS, _rows(entries))

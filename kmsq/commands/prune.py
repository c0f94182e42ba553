"""``kmsq prune``: remove now what retention no longer keeps (workers do it by themselves; see
worker.retention and docs/OPERATIONS.md)."""

from __future__ import annotations

import sys
from dataclasses import asdict
from typing import Any

import click

from kmsq.commands.common import service, settings
from kmsq.output import EXIT_INVALID, console, one_line_errors, print_json, print_table


@click.command("prune")
@click.option("--dry-run", is_flag=True, help="Count what would be removed; remove nothing.")
@click.option("--batch", type=click.IntRange(1, 100_000), default=None, help="Rows per transaction.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def prune(dry_run: bool, batch: int | None, as_json: bool) -> None:
    """Remove request records past the time the worker that wrote each signed (its expiry + that worker's clock
    skew + reply grace; this command's settings can only keep them longer), and audit records and rejection
    counts older than the audit retention (each audit chain then starts at an HSM-MACed checkpoint). Exits 7
    when a chain or a request record does not verify where it would be pruned (it is left as it is)."""
    from worker import audit_log, retention

    config = settings()
    policy = retention.policy_of(config)
    svc = service()
    if dry_run:
        with svc.sessions() as db:
            counts = retention.prunable(db, policy)
    else:
        with svc.sessions() as db:
            chains = audit_log.chains(db)
        counts = retention.prune(svc.hsm, svc.sessions, policy, chains=chains, batch=batch or config.prune_batch)
        retention.vacuum(svc.sessions, counts)
    kept: dict[str, Any] = {
        "reply_grace_seconds": config.reply_grace_seconds,
        "clock_skew_seconds": config.clock_skew_seconds,
        "audit_retention_seconds": config.audit_retention_seconds or None,
    }
    if as_json:
        print_json({"dry_run": dry_run, **asdict(counts), "total": counts.total, "retention": kept})
    else:
        verb = "would remove" if dry_run else "removed"
        rows: list[list[Any]] = [["request records", counts.requests]]
        rows += [[f"audit records, chain {chain}", n] for chain, n in sorted(counts.audit_records.items())]
        rows += [["rejection counts", counts.rejection_counts]]
        print_table(f"kmsq prune: {verb}", ["what", "rows"], rows)
        if counts.requests_signed_later:
            console.print(
                f"{counts.requests_signed_later} request records kept past these settings: the workers that wrote "
                "them signed a later time (their skew + grace are longer)"
            )
        if counts.requests_unchecked:
            console.print(
                f"{counts.requests_unchecked} request records left to their own pool's workers: signed by a fleet "
                "key this HSM cannot open"
            )
        if counts.requests_refused:
            console.print(
                f"[red]{counts.requests_refused} request records not pruned[/red]: their signed retention time "
                "does not verify (the database row was changed); they are kept"
            )
        seconds = config.audit_retention_seconds
        audit = "forever" if not seconds else f"{seconds // 86400} days" if seconds % 86400 == 0 else f"{seconds} s"
        console.print(
            f"kept: request records until the time their worker signed, and at least expiry + "
            f"{config.clock_skew_seconds} s skew + {config.reply_grace_seconds} s grace; audit {audit}"
        )
        for chain, problem in sorted(counts.refused_chains.items()):
            console.print(f"[red]chain {chain} not pruned[/red]: {problem} (run: kmsq audit verify --pool {chain})")
    if counts.refused_chains or counts.requests_refused:
        sys.exit(EXIT_INVALID)

"""``kmsq import-legacy``: bring the replaced key provider's ``private_keys`` table into kmsq.

An operator command for an HSM host (it needs the worker extra): it reads the old database, recovers each
private key in this process, and stores it under an HSM root key. Secrets are never printed or logged;
failures are reported by old row id with a fixed reason.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict
from typing import Any

import click

from kmsq.output import EXIT_INVALID, console, one_line_errors, print_json, print_table

MAX_FAILURES_SHOWN = 50


@click.command("import-legacy")
@click.option("--from", "source_url", required=True, help="The old database's URL (postgresql://…).")
@click.option("--table", "table_name", default="private_keys", show_default=True, help="[schema.]table to read.")
@click.option("--root-key", default=None, help="Root key to store under (default: the default pool's).")
@click.option("--dry-run", is_flag=True, help="Recover, store and verify every row, then roll back.")
@click.option("--threads", type=click.IntRange(1, 64), default=os.cpu_count() or 2, show_default="cores",
              help="Rows recovered in parallel (PBKDF2 dominates the cost).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (no progress bar).")
@one_line_errors
def import_legacy(
    source_url: str, table_name: str, root_key: str | None, dry_run: bool, threads: int, as_json: bool
) -> None:
    """Import the old key provider's private keys; re-running skips rows already imported.

    Exits 0 when every row is imported (or was before), 7 when some rows failed (listed by id).
    """
    from sqlalchemy import create_engine

    from worker.config import load_settings
    from worker.legacy import LegacyImporter, check_columns, count_rows, legacy_table, source_engine_url
    from worker.runtime import KeyService
    from worker.storage.db import migrate

    settings = load_settings()
    service = KeyService.from_settings(settings)
    migrate(service.engine)
    source = create_engine(source_engine_url(source_url), pool_pre_ping=True)
    try:
        old = legacy_table(table_name)
        check_columns(source, old)
        importer = LegacyImporter(
            service.hsm, service.sessions, source, old, root_key, settings.default_pool, dry_run=dry_run,
            threads=threads,
        )  # fmt: skip
        summary = importer.run() if as_json else _run_with_progress(importer, count_rows(source, old))
    finally:
        source.dispose()
    if as_json:
        print_json({**asdict(summary), "failed": summary.failed})
    else:
        _print_summary(summary)
    if summary.failures:
        sys.exit(EXIT_INVALID)


def _run_with_progress(importer: Any, total: int) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    verb = "checking" if importer.dry_run else "importing"
    console.print(f"{verb} {total} rows of {importer.origin} under root key {importer.summary.root_key_id}")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(verb, total=total)
        return importer.run(lambda rows: bar.update(task, advance=rows))


def _print_summary(summary: Any) -> None:
    if summary.failures:
        shown = summary.failures[:MAX_FAILURES_SHOWN]
        print_table("rows not imported", ["old id", "reason"], [(f.legacy_id, f.reason) for f in shown])
        if len(summary.failures) > len(shown):
            console.print(f"… and {len(summary.failures) - len(shown)} more (use --json for all)")
    rate = summary.rows / summary.elapsed_seconds if summary.elapsed_seconds else 0.0
    prefix = "dry run, nothing written: would import" if summary.dry_run else "imported"
    console.print(
        f"{prefix} {summary.imported}, matched {summary.matched} already stored, skipped {summary.skipped} "
        f"imported before, failed {summary.failed}; {summary.rows} rows in {summary.elapsed_seconds:.1f} s "
        f"({rate:,.0f} rows/s)"
    )

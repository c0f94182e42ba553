"""``kmsq import-legacy``: bring the replaced key provider's ``private_keys`` table into kmsq; ``kmsq
legacy-root-key``: keep its root key names, so that its encryptedKey values still decrypt.

An operator command for an HSM host (it needs the worker extra): it reads the old database, recovers each
private key in this process, and stores it under an HSM root key. Secrets are never printed or logged;
failures are reported by old row id with a fixed reason.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import click

from kmsq.output import EXIT_INVALID, console, one_line_errors, print_json, print_table

if TYPE_CHECKING:
    from worker.legacy.table_import import ImportSummary, LegacyImporter


MAX_FAILURES_SHOWN = 50


@click.command("import-legacy")
@click.option("--from", "source_url", required=True, envvar="KMSQ_LEGACY_DATABASE_URL",
              help="The old database's URL (postgresql://…); or KMSQ_LEGACY_DATABASE_URL, to keep a password "
                   "out of the process list.")  # fmt: skip
@click.option("--table", "table_name", default="private_keys", show_default=True, help="[schema.]table to read.")
@click.option("--root-key", default=None, help="Root key to store under (default: the default pool's).")
@click.option("--dry-run", is_flag=True, help="Recover, store and verify every row, then roll back.")
@click.option("--threads", type=click.IntRange(1, 64), default=os.cpu_count() or 2, show_default="cores",
              help="Rows recovered in parallel (PBKDF2 dominates the cost).")  # fmt: skip
@click.option("--keep-root-key-names/--no-keep-root-key-names", default=True, show_default=True,
              help="Keep the old root key names sealed, so that the encryptedKey values the old "
                   "generateDataKey handed out still decrypt.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (no progress bar).")
@one_line_errors
def import_legacy(
    source_url: str,
    table_name: str,
    root_key: str | None,
    dry_run: bool,
    threads: int,
    keep_root_key_names: bool,
    as_json: bool,
) -> None:
    """Import the old key provider's private keys; re-running skips rows already imported.

    Exits 0 when every row is imported (or was before), 7 when some rows failed (listed by id).
    """
    from sqlalchemy import create_engine

    from worker.config import load_settings
    from worker.legacy.table_import import LegacyImporter, count_rows, resolve_table, source_engine_url
    from worker.runtime import KeyService
    from worker.storage.db import migrate

    settings = load_settings()
    service = KeyService.from_settings(settings)
    migrate(service.engine)
    source = create_engine(source_engine_url(source_url), pool_pre_ping=True)
    try:
        old = resolve_table(source, table_name)
        importer = LegacyImporter(
            service.hsm, service.sessions, source, old, root_key, settings.default_pool, dry_run=dry_run,
            threads=threads, register_names=keep_root_key_names,
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


def _run_with_progress(importer: LegacyImporter, total: int) -> ImportSummary:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    verb = "checking" if importer.dry_run else "importing"
    console.print(f"{verb} {total} rows of {importer.origin} under root key {importer.summary.root_key_id}")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(verb, total=total)
        return importer.run(lambda rows: bar.update(task, advance=rows))


def _print_summary(summary: ImportSummary) -> None:
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
        f"({rate:,.0f} rows/s); {summary.root_key_names_registered} old root key name(s) newly kept"
    )


@click.group("legacy-root-key")
def legacy_root_key() -> None:
    """The replaced system's root key names, kept sealed so that its encryptedKey values still decrypt."""


@legacy_root_key.command("add")
@click.option("--name-file", type=click.File("r", encoding="utf-8"), default="-", show_default="stdin",
              help="File holding the old root key name (one line); never pass it on the command line.")  # fmt: skip
@click.option("--root-key", default=None, help="Root key to seal it under (default: the default pool's).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def legacy_root_key_add(name_file: Any, root_key: str | None, as_json: bool) -> None:
    """Keep an old root key name (read from --name-file or stdin) sealed under a root key."""
    from worker.config import load_settings
    from worker.legacy.root_key_names import add_legacy_root_key
    from worker.runtime import KeyService
    from worker.storage.db import transaction

    name = name_file.read().rstrip("\r\n")
    settings = load_settings()
    service = KeyService.from_settings(settings)
    with transaction(service.sessions) as db:
        info, created = add_legacy_root_key(service.hsm, db, name, root_key, settings.default_pool)
    del name
    if as_json:
        print_json({**asdict(info), "created": created})
    else:
        state = "kept" if created else "already kept"
        console.print(f"{state} as {info.id} under root key {info.root_key_id} v{info.root_key_version}")


@legacy_root_key.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def legacy_root_key_list(as_json: bool) -> None:
    """List the kept names (ids and root keys; never the names)."""
    from worker.config import load_settings
    from worker.legacy.root_key_names import list_legacy_root_keys
    from worker.runtime import KeyService
    from worker.storage.db import transaction

    with transaction(KeyService.from_settings(load_settings()).sessions) as db:
        infos = list_legacy_root_keys(db)
    if as_json:
        print_json([asdict(i) for i in infos])
    else:
        print_table("old root key names", ["id", "root key", "version", "created"],
                    [(i.id, i.root_key_id, i.root_key_version, i.created_at) for i in infos])  # fmt: skip

"""``kmsq root-key create|rotate|rewrap|set|disable|enable|destroy-version|list``: the HSM-held root keys
and their versions."""

from __future__ import annotations

import sys
from dataclasses import asdict
from typing import TYPE_CHECKING

import click

from kmsq.commands.common import service, settings
from kmsq.output import EXIT_INVALID, console, one_line_errors, print_json, print_result, print_table
from schemas.limits import ROOT_KEY_TYPES

if TYPE_CHECKING:
    from worker.rewrap import RewrapSummary
    from worker.runtime import KeyService
    from worker.service import RootKeyInfo


@click.group("root-key")
def root_key() -> None:
    """Manage root keys."""


def _print_root_keys(keys: list[RootKeyInfo], as_json: bool) -> None:
    if as_json:
        print_json([asdict(k) for k in keys])
        return
    print_table(
        "root keys",
        ["id", "type", "pool", "state", "version", "decrypts", "destroyed", "destroying", "rotates", "wrap",
         "created"],
        [
            [k.id, k.type, k.pool, k.state, k.version, f"v{k.min_decryption_version}-v{k.version}",
             ",".join(map(str, k.destroyed_versions)) or "-", _pending(k), _rotates(k), k.wrap_algorithm,
             k.created_at.strftime("%Y-%m-%d %H:%M")]
            for k in keys
        ],
    )  # fmt: skip


def _pending(key: RootKeyInfo) -> str:
    """``v1 after 2026-12-10 18:00`` for each version waiting for destruction, or ``-``."""
    return (
        ", ".join(f"v{v} after {due:%Y-%m-%d %H:%M}" if due else f"v{v}" for v, due in key.pending_destruction) or "-"
    )


def _rotates(key: RootKeyInfo) -> str:
    """``every 90 d, next 2027-03-01`` or ``-``."""
    if key.rotation_period_days is None:
        return "-"
    nxt = f", next {key.next_rotation:%Y-%m-%d}" if key.next_rotation else ""
    return f"every {key.rotation_period_days} d{nxt}"


@root_key.command("create")
@click.option("--type", "key_type", type=click.Choice(ROOT_KEY_TYPES), default="aes-256", show_default=True)
@click.option("--pool", default=None, help="HSM pool (default: the configured default pool).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def root_key_create(key_type: str, pool: str | None, as_json: bool) -> None:
    """Create a root key in the HSM."""
    keys = service()
    key = keys.create_root_key(key_type, pool)
    keys.ensure_fleet_key(key.pool)  # every pool with a root key can serve requests
    print_result(key, as_json, f"created root key {key.id} ({key.type}, pool {key.pool}, {key.wrap_algorithm})")


@root_key.command("rotate")
@click.argument("root_key_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def root_key_rotate(root_key_id: str, as_json: bool) -> None:
    """Add a new version to a root key; older versions keep decrypting."""
    key = service().rotate_root_key(root_key_id)
    print_result(key, as_json, f"root key {key.id} is now at version {key.version}")


@root_key.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def root_key_list(as_json: bool) -> None:
    """List root keys."""
    _print_root_keys(service().list_root_keys(), as_json)


@root_key.command("rewrap")
@click.argument("root_key_id")
@click.option("--batch", type=click.IntRange(1, 10_000), default=500, show_default=True, help="Rows per transaction.")
@click.option("--job", "job", default=None, help="Job name: give the same one to continue an interrupted run.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (no progress bar).")
@one_line_errors
def root_key_rewrap(root_key_id: str, batch: int, job: str | None, as_json: bool) -> None:
    """Wrap every stored key of a root key again under its current version, inside the HSM.

    Run it after `kmsq root-key rotate`; workers keep serving meanwhile. Interrupted, run it again (with the
    same --job to keep one count): it continues. Exits 7 when some rows could not be rewrapped (listed).
    """
    keys = service()
    if as_json:
        summary = keys.rewrap_stored(root_key_id, job=job, batch=batch)
        print_json({**asdict(summary), "failed": len(summary.failures)})
    else:
        summary = _rewrap_with_progress(keys, root_key_id, job, batch)
        _print_rewrap(summary)
    if summary.failures:
        sys.exit(EXIT_INVALID)


def _rewrap_with_progress(keys: KeyService, root_key_id: str, job: str | None, batch: int) -> RewrapSummary:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(f"rewrapping {root_key_id}", total=None)

        def advance(total: int, handled: int) -> None:
            bar.update(task, total=total, completed=handled)

        return keys.rewrap_stored(root_key_id, job=job, batch=batch, progress=advance)


def _print_rewrap(summary: RewrapSummary) -> None:
    if summary.failures:
        print_table("rows not rewrapped", ["table", "row", "reason"],
                    [(f.table, f.row, f.reason) for f in summary.failures])  # fmt: skip
    rate = summary.rewrapped / summary.elapsed_seconds if summary.elapsed_seconds else 0.0
    console.print(
        f"job {summary.job}: rewrapped {summary.rewrapped} rows of {summary.root_key_id} under version "
        f"{summary.target_version} in {summary.elapsed_seconds:.1f} s ({rate:,.0f} rows/s); "
        f"{summary.done_before} in earlier runs, {len(summary.failures)} failed, {summary.remaining} left"
    )


def _print_key(key: RootKeyInfo, as_json: bool, what: str) -> None:
    print_result(key, as_json, f"root key {key.id}: {what}")


@root_key.command("set")
@click.argument("root_key_id")
@click.option("--min-decryption-version", "minimum", type=click.IntRange(1), default=None,
              help="Refuse ciphertexts under older versions (1 to the current version).")  # fmt: skip
@click.option("--rotation-period-days", "period", type=click.IntRange(1, 3650), default=None,
              help="Rotate it by itself that many days after its last change (its pool's workers do).")  # fmt: skip
@click.option("--no-rotation-period", "no_period", is_flag=True, help="Rotate it only when an operator does.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def root_key_set(root_key_id: str, minimum: int | None, period: int | None, no_period: bool, as_json: bool) -> None:
    """Set a root key's minimum decryption version (older ciphertexts are refused from then on, by workers within
    KMSQ_CACHE_SECONDS; rewrap stored keys first, or get_key refuses them) or its rotation period."""
    from worker.errors import InvalidRequest

    if (minimum is not None) + (period is not None) + no_period != 1:
        raise InvalidRequest("give one of --min-decryption-version, --rotation-period-days, --no-rotation-period")
    if minimum is not None:
        key = service().set_min_decryption_version(root_key_id, minimum)
        _print_key(key, as_json, f"decrypts versions {key.min_decryption_version}-{key.version}")
        return
    key = service().set_rotation_period(root_key_id, period)
    _print_key(key, as_json, f"rotated every {period} days by its pool's workers, next after "
                             f"{key.next_rotation:%Y-%m-%d %H:%M} UTC" if period and key.next_rotation
                             else "no rotation period: rotated only by an operator")  # fmt: skip


@root_key.command("disable")
@click.argument("root_key_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def root_key_disable(root_key_id: str, as_json: bool) -> None:
    """Disable a root key: it wraps and unwraps nothing until enabled again."""
    _print_key(service().set_root_key_state(root_key_id, "disabled"), as_json, "disabled")


@root_key.command("enable")
@click.argument("root_key_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def root_key_enable(root_key_id: str, as_json: bool) -> None:
    """Enable a disabled root key again."""
    _print_key(service().set_root_key_state(root_key_id, "enabled"), as_json, "enabled")


@root_key.command("destroy-version")
@click.argument("root_key_id")
@click.argument("version", type=click.IntRange(1))
@click.option("--wait-days", "wait_days", type=click.IntRange(1, 90), default=7, show_default=True,
              help="Days between the approval and the destruction, when any one operator can cancel it.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def root_key_destroy_version(root_key_id: str, version: int, wait_days: int, as_json: bool) -> None:
    """Schedule the destruction of a version's HSM objects, for good, after a wait (a quorum's change: `kmsq
    propose root-key destroy-version` when this command's keys are not one). Refused, with the reason, unless the
    version is below the minimum decryption version and no stored row uses it (rewrap first). The pool's workers
    destroy it once the wait has passed; until then `kmsq root-key cancel-destroy` (one operator) keeps it."""
    key = service().destroy_root_key_version(root_key_id, version, wait_days)
    due = dict(key.pending_destruction).get(version)
    when = f"after {due:%Y-%m-%d %H:%M} UTC" if due is not None else f"in {wait_days} days"
    said = (f"version {version} will be destroyed {when} by the pool's workers; any one operator can cancel it "
            f"until then: kmsq root-key cancel-destroy {root_key_id} {version}")  # fmt: skip
    _print_key(key, as_json, said)


@root_key.command("cancel-destroy")
@click.argument("root_key_id")
@click.argument("version", type=click.IntRange(1))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def root_key_cancel_destroy(root_key_id: str, version: int, as_json: bool) -> None:
    """Cancel a version's pending destruction (one operator, alone)."""
    _print_key(service().cancel_destroy(root_key_id, version), as_json, f"version {version} is kept")


@root_key.command("run-due")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def root_key_run_due(as_json: bool) -> None:
    """Do now what the workers would at their next run: rotate the root keys whose rotation period has passed,
    destroy the versions whose wait has passed, and this token's objects of destroyed versions."""
    from worker import schedule
    from worker.operators import read_pinned

    keys = service()
    done = schedule.run(keys.hsm, keys.sessions, read_pinned(settings().operator_set_file).digest)
    if as_json:
        print_json(done)
        return
    console.print(f"rotated: {', '.join(done.rotated) or 'none'}; destroyed: {', '.join(done.destroyed) or 'none'}; "
                  f"removed from this token: {', '.join(done.removed_from_token) or 'none'}")  # fmt: skip
    for name, reason in done.kept.items():
        console.print(f"kept {name}: {reason}")

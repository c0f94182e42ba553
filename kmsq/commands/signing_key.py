"""``kmsq signing-key orphans``: the token's signing keys (``generate_signing_key`` with ``in_hsm``) that no row
names, listed and, with ``--remove``, destroyed. ``kmsq signing-key adopt``: an owner for keys generated before
owners were kept."""

from __future__ import annotations

from dataclasses import asdict

import click

from kmsq.commands.common import service
from kmsq.output import console, one_line_errors, print_json, print_table


@click.group("signing-key")
def signing_key() -> None:
    """Keys generated for signing: their owners, and the ones kept in the token (generate-key --in-hsm)."""


@signing_key.command("adopt")
@click.option("--owner", required=True, help="The registered caller that is to own the keys.")
@click.option("--key", "pubs", multiple=True, help="Only this key (its xpub; repeatable).")
@click.option("--all", "every", is_flag=True, help="Every generated key that has no owner.")
@click.option("--pool", default=None, help="Audit chain of the changes (default: the configured default pool).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def signing_key_adopt(owner: str, pubs: tuple[str, ...], every: bool, pool: str | None, as_json: bool) -> None:
    """Give keys generated before owners were kept (which sign for every caller allowed to sign) an owner: then
    they sign only for it and the callers their signing rules grant (grant_callers). A tightening: one operator's.
    Each key is sealed again with its owner and recorded in the audit chain; a key that has an owner keeps it."""
    from worker import key_owners

    if every == bool(pubs):
        raise click.UsageError("name the keys (--key XPUB ...) or --all")
    keys = service()
    report = key_owners.adopt(keys.hsm, keys.sessions, pool or keys.default_pool, owner, list(pubs) or None)
    if as_json:
        print_json(asdict(report))
        return
    for pub, source, reason in report.left:
        console.print(f"left {pub[:32]}… {source}: {reason}")
    console.print(f"{len(report.adopted)} key(s) now owned by {owner}")


@signing_key.command("orphans")
@click.option("--remove", is_flag=True, help="Destroy them (each recorded in the audit chain).")
@click.option(
    "--grace", type=click.IntRange(0, 3600), default=30, show_default=True,
    help="With --remove: seconds to wait before looking at the rows again (a key a worker is making now).",
)  # fmt: skip
@click.option("--pool", default=None, help="Audit chain of the removals (default: the configured default pool).")
@click.option("--batch", type=click.IntRange(1, 10_000), default=500, show_default=True, help="Rows per transaction.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def signing_key_orphans(remove: bool, grace: int, pool: str | None, batch: int, as_json: bool) -> None:
    """List the token's signing keys that no stored key names (left by a worker that stopped between making a key
    and committing its row); with --remove destroy them.

    Every generated ETH-like key's row is opened in the HSM to read which token key it names. --remove looks at the
    rows twice, --grace seconds apart, and removes only keys neither look found named; it removes nothing (exit 6)
    when a row cannot be opened or the token serves another kmsq database too.
    """
    from worker import token_keys

    keys = service()
    if remove:
        report = token_keys.remove_orphans(keys.hsm, keys.sessions, pool or keys.default_pool, grace=grace,
                                           batch=batch)  # fmt: skip
    else:
        report = token_keys.find_orphans(keys.hsm, keys.sessions, batch=batch)
    if as_json:
        print_json(asdict(report))
        return
    if report.orphans:
        removed = set(report.removed)
        print_table("token keys no row names", ["label", "state"],
                    [[label, _state(label, removed, remove)] for label in report.orphans])  # fmt: skip
    for row in report.unreadable:
        console.print(f"private_keys row {row.row} ({row.pub}…, {row.source}) could not be opened: {row.reason}")
    if report.other_databases:
        console.print(f"the token serves {report.other_databases} other kmsq database(s) too: their keys are listed "
                      "here as named by none, and --remove refuses")  # fmt: skip
    for label in report.missing:
        console.print(f"a row names {label}, which the token does not have: that key cannot sign")
    console.print(
        f"{report.token_keys} signing keys in the token, {report.named} named by a row, {len(report.orphans)} "
        f"named by none" + (f", {len(report.removed)} removed" if remove else "")
    )


def _state(label: str, removed: set[str], remove: bool) -> str:
    if label in removed:
        return "removed"
    return "gone already" if remove else "orphan"

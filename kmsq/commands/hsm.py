"""``kmsq hsm enroll | trust | replicate | list | check``: a deployment's keys on more than one HSM (worker.replication,
worker.hsm_custody; docs/OPERATIONS.md, "Key custody")."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from kmsq.commands.common import service, settings, so_pin, token_of
from kmsq.commands.quorum import GATE_OPTIONS, close_gate, operation_gate, trust_arguments
from kmsq.output import EXIT_CONFIG, EXIT_INVALID, console, one_line_errors, print_json, print_table

if TYPE_CHECKING:
    pass


@click.group("hsm")
def hsm_group() -> None:
    """The HSMs (tokens) that hold the deployment's keys."""


@hsm_group.command("enroll")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def hsm_enroll(as_json: bool) -> None:
    """Enroll this host's token: make its transport key (once) and record it in the database. Then, on a host whose
    token holds the keys, run the `kmsq hsm trust` line this prints, comparing the fingerprint there."""
    from worker import replication
    from worker.softhsm import ensure_embedded_token
    from worker.storage.db import migrate, transaction

    config = settings()
    if config.embedded_hsm:
        ensure_embedded_token(config)
    svc = service()
    migrate(svc.engine)
    with transaction(svc.sessions) as db:
        enrolled = replication.enroll(token_of(svc), db)
    if as_json:
        print_json(asdict(enrolled))
        return
    console.print(f"token        {enrolled.name}" + (" (transport key made)" if enrolled.made else ""))
    console.print(f"fingerprint  {enrolled.fingerprint}")
    console.print(f"next, on a host whose token holds the keys: kmsq hsm trust {enrolled.name} --fingerprint "
                  f"{enrolled.fingerprint}")  # fmt: skip


@hsm_group.command("trust")
@click.argument("name")
@click.option("--fingerprint", required=True, help="The fingerprint kmsq hsm enroll showed on that token's host.")
@click.option("--so-pin-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="This token's security officer PIN (default: the embedded token's, else asked).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@GATE_OPTIONS[0]
@GATE_OPTIONS[1]
@one_line_errors
def hsm_trust(name: str, fingerprint: str, so_pin_file: Path | None, as_json: bool, proposal_id: str | None,
              operator_key: Path | None) -> None:  # fmt: skip
    """As this token's security officer, trust the transport key of the enrolled token NAME: from then on this
    token wraps its keys for NAME (kmsq hsm replicate). Nothing is trusted when the fingerprint differs. Needs a
    quorum of operators (an approved `kmsq propose hsm trust` of this token and fingerprint, or this command's
    operator keys): exit 9 without."""
    from worker import replication
    from worker.storage.db import transaction

    svc, proposal = operation_gate("hsm.trust", trust_arguments(name, fingerprint), proposal_id, operator_key)
    with transaction(svc.sessions) as db:
        made = replication.trust(token_of(svc), db, name, fingerprint, so_pin(so_pin_file))
    close_gate(svc, proposal, f"token {name} trusted")
    if as_json:
        print_json({"token": name, "trusted": True, "made": made})
        return
    console.print(f"token {name} trusted" + ("" if made else " (already)") + "; now run kmsq hsm replicate here, "
                  f"then on {name}'s host")  # fmt: skip


REPLICATE_ATTEMPTS = 4  # the workers of this token replicate every KMSQ_REPLICATE_INTERVAL_SECONDS too


@hsm_group.command("replicate")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def hsm_replicate(as_json: bool) -> None:
    """Take the keys waiting for this token (each checked against its key check value), then wrap for every token
    this one trusts the keys it lacks; record what this token holds. Exits 7 when a copy did not verify (it is
    dropped and made again by the next replicate on its source)."""
    import time

    from sqlalchemy.exc import IntegrityError

    from worker import policy_anchor, replication
    from worker.storage.db import transaction

    svc = service()
    for attempt in range(REPLICATE_ATTEMPTS):
        try:
            with transaction(svc.sessions) as db:
                done = replication.replicate(token_of(svc), db, policy_anchor.deployment_id(db))
            break
        except IntegrityError:  # a worker's replicator wrote the same rows at the same moment: again, seeing them
            if attempt == REPLICATE_ATTEMPTS - 1:
                raise
            time.sleep(0.3 * (attempt + 1))
    if as_json:
        print_json(asdict(done))
    else:
        console.print(f"token {done.token}: {len(done.imported)} keys taken"
                      + (", the policy anchor taken" if done.anchor_adopted else ""))  # fmt: skip
        for target, count in sorted(done.exported.items()):
            console.print(f"  {count} keys wrapped for {target}: run kmsq hsm replicate on its host")
        for label in done.refused:
            console.print(f"[red]refused[/red] {label}: the copy did not verify")
    if done.refused:
        sys.exit(EXIT_INVALID)


@hsm_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def hsm_list(as_json: bool) -> None:
    """The enrolled tokens, and per key the key check value each token last reported (this token's computed now):
    tokens that agree hold the same key."""
    from sqlalchemy import select

    from worker import policy_anchor, replication
    from worker.storage.db import transaction
    from worker.storage.models import HsmToken, TokenKey

    svc = service()
    token = token_of(svc)
    with transaction(svc.sessions) as db:
        replication.report_inventory(token, db, policy_anchor.deployment_id(db))
        tokens = list(db.scalars(select(HsmToken).order_by(HsmToken.name)))
        keys = list(db.scalars(select(TokenKey).order_by(TokenKey.label, TokenKey.token)))
    here = token.token_serial()
    names = sorted({t.name for t in tokens} | {k.token for k in keys})
    labels: dict[str, dict[str, Any]] = {}
    anchors = {key.token: key.kcv for key in keys if key.kind == replication.ANCHOR}
    for key in keys:
        if key.kind == replication.ANCHOR:
            continue
        entry = labels.setdefault(key.label, {"kind": key.kind, "tokens": {}, "replicable": True})
        entry["tokens"][key.token] = key.kcv
        entry["replicable"] = entry["replicable"] and key.replicable
    if as_json:
        print_json({
            "this_token": here,
            "tokens": [{"name": t.name, "fingerprint": t.fingerprint, "enrolled_at": t.enrolled_at.isoformat()}
                       for t in tokens],
            "keys": labels,
            "policy_anchor": anchors,  # per token: its anchor's digest (the same on every token once replicated)
        })  # fmt: skip
        return
    print_table("tokens", ["name", "fingerprint", ""], [[t.name, t.fingerprint, "this one" if t.name == here else ""]
                                                        for t in tokens])  # fmt: skip
    rows = [[label, entry["kind"], *(entry["tokens"].get(n, "-") for n in names),
             "" if entry["replicable"] else "cannot leave its token (made before key custody)"]
            for label, entry in sorted(labels.items())]  # fmt: skip
    if anchors:
        rows.append(["policy anchor", "(digest)", *(anchors.get(n, "-") for n in names), ""])
    print_table("keys (key check values)", ["key", "kind", *names, ""], rows)


@hsm_group.command("check")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def hsm_check(as_json: bool) -> None:
    """Try what kmsq needs of this token (mechanisms, random numbers, secp256k1, that CKA_WRAP_WITH_TRUSTED is
    enforced), with session objects it destroys. Exits 3 when something the deployment needs is missing: what
    every pool needs, what its RSA root keys need, and key custody's needs when the token takes part in it.
    Workers run the same check before they serve."""
    from sqlalchemy import select

    from worker import hsm_custody, replication
    from worker.storage.db import transaction
    from worker.storage.models import RootKey

    svc = service()
    token = token_of(svc)
    found = hsm_custody.probe(token)
    with transaction(svc.sessions) as db:
        types = set(db.scalars(select(RootKey.type).where(RootKey.state == "enabled")))
    lacking = hsm_custody.missing(found, types, hsm_custody.takes_part(token))
    with transaction(svc.sessions) as db:
        replication.record_check(db, token.token_serial(), lacking, "kmsq hsm check")
    if as_json:
        print_json({"capabilities": [asdict(c) for c in found], "missing": [c.name for c in lacking]})
    else:
        print_table("what kmsq needs of this token", ["capability", "needed for", "result"],
                    [[c.name, c.needed_for, "yes" if c.ok else f"[red]no[/red] {c.detail}".strip()]
                     for c in found])  # fmt: skip
        if lacking:
            console.print("[red]missing[/red]: " + ", ".join(f"{c.name} ({c.needed_for})" for c in lacking))
    if lacking:
        sys.exit(EXIT_CONFIG)

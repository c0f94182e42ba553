"""``kmsq propose``, ``kmsq proposals``, ``kmsq approve``, ``kmsq apply``: changes that need a quorum of operators
(dual control, docs/DUAL_CONTROL.md).

A proposal is made from the same arguments as the direct command; the proposer's approval is recorded with it.
Each operator reviews it (``kmsq proposals show ID``: the rows it changes, field by field) and approves, on this
host with their key (``kmsq approve ID --operator-key FILE``) or elsewhere (``kmsq operator sign`` on the change
document, then ``kmsq approve ID --approval FILE`` here). The last approval a quorum needs applies it.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from kmsq.commands import caller as caller_commands
from kmsq.commands import signing_rules
from kmsq.commands.common import service, settings, so_pin, token_of
from kmsq.output import console, one_line_errors, print_json, print_table

if TYPE_CHECKING:
    from collections.abc import Callable

    from schemas.quorum import OperatorIdentity, OperatorSet
    from worker.approvals import LocalOperators, OperatorSets
    from worker.proposals import Grant, ProposalInfo
    from worker.runtime import KeyService

_KEY_OPTION = click.option(
    "--operator-key", "operator_key", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
    help="Your NAME.operator.json (default: KMSQ_OPERATOR_KEY, or the key in $KMSQ_HOME/operators/).",
)  # fmt: skip


def _context(operator_key: Path | None, *, adopt: bool = True) -> tuple[KeyService, LocalOperators, OperatorSets]:
    """The key service, the operator keys this command signs with, and the verified operator sets (a deployment
    nobody adopted yet is adopted at once when these keys are every operator's, unless not ``adopt``: the
    command approves the adoption proposal itself). Raises ConfigError when this host pins no set or no key is
    given."""
    from dataclasses import replace

    from worker import proposals
    from worker.errors import ConfigError
    from worker.operators import local_operators
    from worker.policy import AUTHORIZER

    config = settings()
    if operator_key is not None:
        config = replace(config, operator_key=(operator_key,))
    local = local_operators(config)
    if local is None:
        raise ConfigError(f"no operator key: give --operator-key (this host pins {config.operator_set_file})")
    keys = service()
    keys.sessions.configure(info={AUTHORIZER: local})
    with keys.sessions.begin() as db:
        sets = local.sets(db) if adopt and local.holds_genesis() else proposals.deployment_sets(db, local.genesis)
    return keys, local, sets


def _reader() -> tuple[KeyService, OperatorSets]:
    """The key service and the verified operator sets, for commands that only read (no operator key needed)."""
    from worker import proposals
    from worker.operators import read_pinned

    keys = service()
    with keys.sessions() as db:
        return keys, proposals.deployment_sets(db, read_pinned(settings().operator_set_file))


def _signer(local: LocalOperators, sets: OperatorSets) -> OperatorIdentity:
    """The first of ``local``'s keys that is an operator of the current set. Raises Forbidden."""
    from worker.errors import Forbidden

    for identity in local.identities:
        operator = sets.current.get(identity.name)
        if operator is not None and operator == identity.public:
            return identity
    raise Forbidden(f"none of the keys given is an operator of the current set ({sets.current.describe()})")


def _print(info: ProposalInfo, as_json: bool, said: str) -> None:
    if as_json:
        print_json(asdict(info) | {"expires_at": info.expires_at.isoformat()})
        return
    console.print(said)
    who = ", ".join(info.approved_by) or "nobody yet"
    console.print(f"proposal {info.id}: {info.action}, {info.state}, approved by {who}; needs {info.needs}; "
                  f"expires {info.expires_at:%Y-%m-%d %H:%M} UTC")  # fmt: skip


def _propose(operator_key: Path | None, action: str, arguments: dict[str, Any], hours: float, as_json: bool) -> None:
    from schemas.quorum import approve
    from worker import proposals

    keys, local, sets = _context(operator_key)
    signer = _signer(local, sets)
    info = proposals.propose(keys.hsm, keys.sessions, sets, action, arguments, signer.name, ttl_hours=hours)
    info = proposals.add_approval(keys.hsm, keys.sessions, sets, info.id, approve(signer, info.digest))
    _print(info, as_json, f"proposed {action} (your approval is recorded); the other operators run "
                          f"`kmsq approve {info.id}`")  # fmt: skip


@click.group("propose")
def propose_group() -> None:
    """Propose a change that needs a quorum of operators."""


@propose_group.group("caller")
def propose_caller() -> None:
    """Caller registry changes."""


_HOURS = click.option("--expires-in", "hours", type=click.FloatRange(0.01, 720), default=72.0, show_default=True,
                      help="Hours the proposal may be approved in.")  # fmt: skip


def _proposal_options(func: Callable[..., None]) -> Callable[..., None]:
    """``--expires-in``, ``--operator-key`` and ``--json``, and one-line errors: what every proposal command takes."""
    for option in (one_line_errors, click.option("--json", "as_json", is_flag=True, help="Print JSON."),
                   _KEY_OPTION, _HOURS):  # fmt: skip
        func = option(func)
    return func


@propose_caller.command("add")
@click.argument("name")
@click.option("--public-key", "public_key", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--allow", required=True, help="Operations, comma-separated.")
@click.option("--root-keys", default=None, help="Root key ids the caller may use, comma-separated.")
@click.option("--all-root-keys", is_flag=True, help="Allow every root key, including future ones.")
@click.option("--plaintext", is_flag=True, help="Allow operations that return plaintext secrets.")
@_proposal_options
def propose_caller_add(
    name: str, public_key: Path, allow: str, root_keys: str | None, all_root_keys: bool, plaintext: bool,
    hours: float, operator_key: Path | None, as_json: bool,
) -> None:  # fmt: skip
    """Propose registering a caller from its NAME.pub.json (as `kmsq caller add`)."""
    from worker import callers
    from worker.errors import InvalidRequest

    if all_root_keys == (root_keys is not None):
        raise InvalidRequest("give exactly one of --root-keys and --all-root-keys")
    identity = callers.read_public_identity(public_key)
    if identity.caller != name:
        raise InvalidRequest(f"{public_key} is the identity of {identity.caller!r}, not {name!r}")
    split = [v.strip() for v in allow.split(",") if v.strip()]
    roots = None if all_root_keys else [v.strip() for v in (root_keys or "").split(",") if v.strip()]
    arguments = {"name": name, "signing_key": identity.signing_key, "reply_key": identity.reply_key,
                 "allowed_ops": split, "root_keys": roots, "plaintext": plaintext}  # fmt: skip
    _propose(operator_key, "caller.add", arguments, hours, as_json)


@propose_caller.command("enable")
@click.argument("name")
@_proposal_options
def propose_caller_enable(name: str, hours: float, operator_key: Path | None, as_json: bool) -> None:
    """Propose enabling a disabled caller again."""
    _propose(operator_key, "caller.enable", {"name": name}, hours, as_json)


@propose_caller.command("limits")
@click.argument("name")
@caller_commands.limit_options
@_proposal_options
def propose_caller_limits(
    name: str, lane: str | None, requests: float | None, items: float | None, no_requests: bool, no_items: bool,
    hours: float, operator_key: Path | None, as_json: bool,
) -> None:  # fmt: skip
    """Propose a caller's lane and quotas (as `kmsq caller limits`: raising or removing a quota needs this)."""
    from worker import callers
    from worker.storage.db import transaction

    keys, _ = _reader()
    with transaction(keys.sessions) as db:
        current = callers.caller_info(db, name)
    limits = caller_commands.merged_limits(current, lane, requests, items, no_requests, no_items)
    _propose(operator_key, "caller.limits", {"name": name, **limits}, hours, as_json)


@propose_group.group("root-key")
def propose_root_key() -> None:
    """Root key changes."""


@propose_root_key.command("enable")
@click.argument("root_key_id")
@_proposal_options
def propose_root_key_enable(root_key_id: str, hours: float, operator_key: Path | None, as_json: bool) -> None:
    """Propose enabling a disabled root key again."""
    _propose(operator_key, "root-key.enable", {"root_key_id": root_key_id}, hours, as_json)


@propose_root_key.command("set")
@click.argument("root_key_id")
@click.option("--min-decryption-version", "version", type=click.IntRange(1), required=True)
@_proposal_options
def propose_root_key_set(root_key_id: str, version: int, hours: float, operator_key: Path | None,
                         as_json: bool) -> None:  # fmt: skip
    """Propose lowering a root key's minimum decryption version (raising it needs one operator)."""
    _propose(operator_key, "root-key.min-decryption-version", {"root_key_id": root_key_id, "version": version},
             hours, as_json)  # fmt: skip


@propose_root_key.command("destroy-version")
@click.argument("root_key_id")
@click.argument("version", type=click.IntRange(1))
@click.option(
    "--wait-days",
    "wait_days",
    type=click.IntRange(1, 90),
    default=7,
    show_default=True,
    help="Days between the last approval and the destruction, when any one operator can cancel it.",
)
@_proposal_options
def propose_root_key_destroy_version(root_key_id: str, version: int, wait_days: int, hours: float,
                                     operator_key: Path | None, as_json: bool) -> None:  # fmt: skip
    """Propose destroying a version (below the minimum decryption version, used by no stored row) after a wait."""
    _propose(operator_key, "root-key.destroy-version",
             {"root_key_id": root_key_id, "version": version, "wait_days": wait_days}, hours, as_json)  # fmt: skip


@propose_group.group("signing-rules")
def propose_signing_rules() -> None:
    """Signing rules changes."""


@propose_signing_rules.command("set")
@signing_rules.scope_options
@_proposal_options
def propose_signing_rules_set(
    default_scope: bool, key: str | None, wallet: str | None, coin: str | None, caller_name: str | None,
    rules_file: Path | None, no_rules: bool, hours: float, operator_key: Path | None, as_json: bool,
) -> None:  # fmt: skip
    """Propose one scope's signing rules (as `kmsq signing-rules set`): what a change that allows more needs."""
    arguments = signing_rules.scope_arguments(default_scope, key, wallet, coin, caller_name, rules_file, no_rules)
    _propose(operator_key, "signing-rules.set", arguments, hours, as_json)


@propose_group.group("pool")
def propose_pool() -> None:
    """Pool changes."""


@propose_pool.command("enable")
@click.argument("name")
@_proposal_options
def propose_pool_enable(name: str, hours: float, operator_key: Path | None, as_json: bool) -> None:
    """Propose enabling a disabled pool again."""
    _propose(operator_key, "pool.enable", {"name": name}, hours, as_json)


def _new_set_options(func: Callable[..., None]) -> Callable[..., None]:
    """``--operators`` and ``--quorum``: the operator set a command makes."""
    for option in (
        click.option("--quorum", type=click.IntRange(1), required=True, help="How many of them a change needs."),
        click.option("--operators", "operator_files", required=True,
                     help="The new set's NAME.operator.pub.json files, comma-separated (every operator of it)."),
    ):  # fmt: skip
        func = option(func)
    return func


def _new_set(operator_files: str, quorum: int) -> OperatorSet:
    from schemas.quorum import OperatorSet, read_operator

    return OperatorSet(tuple(read_operator(Path(p.strip())) for p in operator_files.split(",") if p.strip()), quorum)


@propose_group.command("operators")
@_new_set_options
@_proposal_options
def propose_operators(operator_files: str, quorum: int, hours: float, operator_key: Path | None,
                      as_json: bool) -> None:  # fmt: skip
    """Propose a new operator set (add or remove operators, change the quorum): a quorum of the current set and a
    quorum of the new one approve it. Applied, it vouches for every policy row as it is; what the old set approved
    and did not apply no longer counts. Each worker host keeps its pinned genesis file."""
    from schemas.quorum import approve
    from worker import proposals

    new = _new_set(operator_files, quorum)
    keys, local, sets = _context(operator_key)
    signer = _signer(local, sets)
    info = proposals.propose_operator_change(keys.hsm, keys.sessions, sets, new, signer.name, ttl_hours=hours)
    info = proposals.add_approval(keys.hsm, keys.sessions, sets, info.id, approve(signer, info.digest))
    _print(info, as_json, f"proposed the operator set {new.describe()} (your approval is recorded); the others run "
                          f"`kmsq approve {info.id}`")  # fmt: skip


def backup_arguments(backup_file: Path, fingerprint: str) -> dict[str, Any]:
    """What a proposal to restore ``backup_file`` approves: the file's SHA-256 and the backup key's fingerprint."""
    import hashlib
    import re

    return {"backup_sha256": hashlib.sha256(backup_file.read_bytes()).hexdigest(),
            "fingerprint": re.sub(r"[^0-9a-f]", "", fingerprint.lower())}  # fmt: skip


def trust_arguments(name: str, fingerprint: str) -> dict[str, Any]:
    """What a proposal to trust the enrolled token ``name`` approves: its name and transport key fingerprint."""
    import re

    return {"token": name, "fingerprint": re.sub(r"[^0-9a-f]", "", fingerprint.lower())}


def operation_gate(action: str, arguments: dict[str, Any], proposal_id: str | None,
                   operator_key: Path | None) -> tuple[KeyService, Grant]:  # fmt: skip
    """The key service and the approved proposal that lets this command carry out ``action`` (see
    worker.proposals.approved_operation); close it with :func:`close_gate` once done. Raises QuorumRequired (exit
    9, saying what to propose), Forbidden, Conflict, NotFound, ConfigError."""
    from dataclasses import replace

    from worker import proposals
    from worker.operators import local_operators

    config = settings()
    if operator_key is not None:
        config = replace(config, operator_key=(operator_key,))
    keys, sets = _reader()
    local = local_operators(config)
    return keys, proposals.approved_operation(sets, keys.sessions, action, arguments, proposal_id, local)


def close_gate(keys: KeyService, grant: Grant, said: str) -> None:
    """Records that the operation ``grant`` allowed was carried out."""
    from worker import audit_log, proposals

    proposals.close_operation(keys.hsm, keys.sessions, grant, audit_log.operator(), said)


_PROPOSAL_HELP = (
    "The approved proposal of exactly this (kmsq propose ...); not needed when this command's "
    "operator keys are a quorum."
)
GATE_OPTIONS = (click.option("--proposal", "proposal_id", default=None, help=_PROPOSAL_HELP), _KEY_OPTION)


def _propose_operation(operator_key: Path | None, action: str, arguments: dict[str, Any], hours: float,
                       as_json: bool) -> None:  # fmt: skip
    from schemas.quorum import approve
    from worker import proposals

    keys, local, sets = _context(operator_key)
    signer = _signer(local, sets)
    info = proposals.propose_operation(keys.hsm, keys.sessions, sets, action, arguments, signer.name,
                                       ttl_hours=hours)  # fmt: skip
    info = proposals.add_approval(keys.hsm, keys.sessions, sets, info.id, approve(signer, info.digest))
    then = f"{proposals.OPERATIONS[action]} --proposal {info.id}"
    _print(info, as_json, f"proposed {action} (your approval is recorded); the other operators run "
                          f"`kmsq approve {info.id}`, then {then}")  # fmt: skip


@propose_group.group("policy")
def propose_policy() -> None:
    """The policy rows as a whole."""


@propose_policy.command("reapprove")
@_proposal_options
def propose_policy_reapprove(hours: float, operator_key: Path | None, as_json: bool) -> None:
    """Propose that the quorum approve every policy row as it is now: after a database restored from a backup
    (and `kmsq policy seal`), the workers that honoured newer rows serve these once it is applied."""
    from schemas.quorum import approve
    from worker import proposals

    keys, local, sets = _context(operator_key)
    signer = _signer(local, sets)
    info = proposals.propose_reapproval(keys.hsm, keys.sessions, sets, signer.name, ttl_hours=hours)
    info = proposals.add_approval(keys.hsm, keys.sessions, sets, info.id, approve(signer, info.digest))
    if info.met:
        info = proposals.apply(keys.hsm, keys.sessions, sets, info.id, signer.name)
    _print(info, as_json, f"proposed approving the {len(info.rows)} policy rows as they are" + (
        " and applied (your approval is a quorum)" if info.state == "applied"
        else f"; the other operators run `kmsq approve {info.id}`"))  # fmt: skip


@propose_group.group("backup")
def propose_backup() -> None:
    """Backups."""


@propose_backup.command("restore")
@click.argument("backup_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--fingerprint", required=True, help="The backup key's fingerprint, as kmsq backup init showed it.")
@_proposal_options
def propose_backup_restore(backup_file: Path, fingerprint: str, hours: float, operator_key: Path | None,
                           as_json: bool) -> None:  # fmt: skip
    """Propose restoring exactly BACKUP_FILE (by its SHA-256) into a token."""
    _propose_operation(operator_key, "backup.restore", backup_arguments(backup_file, fingerprint), hours, as_json)


@propose_group.group("hsm")
def propose_hsm() -> None:
    """Tokens."""


@propose_hsm.command("trust")
@click.argument("name")
@click.option("--fingerprint", required=True, help="The fingerprint kmsq hsm enroll showed on that token's host.")
@_proposal_options
def propose_hsm_trust(name: str, fingerprint: str, hours: float, operator_key: Path | None, as_json: bool) -> None:
    """Propose trusting the enrolled token NAME (its keys then reach it)."""
    _propose_operation(operator_key, "hsm.trust", trust_arguments(name, fingerprint), hours, as_json)


@click.group("proposals", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@one_line_errors
def proposals_group(ctx: click.Context, as_json: bool) -> None:
    """List the proposals (newest first); `kmsq proposals show ID` for one."""
    if ctx.invoked_subcommand is not None:
        return
    from worker import proposals

    keys, sets = _reader()
    infos = proposals.list_proposals(keys.sessions, sets)
    if as_json:
        print_json([asdict(i) | {"expires_at": i.expires_at.isoformat()} for i in infos])
        return
    print_table("proposals", ["id", "action", "state", "approved", "proposed by", "expires (UTC)"],
                [[i.id, i.action, i.state, f"{len(i.approved_by)}/{i.quorum} {','.join(i.approved_by)}",
                  i.proposed_by, f"{i.expires_at:%Y-%m-%d %H:%M}"] for i in infos])  # fmt: skip


@proposals_group.command("show")
@click.argument("proposal_id")
@click.option("--document", "document_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the change document (what `kmsq operator sign` signs) to this file.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def proposals_show(proposal_id: str, document_out: Path | None, as_json: bool) -> None:
    """Show what a proposal changes, row by row and field by field."""
    from worker import proposals

    keys, sets = _reader()
    info = proposals.describe(keys.sessions, proposal_id, sets)
    document = proposals.document_of(keys.sessions, proposal_id)
    if document_out is not None:
        document_out.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    changes = proposals.differences(keys.sessions, document)
    if as_json:
        print_json(asdict(info) | {"expires_at": info.expires_at.isoformat(), "changes": changes,
                                   "document": document})  # fmt: skip
        return
    _print(info, False, f"digest {info.digest}")
    if info.action in proposals.OPERATIONS:
        console.print(f"operation {info.action}: {json.dumps(dict(info.arguments), sort_keys=True)}")
        console.print(f"carried out, once approved, by {proposals.OPERATIONS[info.action]} --proposal {info.id}")
        return
    if info.action == "operators.change":
        from schemas.quorum import OperatorSet

        new = OperatorSet.from_document(document["arguments"]["operator_set"])
        console.print(f"operator set: {sets.named(document['operator_set']).describe()} -> {new.describe()}")
        for operator in sorted(new.operators, key=lambda o: o.name):
            console.print(f"  {operator.name}: {operator.key_id}")
        console.print(f"and every policy row as it is now ({len(changes)}) is approved again under the new set")
        return
    for change in changes:
        console.print(f"{change['row']} ({'new' if change['new'] else 'changed'}):")
        for field, (before, after) in change["fields"].items():
            console.print(f"  {field}: {after}" if change["new"] else f"  {field}: {before} -> {after}")


@click.command("approve")
@click.argument("proposal_id")
@_KEY_OPTION
@click.option(
    "--approval",
    "approval_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="An approval made elsewhere (`kmsq operator sign`), instead of signing here.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def approve_command(proposal_id: str, operator_key: Path | None, approval_file: Path | None, as_json: bool) -> None:
    """Approve a proposal (the one that completes the quorum applies it)."""
    from schemas.quorum import approve
    from worker import proposals

    if approval_file is not None:
        approval = proposals.parse_approval(approval_file.read_text(encoding="utf-8"))
        keys, sets = _reader()
    else:
        keys, local, sets = _context(operator_key, adopt=False)
        signer = _signer(local, sets)
        approval = approve(signer, proposals.describe(keys.sessions, proposal_id, sets).digest)
    info = proposals.add_approval(keys.hsm, keys.sessions, sets, proposal_id, approval)
    then = ""
    if info.met and info.action in proposals.OPERATIONS:
        then = f"; approved: now {proposals.OPERATIONS[info.action]} --proposal {proposal_id}"
    elif info.met:
        info = proposals.apply(keys.hsm, keys.sessions, sets, proposal_id, approval.operator)
    _print(
        info, as_json, f"approved by {approval.operator}" + (" and applied" if info.state == "applied" else "") + then
    )


@click.command("apply")
@click.argument("proposal_id")
@_KEY_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def apply_command(proposal_id: str, operator_key: Path | None, as_json: bool) -> None:
    """Apply a proposal a quorum approved (if the last approval did not already)."""
    from worker import proposals

    keys, local, sets = _context(operator_key)
    info = proposals.apply(keys.hsm, keys.sessions, sets, proposal_id, _signer(local, sets).name)
    _print(info, as_json, "applied")


@click.command("break-glass")
@_new_set_options
@click.option(
    "--so-pin-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="This token's security officer PIN (default: the embedded token's, else asked).",
)
@click.option("--yes", "confirmed", is_flag=True, help="Confirm: the current operators lose every power.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def break_glass_command(operator_files: str, quorum: int, so_pin_file: Path | None, confirmed: bool,
                        as_json: bool) -> None:  # fmt: skip
    """When fewer than a quorum of the operators remain: as the token's security officer, replace the deployment's
    operator sets with a new genesis (audited), pin it on this host and propose its adoption, which every new
    operator approves. Every worker host's administrators then replace its operator-set.json with this host's;
    until they do, its workers refuse the policy rows. See docs/DUAL_CONTROL.md, "Break glass"."""
    from worker import proposals
    from worker.break_glass import break_glass
    from worker.errors import InvalidRequest
    from worker.operators import write_pinned
    from worker.storage.db import transaction

    if not confirmed:
        raise InvalidRequest("break glass takes every power from the current operators: run it again with --yes")
    genesis = _new_set(operator_files, quorum)
    config, keys = settings(), service()
    with transaction(keys.sessions) as db:
        done = break_glass(token_of(keys), db, genesis, so_pin(so_pin_file))
    write_pinned(config.operator_set_file, genesis)
    adoption = proposals.propose_adoption(keys.hsm, keys.sessions, genesis, "break-glass")
    if as_json:
        print_json(asdict(done) | {"adoption_proposal": adoption.id, "pinned": str(config.operator_set_file)})
        return
    console.print(
        f"break glass: {done.replaced_sets} operator set(s) replaced by {genesis.describe()} (genesis "
        f"{genesis.digest}); {len(done.cancelled_proposals)} pending proposal(s) cancelled; audited"
    )
    console.print(f"pinned on this host in {config.operator_set_file}; next: every new operator runs `kmsq approve "
                  f"{adoption.id}`, and every worker host's administrators put this file in place of theirs and "
                  "restart the workers (until then they refuse the policy rows)")  # fmt: skip

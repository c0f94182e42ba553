"""``kmsq init``: the embedded token, the database, a default root key, the default pool's fleet keys, and the
fleet file ``$KMSQ_HOME/fleet.json`` that the caller commands read by default."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from kmsq.commands.common import write_fleet_file
from kmsq.output import console, one_line_errors, print_json

if TYPE_CHECKING:
    from schemas.quorum import OperatorSet
    from worker.config import Settings
    from worker.runtime import KeyService


@click.command()
@click.option(
    "--operators",
    "operator_files",
    default=None,
    help="The operators' NAME.operator.pub.json files, comma-separated: the operator set this deployment "
    "adopts (default: one developer, `admin`, whose key init writes).",
)
@click.option("--quorum", type=click.IntRange(1), default=None, help="How many operators a sensitive change needs.")
@click.option("--signing-rules", "signing_rules", default=None, metavar="none|FILE",
              help="The default signing rules (a rules document, or none on purpose); default: none for the "
              "embedded developer's 1-of-1, else no default (no key signs until the operators set rules).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def init(operator_files: str | None, quorum: int | None, signing_rules: str | None, as_json: bool) -> None:
    """Create the embedded token (if no HSM is configured), migrate the database, create a default root key
    and the default pool's fleet keys, and write the fleet file $KMSQ_HOME/fleet.json (every pool, as
    `kmsq fleet-key export` prints it).

    Safe to run again: it creates only what is missing, and rewrites the fleet file only when it changed.
    """
    from worker.config import load_settings
    from worker.runtime import KeyService
    from worker.softhsm import ensure_embedded_token
    from worker.storage.db import migrate

    settings = load_settings()
    token_created = ensure_embedded_token(settings) if settings.embedded_hsm else False
    service = KeyService.from_settings(settings)
    service.hsm.check()
    policy_key_created = service.hsm.ensure_policy_key()
    before = migrate(service.engine)
    operators, operators_created = _operators(service, settings, operator_files, quorum)
    keys = service.list_root_keys()
    created_key = None
    if not any(k.pool == settings.default_pool and k.state == "enabled" for k in keys):
        created_key = service.create_root_key("aes-256", settings.default_pool)
    fleet, fleet_created = service.ensure_fleet_key(settings.default_pool)
    rules = _default_rules(service, signing_rules, developer=operator_files is None)
    failing = _unsealed(service)
    anchor = _anchor(service)
    fleet_path = settings.home / "fleet.json"
    fleet_written = write_fleet_file(fleet_path, service.fleet_document())
    adoption = _adoption(service, settings, operators)
    report = {
        "home": str(settings.home),
        "hsm": "embedded SoftHSM2" if settings.embedded_hsm else settings.pkcs11_module,
        "token_label": settings.pkcs11_token_label,
        "token_created": token_created,
        "database": service.engine.url.render_as_string(hide_password=True),
        "database_migrated_from": before,
        "root_key_created": asdict(created_key) if created_key else None,
        "fleet_key": {"pool": fleet.pool, "signing_key_id": fleet.signing_key_id, "created": fleet_created},
        "policy_key_created": policy_key_created,
        "policy_rows_failing": failing,
        "policy_anchor": anchor,
        "fleet_file": {"path": str(fleet_path), "written": fleet_written},
        "signing_rules_default": rules,
        "operators": {
            "set": operators.document(),
            "digest": operators.digest,
            "created": operators_created,
            "pinned": str(settings.operator_set_file),
            "adoption_proposal": adoption,
        },
    }
    if as_json:
        print_json(report)
        return
    console.print(f"KMSQ_HOME      {report['home']}")
    console.print(
        f"HSM            {report['hsm']}, token {settings.pkcs11_token_label!r}"
        + (" (created)" if token_created else " (exists)")
    )
    console.print(f"database       {report['database']}" + (" (created)" if before is None else " (migrated)"))
    if created_key:
        console.print(f"root key       {created_key.id} {created_key.type} pool={created_key.pool} (created)")
    else:
        console.print("root key       a root key already exists in the default pool")
    console.print(f"fleet key      {fleet.signing_key_id} pool={fleet.pool}" + (" (created)" if fleet_created else ""))
    console.print(
        "policy key     " + ("created" if policy_key_created else "exists")
        + (f"; {len(failing)} rows are not sealed: review them, then run `kmsq policy seal`" if failing else "")
    )  # fmt: skip
    console.print(f"policy anchor  {anchor}")
    single = operators.quorum == 1 and len(operators.operators) == 1
    console.print(
        f"operators      {operators.describe()}" + (" (created)" if operators_created else "")
        + (f": one developer's quorum, its key in {settings.home / 'operators'}; a fleet needs operators of its own"
           " (docs/DUAL_CONTROL.md)" if single else "")
    )  # fmt: skip
    if adoption:
        console.print(f"               not adopted yet: every operator runs `kmsq approve {adoption}` (their own key)")
    console.print(f"fleet file     {fleet_path}" + (" (written)" if fleet_written else " (up to date)"))
    console.print(f"signing rules  default: {rules}")


def _operators(
    service: KeyService, settings: Settings, operator_files: str | None, quorum: int | None
) -> tuple[OperatorSet, bool]:
    """The pinned operator set (``--operators`` and ``--quorum``, else the embedded default's 1-of-1), and whether
    it was pinned now; when this command holds every operator's key the deployment is adopted at once, and the
    sessions approve with the keys it holds. Raises InvalidRequest for a set that differs from the pinned one."""
    from sqlalchemy import select

    from schemas.quorum import OperatorSet, read_operator
    from worker.errors import ConfigError, InvalidRequest
    from worker.operators import ensure_developer_set, local_operators, read_pinned, write_pinned
    from worker.policy import AUTHORIZER
    from worker.storage.db import transaction
    from worker.storage.models import OperatorSetRecord

    if not settings.operator_set_file.exists():
        with service.sessions() as db:
            governed = db.scalar(select(OperatorSetRecord.seq).limit(1)) is not None
        if governed:
            raise ConfigError(f"this database has its operator set, which this host does not pin: copy the "
                              f"deployment's operator-set.json to {settings.operator_set_file} (or set "
                              "KMSQ_OPERATOR_SET)")  # fmt: skip
    if operator_files is None:
        if quorum is not None:
            raise InvalidRequest("--quorum goes with --operators")
        operators, created = ensure_developer_set(settings)
    else:
        members = tuple(read_operator(Path(p.strip())) for p in operator_files.split(",") if p.strip())
        operators, created = OperatorSet(members, quorum or len(members)), False
        path = settings.operator_set_file
        if path.exists():
            if read_pinned(path) != operators:
                raise InvalidRequest(f"{path} pins another operator set; it changes only by quorum")
        else:
            write_pinned(path, operators)
            created = True
    local = local_operators(settings)
    if local is not None and local.holds_genesis():
        service.sessions.configure(info={AUTHORIZER: local})
        with transaction(service.sessions) as db:
            local.sets(db)  # adopts the rows there are, once
    return operators, created


def _adoption(service: KeyService, settings: Settings, operators: OperatorSet) -> str | None:
    """The id of the pending proposal by which every operator adopts the deployment (made now when there is none),
    or None once it is adopted."""
    from sqlalchemy import select

    from worker import proposals
    from worker.approvals import ADOPT, adoption_document
    from worker.storage.models import OperatorSetRecord, Proposal

    with service.sessions() as db:
        if db.scalar(select(OperatorSetRecord.seq).limit(1)) is not None:
            return None

        def listed(document: dict[str, Any]) -> list[tuple[Any, ...]]:
            return [(e["row"], e["seq"], e["fields"]) for e in document["rows"]]

        wanted = listed(adoption_document(db, operators, "init"))
        documents = [
            (p.id, json.loads(p.document)) for p in db.scalars(select(Proposal).where(Proposal.state == "pending"))
        ]
        pending = [i for i, d in documents if d.get("action") == ADOPT and d.get("operator_set") == operators.digest
                   and listed(d) == wanted]  # fmt: skip
    for proposal_id in pending:  # the rows are still as it lists them: the same proposal
        if proposals.describe(service.sessions, proposal_id, proposals.genesis_sets(operators)).state == "pending":
            return proposal_id
    return proposals.propose_adoption(service.hsm, service.sessions, operators, "init").id


def _unsealed(service: KeyService) -> list[str]:
    """Rows that workers would refuse (e.g. from before policy MACs): listed, never sealed automatically."""
    from worker import policy
    from worker.storage.db import transaction

    with transaction(service.sessions) as db:
        return [s.row for s in policy.review(service.hsm, db) if not s.verifies]


def _anchor(service: KeyService) -> str:
    """Whether the token anchors the policy rows (worker.policy_anchor); an upgraded deployment is told to run
    `kmsq policy seal`, never anchored automatically."""
    from worker import policy_anchor

    with service.sessions() as db:
        return policy_anchor.status(service.hsm, db).describe()


def _default_rules(service: KeyService, option: str | None, *, developer: bool) -> str:
    """Sets the default signing rules when there are none yet: ``option`` (``none`` or a rules file), else none for
    the embedded developer's 1-of-1. Returns what the default is, in words."""
    from schemas.signing_rules import RulesError, parse_rules
    from worker.errors import InvalidRequest
    from worker.signing_rule_rows import set_rules
    from worker.storage.db import transaction
    from worker.storage.models import SigningRulesRow

    with service.sessions() as db:
        existing = db.get(SigningRulesRow, "default")
    if existing is not None:
        return "none (exists)" if parse_rules(existing.rules).none else "rules (exist; kmsq signing-rules list)"
    if option is None and not developer:
        return "not set: no key signs until the operators set rules (kmsq signing-rules set --default)"
    try:
        rules = parse_rules('{"none": true}' if option in (None, "none") else Path(str(option)).read_bytes())
    except (OSError, RulesError) as e:
        raise InvalidRequest(f"--signing-rules {option}: {e}") from None
    with transaction(service.sessions) as db:
        set_rules(service.hsm, db, "default", rules)
    if rules.none:
        chosen = "by --signing-rules none" if option else "for one developer"
        return f"none, {chosen} (every payload a key can sign is signed; kmsq signing-rules set --default)"
    return "rules set (kmsq signing-rules list)"

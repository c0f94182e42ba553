"""The in-process deployment of the unit tier: the real pipeline, service, callers, policy and storage code on
SQLite and the in-memory KeyStore of ``tests/fake_hsm.py`` (fixtures ``unit`` and ``full``, registered by
conftest), and how a caller reads a delivery (``answer``, ``refusal``)."""

from __future__ import annotations

import json
import secrets
import shutil
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from schemas.messages import ReplyEnvelope
from schemas.operations import ALLOWABLE_OPS
from schemas.signing_rules import SigningRules, parse_rules
from schemas.wire import task_name
from tasks.codec import KmsCodec, KmsError
from tasks.identity import CallerIdentity, Fleet
from tests.conftest import TEST_OPERATORS
from tests.fake_hsm import FakeHsm
from worker import callers
from worker.fleet import FleetSecrets, load_fleet_key
from worker.keystore import KeyStore
from worker.pipeline import Delivery, Inbound, WorkerContext, handle
from worker.policy import TrustedRows
from worker.runtime import KeyService
from worker.signing_rule_rows import set_rules
from worker.storage.db import create_db_engine, migrate, session_factory, transaction
from worker.storage.models import RejectionCount


@dataclass
class Unit:
    """A pool ``alpha`` (an aes-256 and an rsa-2048 root key) and a pool ``beta``, callers, and a worker
    context of alpha with a clock the test sets."""

    service: KeyService
    ctx: WorkerContext
    roots: dict[str, str]
    fleet: Fleet
    directory: Path
    clock: list[datetime]
    full: KmsCodec | None = None  # the caller ``full`` when the test asked for it (registered in the template)

    def register(self, name: str, ops: tuple[str, ...] = ALLOWABLE_OPS, roots: list[str] | None = None,
                 plaintext: bool = True) -> KmsCodec:  # fmt: skip
        identity = CallerIdentity.generate(name)
        identity.write(self.directory)
        public = callers.read_public_identity(self.directory / f"{name}.pub.json")
        with transaction(self.service.sessions) as db:
            callers.add_caller(self.service.hsm, db, name, public, list(ops), roots, plaintext)
        return KmsCodec(identity, self.fleet)

    def deliver(self, codec: KmsCodec, params: dict[str, Any], pool: str = "alpha", **message: Any) -> Delivery:
        request, args = codec.build_request(params, pool)
        return self.handle_args(request, args, **message)

    def handle_args(self, request: Any, args: list[Any], **message: Any) -> Delivery:
        inbound = Inbound(
            message.get("task", task_name(request.params.op)),
            message.get("reply_to", request.reply_queue),
            message.get("message_id", str(request.request_id)),
            args,
        )
        return handle(self.ctx, inbound, final_attempt=message.get("final", False))

    def set_rules(self, scope: str, rules: dict[str, Any], members: str = "") -> None:
        """Sets ``scope``'s signing rules (as ``kmsq signing-rules set`` with the test run's operator)."""
        with transaction(self.service.sessions) as db:
            set_rules(self.service.hsm, db, scope, parse_rules(json.dumps(rules)), members)

    def count(self, model: Any) -> int:
        with self.service.sessions() as db:
            return int(db.scalar(select(func.count()).select_from(model)) or 0)

    def rejection(self, request_id: str) -> RejectionCount:
        self.ctx.rejections.flush()
        with self.service.sessions() as db:
            row = db.scalars(select(RejectionCount).where(RejectionCount.last_request_id == request_id)).first()
        assert row is not None
        return row


def answer(codec: KmsCodec, delivery: Delivery) -> dict[str, Any]:
    """Verifies and opens a delivery as the caller does; raises KmsError for an error reply."""
    reply = codec.verify_envelope(ReplyEnvelope(**delivery.envelope))
    return codec.unseal(reply, reply.request_id)


def refusal(codec: KmsCodec, delivery: Delivery) -> tuple[str, str]:
    with pytest.raises(KmsError) as error:
        answer(codec, delivery)
    return error.value.code, error.value.message


@dataclass(frozen=True)
class Populated:
    """A populated database file and the in-memory token its keys are in."""

    path: Path
    hsm: FakeHsm


@dataclass(frozen=True)
class UnitTemplate:
    """Built once per test run: a migrated, empty SQLite schema; a copy holding the Unit's root keys and fleet keys,
    made on an in-memory token whose keys each test gets a copy of; the same with the caller ``full`` registered
    (most unit tests ask for it); and what a Unit reads from them (the fleet, the alpha pool's fleet secrets)."""

    schema: Path
    plain: Populated
    with_full: Populated
    roots: dict[str, str]
    fleet: Fleet
    fleet_secrets: FleetSecrets
    full_identity: CallerIdentity


@pytest.fixture(scope="session")
def unit_template(tmp_path_factory: pytest.TempPathFactory) -> UnitTemplate:
    """Migrating a database, making three root keys (one RSA-2048) and two pools' fleet keys, and registering a
    caller took most of a unit test's time (issue 21: the tier ran 33-79 s); each test copies the result instead."""
    directory = tmp_path_factory.mktemp("unit-template")
    schema, populated, with_full = directory / "schema.db", directory / "unit.db", directory / "full.db"
    engine = create_db_engine(f"sqlite:///{schema}")
    migrate(engine)
    engine.dispose()
    shutil.copyfile(schema, populated)
    hsm = FakeHsm()
    engine = create_db_engine(f"sqlite:///{populated}")
    service = KeyService(hsm, session_factory(engine), default_pool="alpha")
    roots = _populate(service)
    with transaction(service.sessions) as db:
        fleet_secrets = load_fleet_key(hsm, db, "alpha")
    fleet = Fleet.from_document(service.fleet_document())
    engine.dispose()
    shutil.copyfile(populated, with_full)
    full_hsm = hsm.clone()
    engine = create_db_engine(f"sqlite:///{with_full}")
    context = Unit(KeyService(full_hsm, session_factory(engine), default_pool="alpha"), None, roots, fleet,  # type: ignore[arg-type]
                   directory, [datetime.now(UTC)])  # fmt: skip
    full_identity = context.register("full").identity
    engine.dispose()
    return UnitTemplate(schema, Populated(populated, hsm), Populated(with_full, full_hsm), roots, fleet,
                        fleet_secrets, full_identity)  # fmt: skip


@pytest.fixture
def unit(request: pytest.FixtureRequest, tmp_path: Path, unit_template: UnitTemplate) -> Iterator[Unit]:
    wants_full = "full" in request.fixturenames
    source = unit_template.with_full if wants_full else unit_template.plain
    shutil.copyfile(source.path, tmp_path / "unit.db")
    prepared = (unit_template.fleet_secrets, unit_template.fleet)
    for made in _unit(tmp_path, source.hsm.clone(), unit_template.roots, prepared=prepared):
        if wants_full:
            made.full = KmsCodec(unit_template.full_identity, unit_template.fleet)
        yield made


def copy_of_schema(template: UnitTemplate, path: Path) -> Engine:
    """An engine on a copy of the template's migrated, empty SQLite schema at ``path``, a database of its own (its
    own deployment id, so its own policy anchor in a token that several tests share)."""
    shutil.copyfile(template.schema, path)
    with sqlite3.connect(path) as copy:
        copy.execute("UPDATE deployment SET id = ?", (secrets.token_hex(16),))
    return create_db_engine(f"sqlite:///{path}")


def units(tmp_path: Path, hsm: KeyStore, schema: Path | None = None, url: str | None = None) -> Iterator[Unit]:
    """Yields a Unit on ``hsm`` (the test run's SoftHSM2 token where the token's own behaviour is tested) and a
    fresh database: the migrated, empty one at ``url`` (Postgres), else a SQLite file (a copy of ``schema``, a
    migrated one, when given)."""
    path = tmp_path / "unit.db"
    if schema is not None and url is None:
        shutil.copyfile(schema, path)
        with sqlite3.connect(path) as copy:  # a database of its own: its own policy anchor in a shared token
            copy.execute("UPDATE deployment SET id = ?", (secrets.token_hex(16),))
    url = url or f"sqlite:///{path}"
    engine = create_db_engine(url)
    migrate(engine)  # nothing to do on a copy of a migrated schema
    service = KeyService(hsm, session_factory(engine), default_pool="alpha")
    roots = _populate(service)
    engine.dispose()
    yield from _unit(tmp_path, hsm, roots, url)


@pytest.fixture(params=["sqlite", "postgres"])
def token_unit(
    request: pytest.FixtureRequest, tmp_path: Path, hsm: KeyStore, unit_template: UnitTemplate
) -> Iterator[Unit]:
    """A Unit on the real token, with a SQLite file or a fresh Postgres database (where operator transactions
    take the advisory lock)."""
    if request.param == "postgres":
        engine = request.getfixturevalue("pg_engine")
        yield from units(tmp_path, hsm, url=engine.url.render_as_string(hide_password=False))
    else:
        yield from units(tmp_path, hsm, unit_template.schema)


def _populate(service: KeyService) -> dict[str, str]:
    """Pool alpha's aes-256 and rsa-2048 root keys, pool beta's aes-256 one, and both pools' fleet keys."""
    roots = {
        "aes": service.create_root_key("aes-256", "alpha").id,
        "rsa": service.create_root_key("rsa-2048", "alpha").id,
        "beta": service.create_root_key("aes-256", "beta").id,
    }
    service.ensure_fleet_key("alpha")
    service.ensure_fleet_key("beta")
    with transaction(service.sessions) as db:  # as kmsq init does for one developer
        set_rules(service.hsm, db, "default", SigningRules(none=True))
    return roots


def _unit(
    tmp_path: Path,
    hsm: KeyStore,
    roots: dict[str, str],
    url: str | None = None,
    prepared: tuple[FleetSecrets, Fleet] | None = None,
) -> Iterator[Unit]:
    """Yields the Unit on the database at ``url`` (or ``tmp_path``'s SQLite file); ``prepared`` are its alpha fleet
    secrets and fleet when they are known already (a copy of the template's database)."""
    engine = create_db_engine(url or f"sqlite:///{tmp_path / 'unit.db'}")
    service = KeyService(hsm, session_factory(engine), default_pool="alpha")
    if prepared is None:
        with transaction(service.sessions) as db:
            fleet_secrets = load_fleet_key(hsm, db, "alpha")
        prepared = (fleet_secrets, Fleet.from_document(service.fleet_document()))  # a transaction of its own
    fleet_secrets, fleet = prepared
    clock = [datetime.now(UTC)]
    # Every caller, root key and pool row the worker acts on must pass its MAC check and carry the operators'
    # approval (the test run's operator: tests.conftest.TEST_OPERATOR).
    rows = TrustedRows(hsm, operators=TEST_OPERATORS.digest)
    ctx = WorkerContext(hsm, service.sessions, "alpha", fleet_secrets, rows, timedelta(seconds=300),
                        now=lambda: clock[0])  # fmt: skip
    yield Unit(service, ctx, roots, fleet, tmp_path, clock)
    ctx.rejections.close()  # written now: no timer of this test's counter is left to fail on a later one's time
    engine.dispose()


@pytest.fixture
def full(unit: Unit) -> KmsCodec:
    """The caller ``full``: every operation, plaintext, every root key (registered in the template's copy)."""
    assert unit.full is not None
    return unit.full

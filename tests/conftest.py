"""Fixtures on real components: a fresh SoftHSM2 token per test run, a fresh Postgres database per run,
and SQLite files. Locally a missing service skips its tests; with ``CI=true`` it fails them."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from schemas.quorum import OperatorIdentity, OperatorSet
from worker.approvals import LocalOperators
from worker.config import SOFTHSM2_LIBRARY_PATHS, Settings
from worker.hsm import Hsm
from worker.operators import write_pinned
from worker.policy import set_process_authorizer
from worker.runtime import KeyService
from worker.softhsm import ensure_embedded_token
from worker.storage.db import create_db_engine, migrate, session_factory

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# The test run's operator (dual control, docs/DUAL_CONTROL.md): a 1-of-1 set every test deployment is adopted by.
# This process approves the rows it makes with it; workers and commands find it in their KMSQ_HOME
# (install_test_operator).
TEST_OPERATOR = OperatorIdentity.generate("test-operator")
TEST_OPERATORS = OperatorSet((TEST_OPERATOR.public,), 1)
POSTGRES_ADMIN_URL = os.environ.get("KMSQ_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def install_test_operator(home: Path) -> None:
    """Pins the test run's operator set in ``home`` and puts the operator's key there, for the workers and the
    operator commands that run with ``KMSQ_HOME=home`` (idempotent)."""
    if not (home / "operator-set.json").exists():
        write_pinned(home / "operator-set.json", TEST_OPERATORS)
    if not (home / "operators" / f"{TEST_OPERATOR.name}.operator.json").exists():
        TEST_OPERATOR.write(home / "operators")


@pytest.fixture(scope="session", autouse=True)
def test_operator() -> Iterator[LocalOperators]:
    """Every row this test process seals is approved by the test run's operator (whatever database it is in)."""
    operators = LocalOperators([TEST_OPERATOR], TEST_OPERATORS)
    set_process_authorizer(operators)
    yield operators
    set_process_authorizer(None)


@contextmanager
def approved_at(moment: datetime) -> Iterator[None]:
    """Within it, this process's operator approves what it seals as of ``moment`` (a destruction approved days
    ago, so that its wait has passed: the workers check the signed time against their clock)."""
    set_process_authorizer(LocalOperators([TEST_OPERATOR], TEST_OPERATORS, clock=lambda: moment))
    try:
        yield
    finally:
        set_process_authorizer(LocalOperators([TEST_OPERATOR], TEST_OPERATORS))


def missing_service(what: str) -> None:
    """Skips the test locally; fails it on CI, where every service must be present."""
    if IN_CI:
        pytest.fail(f"{what} is required on CI but is not available")
    pytest.skip(f"{what} not available")


def softhsm_library() -> str:
    """Returns the SoftHSM2 library path, or skips/fails."""
    for path in SOFTHSM2_LIBRARY_PATHS:
        if Path(path).exists() and shutil.which("softhsm2-util"):
            return path
    missing_service("SoftHSM2")
    raise AssertionError("unreachable")


def raw_session(settings: Settings) -> Any:
    """A second, independent session on the test token (python-pkcs11 directly, no kmsq code)."""
    from pkcs11.exceptions import UserAlreadyLoggedIn

    from worker.hsm import _load_library

    os.environ["SOFTHSM2_CONF"] = str(settings.softhsm2_conf)  # read once, when the library loads
    token = _load_library(settings.module_path()).get_token(token_label=settings.pkcs11_token_label)
    try:
        return token.open(rw=True, user_pin=settings.read_pin())
    except UserAlreadyLoggedIn:  # PKCS#11 login state is per process: the adapter already logged in
        return token.open(rw=True)


def embedded_settings(home: Path, **overrides: str) -> Settings:
    """Returns settings for an embedded token under ``home``."""
    from worker.config import load_settings

    env = {"KMSQ_HOME": str(home), **overrides}
    return load_settings(env)


@pytest.fixture(scope="session")
def hsm_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """A SoftHSM2 token created for this test run (the process-wide token of every in-process test)."""
    softhsm_library()
    settings = embedded_settings(tmp_path_factory.mktemp("hsm"))
    ensure_embedded_token(settings)
    install_test_operator(settings.home)
    return settings


@pytest.fixture(scope="session")
def hsm(hsm_settings: Settings) -> Hsm:
    """The HSM adapter on the test run's token."""
    adapter = Hsm(
        hsm_settings.module_path(),
        hsm_settings.pkcs11_token_label,
        hsm_settings.read_pin,
        hsm_settings.softhsm2_conf,
    )
    adapter.check()
    return adapter


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh Postgres database for this test run, dropped afterwards."""
    with fresh_database("kmsq_test") as url:
        yield url


@contextmanager
def fresh_database(prefix: str) -> Iterator[str]:
    """Creates a Postgres database named ``prefix_<random>``, yields its URL and drops it afterwards.

    Skips the test locally, fails it on CI, when Postgres is unreachable.
    """
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception:
        admin.dispose()
        missing_service("Postgres at " + POSTGRES_ADMIN_URL)
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _fresh_postgres_schema(url: str) -> Engine:
    engine = create_db_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    migrate(engine)
    return engine


@pytest.fixture(params=["postgres", "sqlite"])
def db_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A migrated, empty database: real Postgres, then SQLite through the same models."""
    if request.param == "postgres":
        engine = _fresh_postgres_schema(request.getfixturevalue("postgres_url"))
    else:
        engine = copy_of_schema(request.getfixturevalue("unit_template"), tmp_path / "kmsq.db")
    yield engine
    engine.dispose()


@pytest.fixture
def pg_engine(postgres_url: str) -> Iterator[Engine]:
    """A migrated, empty Postgres database."""
    engine = _fresh_postgres_schema(postgres_url)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(db_engine: Engine) -> sessionmaker[Session]:
    """Session factory on :func:`db_engine`."""
    return session_factory(db_engine)


@pytest.fixture
def service(hsm: Hsm, sessions: sessionmaker[Session]) -> KeyService:
    """The key service on the test token and a fresh database (Postgres and SQLite)."""
    return KeyService(hsm, sessions)


def random_pub() -> str:
    """Returns a unique pub-like string."""
    return "xpub661MyMwAqRbc" + secrets.token_urlsafe(24)


def run_kmsq(home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Runs the installed ``kmsq`` command with ``KMSQ_HOME=home``."""
    kmsq = shutil.which("kmsq") or str(Path(sys.executable).with_name("kmsq"))
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("KMSQ_", "SOFTHSM2_"))}
    full_env.update({"KMSQ_HOME": str(home), **(env or {})})
    return subprocess.run([kmsq, *args], env=full_env, capture_output=True, text=True, timeout=300, check=False)


def host_env(home: Path, database_url: str, broker_address: str, namespace: str) -> dict[str, str]:
    """The environment of a host's ``kmsq`` commands and workers: its KMSQ_HOME, a shared database and broker, the
    test's queue namespace, and a policy cache of 1 s."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KMSQ_", "SOFTHSM2_"))}
    env.update({"KMSQ_HOME": str(home), "KMSQ_DATABASE_URL": database_url, "KMSQ_BROKER_URL": broker_address,
                "KMSQ_NAMESPACE": namespace, "KMSQ_CACHE_SECONDS": "1"})  # fmt: skip
    return env


def kmsq_ok(result: subprocess.CompletedProcess[str]) -> Any:
    """The JSON a ``kmsq`` command printed (``{}`` when it printed none), once it exited 0 (else fails)."""
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout) if result.stdout.strip().startswith(("{", "[")) else {}


def kmsq_refused(result: subprocess.CompletedProcess[str], code: int, needle: str) -> None:
    """Fails unless the command exited ``code`` with one line on stderr that says ``needle``."""
    assert result.returncode == code, (result.returncode, result.stderr)
    assert result.stderr.count("\n") == 1 and needle in result.stderr, result.stderr


# The queue fixtures (Redis, workers) live in their own module; importing them here registers them.
from tests.gateway_fixtures import gateway, http  # noqa: E402,F401
from tests.queue_fixtures import (  # noqa: E402,F401
    broker,
    broker_url,
    client,
    deployment,
    full_caller,
    pytest_generate_tests,
    queue_db_url,
    rabbitmq_url,
    redis_url,
)
from tests.unit_fixtures import copy_of_schema, full, token_unit, unit, unit_template  # noqa: E402,F401
from tests.utxo_lib import utxo_lib  # noqa: E402,F401

# The test tiers (pyproject.toml's markers). A test is marked by the fixtures it uses; a module whose tests
# start processes on their own (the CLI, the chaos run) declares its tier with ``pytestmark``. A test with
# no service tier is ``unit``: ``pytest -m unit`` is the fast loop. ``process`` marks tests that start kmsq or node
# processes of their own (nothing else needed): not in process, so not the fast loop.
_TIER_OF_FIXTURE = {
    "hsm": "hsm",
    "hsm_settings": "hsm",
    "service": "hsm",
    "postgres_url": "db",
    "pg_engine": "db",
    "queue_db_url": "db",
    "redis_url": "queue",
    "rabbitmq_url": "queue",
    "broker_url": "queue",
    "deployment": "queue",
    "gateway": "queue",
    "utxo_lib": "process",
}
SERVICE_TIERS = ("hsm", "db", "queue", "process")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks each test with the tiers its fixtures need, and ``unit`` when it needs none."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        for fixture in sorted(fixtures & _TIER_OF_FIXTURE.keys()):
            item.add_marker(_TIER_OF_FIXTURE[fixture])
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("db_engine") == "postgres":
            item.add_marker("db")
        if not any(item.get_closest_marker(tier) for tier in SERVICE_TIERS):
            item.add_marker("unit")

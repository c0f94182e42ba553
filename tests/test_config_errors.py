"""Configuration errors said at once, in one line, without a secret (issue 22, item 7): a database URL that is
not a URL never has its password echoed; a closed Postgres port and a missing database are told apart, with
where; a broker URL kmsq cannot use is a configuration error (exit 3) at once, not a broker that is down; and
`kmsq status` without its broker exits 4 instead of 0."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.conftest import POSTGRES_ADMIN_URL, missing_service, run_kmsq
from tests.test_newcomer import a_fleet_file, caller_identity, one_line
from worker.config import load_settings, redact_url
from worker.errors import ConfigError, DatabaseUnavailable
from worker.storage.db import create_db_engine, migrate, session_factory, transaction

SECRET = "s3cret"
# Database URLs that are not URLs (no ``://``, a bad port), each with the password in it.
MALFORMED_DATABASE_URLS = (
    f"postgresql+psycopg//user:{SECRET}@host/db",
    f"postgres:{SECRET}@host/db",
    f"postgresql+psycopg:/user:{SECRET}@host:5432/db",
    f"user:{SECRET}@host",
    f"postgresql+psycopg://user:{SECRET}@host:port/db",
    f"postgresql+psycopg://user:{SECRET}@ho st:abc/db",
)
UNSUPPORTED_BROKER_URLS = ("http://foo", f"http://user:{SECRET}@foo/0", "qpid://guest:guest@127.0.0.1:5672//",
                           "memory://", f"redis//:{SECRET}@127.0.0.1:6379/0", "127.0.0.1:6379",
                           f"redis://:{SECRET}@127.0.0.1:6379/0;amqp://guest:guest@127.0.0.1:5672")  # fmt: skip
SAID_AT_ONCE_SECONDS = 10.0  # a process start and a one-line error (the issue: 35 s of retries)


# -- in process ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", MALFORMED_DATABASE_URLS)
def test_redact_url_hides_the_password_of_what_is_not_a_url(url: str) -> None:
    assert SECRET not in redact_url(url)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql+psycopg://user:pw@host/db", "postgresql+psycopg://user:***@host/db"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("redis://:pw@host:6379/0", "redis://:***@host:6379/0"),
        ("postgresql+psycopg://u:p@ss@host/db", "postgresql+psycopg://u:***@host/db"),
        ("postgresql+psycopg://host/db?user=u&password=pw&sslmode=require",
         "postgresql+psycopg://host/db?user=u&password=***&sslmode=require"),
        ("sqlite:////var/lib/kmsq/kmsq.db", "sqlite:////var/lib/kmsq/kmsq.db"),
        ("sentinel://:pw@h1:26379;sentinel://:pw@h2:26379?master_name=m",
         "sentinel://:***@h1:26379;sentinel://:***@h2:26379?master_name=m"),
    ],
)  # fmt: skip
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize("url", MALFORMED_DATABASE_URLS)
def test_a_malformed_database_url_is_a_config_error_without_its_password(url: str) -> None:
    with pytest.raises(ConfigError, match="malformed database URL") as error:
        create_db_engine(url)
    assert SECRET not in str(error.value)
    assert error.value.__cause__ is None and error.value.__suppress_context__


def test_a_password_in_the_query_is_not_shown_when_the_driver_is_missing() -> None:
    with pytest.raises(ConfigError, match="no driver") as error:
        create_db_engine(f"postgresql+nodriver://host/db?password={SECRET}")
    assert SECRET not in str(error.value)


def test_a_closed_port_says_the_server_cannot_be_reached_and_where() -> None:
    engine = create_db_engine(f"postgresql+psycopg://kmsq:{SECRET}@127.0.0.1:1/kmsq")
    with pytest.raises(DatabaseUnavailable) as error:
        migrate(engine)
    message = str(error.value)
    assert "cannot reach the database server at 127.0.0.1:1" in message, message
    assert "does not exist" not in message and SECRET not in message
    with pytest.raises(DatabaseUnavailable) as error, transaction(session_factory(engine)) as db:
        db.execute(text("SELECT 1"))
    assert "cannot reach the database server at 127.0.0.1:1" in str(error.value), str(error.value)
    engine.dispose()


@pytest.fixture
def missing_database() -> Iterator[str]:
    """The URL of a database that does not exist on the local Postgres (a random name: nothing is created)."""
    admin = create_engine(POSTGRES_ADMIN_URL, connect_args={"connect_timeout": 3})
    try:
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception:
        missing_service("Postgres at " + POSTGRES_ADMIN_URL)
    finally:
        admin.dispose()
    yield admin.url.set(database=f"kmsq_missing_{uuid.uuid4().hex[:12]}").render_as_string(hide_password=False)


@pytest.mark.db
def test_a_missing_database_says_it_does_not_exist_and_where(missing_database: str) -> None:
    from sqlalchemy.engine import make_url

    url = make_url(missing_database)
    engine = create_db_engine(missing_database)
    with pytest.raises(DatabaseUnavailable) as error:
        migrate(engine)
    message = str(error.value)
    assert f'database "{url.database}" does not exist' in message, message
    assert f"{url.host}:{url.port or 5432}" in message and "cannot reach" not in message
    with pytest.raises(DatabaseUnavailable) as error, transaction(session_factory(engine)) as db:
        db.execute(text("SELECT 1"))
    assert f'database "{url.database}" does not exist' in str(error.value)
    engine.dispose()


@pytest.mark.parametrize("url", UNSUPPORTED_BROKER_URLS)
def test_an_unsupported_broker_url_is_a_config_error(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigError, match="KMSQ_BROKER_URL") as error:
        load_settings({"KMSQ_HOME": str(tmp_path), "KMSQ_BROKER_URL": url})
    assert SECRET not in str(error.value) and "guest:guest" not in str(error.value)


def test_the_file_s_broker_url_is_checked_too(tmp_path: Path) -> None:
    (tmp_path / "kmsq.toml").write_text('broker_url = "http://foo"\n')
    with pytest.raises(ConfigError, match="broker_url"):
        load_settings({"KMSQ_HOME": str(tmp_path)})


@pytest.mark.parametrize(
    "url",
    ["redis://127.0.0.1:6379/0", "rediss://:pw@redis.example:6380/1", "redis+socket:///run/kmsq/broker.sock",
     "sentinel://h1:26379;sentinel://h2:26379?master_name=kmsq", "REDIS://127.0.0.1",
     "amqp://guest:guest@127.0.0.1:5672", "amqps://kmsq:pw@mq.example:5671/prod",
     "amqp://a:5672;amqp://b:5672"],
)  # fmt: skip
def test_the_supported_broker_urls_are_accepted(tmp_path: Path, url: str) -> None:
    from tasks.app import make_app

    settings = load_settings({"KMSQ_HOME": str(tmp_path), "KMSQ_BROKER_URL": url})
    assert settings.broker_url == url
    make_app(url)


def test_with_rabbitmq_the_namespace_is_the_vhost() -> None:
    from tasks.app import make_app

    assert make_app("amqp://guest:guest@h:5672", namespace="blue").conf.broker_url.endswith("@h:5672/blue")
    assert make_app("amqp://guest:guest@h:5672/blue", namespace="blue").conf.broker_url.endswith("/blue")
    assert make_app("amqp://guest:guest@h:5672/prod").conf.broker_url.endswith("/prod")
    nodes = make_app("amqp://guest:guest@a:5672;amqp://guest:guest@b:5672", namespace="blue").conf.broker_url
    assert nodes == "amqp://guest:guest@a:5672/blue;amqp://guest:guest@b:5672/blue"
    with pytest.raises(ValueError, match="names vhost 'prod' but KMSQ_NAMESPACE is 'blue'"):
        make_app("amqp://guest:guest@h:5672/prod", namespace="blue")


def test_a_sentinel_url_without_its_master_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="master_name"):
        load_settings({"KMSQ_HOME": str(tmp_path), "KMSQ_BROKER_URL": "sentinel://h1:26379"})


@pytest.mark.parametrize("url", UNSUPPORTED_BROKER_URLS)
def test_the_app_refuses_an_unsupported_broker_url(url: str) -> None:
    """The SDK's own check (tasks.app), which KmsClient turns into KmsError ``invalid`` at once."""
    from tasks.app import broker_connection, make_app

    with pytest.raises(ValueError, match="broker URL") as error:
        make_app(url)
    assert SECRET not in str(error.value)
    with pytest.raises(ValueError, match="broker URL"):
        broker_connection(url)


# -- the commands -------------------------------------------------------------------------------------------


def timed(home: Path, *args: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    began = time.monotonic()
    result = run_kmsq(home, *args, env=env)
    return result, time.monotonic() - began


@pytest.mark.process
@pytest.mark.parametrize("url", MALFORMED_DATABASE_URLS[:3])
@pytest.mark.parametrize("command", ["init", "status"])
def test_the_commands_never_echo_a_malformed_database_url_s_password(tmp_path: Path, url: str, command: str) -> None:
    result = run_kmsq(tmp_path, command, env={"KMSQ_DATABASE_URL": url})
    one_line(result, 3, "malformed database URL", "KMSQ_DATABASE_URL")
    assert SECRET not in result.stderr + result.stdout


@pytest.mark.process
@pytest.mark.parametrize("command", ["init", "status"])
def test_the_commands_say_a_closed_port_cannot_be_reached(tmp_path: Path, command: str) -> None:
    env = {"KMSQ_DATABASE_URL": f"postgresql+psycopg://kmsq:{SECRET}@127.0.0.1:1/kmsq"}
    result = run_kmsq(tmp_path, command, env=env)
    one_line(result, 4, "cannot reach the database server at 127.0.0.1:1")
    assert SECRET not in result.stderr + result.stdout


@pytest.mark.process
@pytest.mark.db
@pytest.mark.parametrize("command", ["init", "status"])
def test_the_commands_say_a_database_does_not_exist(tmp_path: Path, missing_database: str, command: str) -> None:
    from sqlalchemy.engine import make_url

    url = make_url(missing_database)
    result = run_kmsq(tmp_path, command, env={"KMSQ_DATABASE_URL": missing_database})
    one_line(result, 4, f'database "{url.database}" does not exist', f"{url.host}:{url.port or 5432}")


@pytest.mark.process
@pytest.mark.parametrize("url", ["http://foo", f"http://user:{SECRET}@foo/0", "qpid://guest:guest@127.0.0.1:5672//"])
def test_an_unsupported_broker_url_is_exit_3_at_once_for_every_command(tmp_path: Path, url: str) -> None:
    identity = caller_identity(tmp_path)
    a_fleet_file(tmp_path / "fleet.json")
    env = {"KMSQ_BROKER_URL": url}
    for args in (("status",), ("worker",), ("generate-data-key", "--identity", str(identity)),
                 ("gateway", "--identity", str(identity))):  # fmt: skip
        result, elapsed = timed(tmp_path, *args, env=env)
        line = one_line(result, 3, "unsupported broker URL", "KMSQ_BROKER_URL", "redis://")
        assert SECRET not in line and "guest:guest" not in line, line
        assert elapsed < SAID_AT_ONCE_SECONDS, (args, elapsed)


@pytest.fixture(scope="module")
def initialized_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A KMSQ_HOME after `kmsq init` (embedded token, SQLite), whose embedded broker is not running."""
    from tests.conftest import softhsm_library

    softhsm_library()
    home = tmp_path_factory.mktemp("status-home")
    made = run_kmsq(home, "init")
    assert made.returncode == 0, made.stderr
    return home


@pytest.mark.process
def test_status_without_a_reachable_broker_exits_4(initialized_home: Path) -> None:
    env = {"KMSQ_BROKER_URL": f"redis://:{SECRET}@127.0.0.1:1/0"}
    result, elapsed = timed(initialized_home, "status", env=env)
    line = one_line(result, 4, "cannot connect to the broker redis://:***@127.0.0.1:1/0", "KMSQ_BROKER_URL")
    assert SECRET not in line and result.stdout == ""
    assert elapsed < SAID_AT_ONCE_SECONDS, elapsed
    result, elapsed = timed(initialized_home, "status", "--json", env=env)
    one_line(result, 4, "cannot connect to the broker")
    assert result.stdout == ""


@pytest.mark.process
def test_status_without_the_embedded_broker_exits_4_and_names_kmsq_worker(initialized_home: Path) -> None:
    result, elapsed = timed(initialized_home, "status", env={})
    one_line(result, 4, "the embedded broker is not running", "`kmsq worker`")
    assert elapsed < SAID_AT_ONCE_SECONDS, elapsed


@pytest.mark.process
@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({"KMSQ_PKCS11_MODULE": "/nonexistent/libpkcs11.so"}, "PKCS#11 library not found: /nonexistent/libpkcs11.so"),
        ({"KMSQ_PKCS11_TOKEN_LABEL": "no-such-token"}, "PKCS#11 token 'no-such-token' not found"),
        ({"KMSQ_PKCS11_PIN": "not-the-pin"}, "wrong PIN for PKCS#11 token"),
    ],
)
def test_a_worker_that_cannot_open_its_token_exits_3_before_it_says_ready(
    initialized_home: Path, env: dict[str, str], said: str
) -> None:
    """Issue 23, item 4: with a wrong KMSQ_PKCS11_MODULE the worker used to log "ready", take requests and never
    answer them (callers waited their whole timeout). Now it opens the token as a pool process would before it
    starts, and exits 3 with one line; its broker is not even started."""
    result, elapsed = timed(initialized_home, "worker", "--concurrency", "1", env=env)
    one_line(result, 3, "a worker of pool 'default' cannot serve", said)
    assert "ready" not in result.stdout + result.stderr
    assert elapsed < SAID_AT_ONCE_SECONDS, elapsed

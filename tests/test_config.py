"""Configuration: environment over file, defaults, PIN handling and redaction."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.config import load_settings, redact_url
from worker.errors import ConfigError


def test_defaults(tmp_path: Path) -> None:
    settings = load_settings({"KMSQ_HOME": str(tmp_path)})
    assert settings.home == tmp_path.resolve()
    assert settings.database_url == f"sqlite:///{tmp_path.resolve() / 'kmsq.db'}"
    assert settings.embedded_hsm and settings.pkcs11_token_label == "kmsq"
    assert settings.softhsm2_conf == tmp_path.resolve() / "softhsm2.conf"


def test_file_then_environment(tmp_path: Path) -> None:
    (tmp_path / "kmsq.toml").write_text(
        'database_url = "postgresql+psycopg://u:pw@db/kmsq"\npkcs11_module = "/opt/hsm/lib.so"\n'
        'pkcs11_token_label = "from-file"\n'
    )
    settings = load_settings({"KMSQ_HOME": str(tmp_path), "KMSQ_PKCS11_TOKEN_LABEL": "from-env"})
    assert settings.database_url == "postgresql+psycopg://u:pw@db/kmsq"
    assert settings.pkcs11_module == "/opt/hsm/lib.so" and not settings.embedded_hsm
    assert settings.pkcs11_token_label == "from-env"
    assert "pw" not in repr(settings)


def test_unknown_file_key_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "kmsq.toml").write_text('databse_url = "x"\n')
    with pytest.raises(ConfigError, match="databse_url"):
        load_settings({"KMSQ_HOME": str(tmp_path)})


def test_pin_sources(tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text("s3cret-pin\n")
    env = {"KMSQ_HOME": str(tmp_path), "KMSQ_PKCS11_MODULE": "/x.so"}
    assert load_settings({**env, "KMSQ_PKCS11_PIN_FILE": str(pin_file)}).read_pin() == "s3cret-pin"
    settings = load_settings({**env, "KMSQ_PKCS11_PIN": "direct-pin"})
    assert settings.read_pin() == "direct-pin" and "direct-pin" not in repr(settings)
    with pytest.raises(ConfigError, match="no PKCS#11 PIN"):
        load_settings(env).read_pin()
    with pytest.raises(ConfigError, match="cannot read PIN file"):
        load_settings({**env, "KMSQ_PKCS11_PIN_FILE": str(tmp_path / "missing")}).read_pin()


def test_missing_embedded_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("worker.config.SOFTHSM2_LIBRARY_PATHS", (str(tmp_path / "none.so"),))
    with pytest.raises(ConfigError, match="SoftHSM2 library not found"):
        load_settings({"KMSQ_HOME": str(tmp_path)}).module_path()


def test_redact_url() -> None:
    assert redact_url("postgresql+psycopg://user:pw@host/db") == "postgresql+psycopg://user:***@host/db"
    assert redact_url("redis://host:6379/0") == "redis://host:6379/0"


def test_secret_holder_redacts_and_wipes() -> None:
    import pickle

    from worker.secret import SecretBytes

    secret = SecretBytes(b"\x01" * 32)
    assert "01" not in repr(secret) and "redacted 32 bytes" in repr(secret)
    with pytest.raises(TypeError):
        pickle.dumps(secret)
    pinned = memoryview(secret.view())  # the wipe must zero in place even while a view is held
    secret.wipe()
    assert bytes(pinned) == bytes(32)
    pinned.release()
    other = SecretBytes(b"\x02" * 16)
    with other:
        pass
    assert len(other) == 0


def test_broker_and_clock_skew(tmp_path: Path) -> None:
    settings = load_settings({"KMSQ_HOME": str(tmp_path)})
    assert settings.embedded_broker
    assert settings.effective_broker_url == f"redis+socket://{tmp_path.resolve()}/broker.sock"
    assert settings.clock_skew_seconds == 300
    (tmp_path / "kmsq.toml").write_text('broker_url = "redis://broker:6379/2"\nclock_skew_seconds = 30\n')
    settings = load_settings({"KMSQ_HOME": str(tmp_path)})
    assert not settings.embedded_broker and settings.effective_broker_url == "redis://broker:6379/2"
    assert settings.clock_skew_seconds == 30
    assert load_settings({"KMSQ_HOME": str(tmp_path), "KMSQ_CLOCK_SKEW_SECONDS": "0"}).clock_skew_seconds == 0
    for bad in ("soon", "-5"):
        with pytest.raises(ConfigError, match="clock_skew_seconds"):
            load_settings({"KMSQ_HOME": str(tmp_path), "KMSQ_CLOCK_SKEW_SECONDS": bad})


def test_namespace_from_file_or_environment(tmp_path: Path) -> None:
    assert load_settings({"KMSQ_HOME": str(tmp_path)}).namespace is None
    (tmp_path / "kmsq.toml").write_text('namespace = "prod-eu"\n')
    assert load_settings({"KMSQ_HOME": str(tmp_path)}).namespace == "prod-eu"
    assert load_settings({"KMSQ_HOME": str(tmp_path), "KMSQ_NAMESPACE": "staging"}).namespace == "staging"
    for bad in ("Prod", "a:b", "x" * 33, "-lead", "sp ace"):
        with pytest.raises(ConfigError, match="KMSQ_NAMESPACE"):
            load_settings({"KMSQ_HOME": str(tmp_path), "KMSQ_NAMESPACE": bad})


def test_a_namespace_prefixes_every_redis_key_kombu_uses() -> None:
    from tasks.app import broker_connection, transport_options

    assert "global_keyprefix" not in transport_options(None)
    assert transport_options("prod-eu")["global_keyprefix"] == "prod-eu:"
    assert transport_options("prod-eu")["visibility_timeout"] == 300  # kmsq's own options stay
    connection = broker_connection("redis://127.0.0.1:6379/0", "prod-eu")
    assert dict(connection.transport_options or {})["global_keyprefix"] == "prod-eu:"
    with pytest.raises(ValueError, match="namespace"):
        transport_options("Bad:Name")


@pytest.mark.parametrize(("raw", "wanted"), [("", False), ("0", False), ("no", False), ("1", True), ("true", True)])
def test_require_sync_standby_is_a_flag(tmp_path: Path, raw: str, wanted: bool) -> None:
    env = {"KMSQ_HOME": str(tmp_path), "KMSQ_REQUIRE_SYNC_STANDBY": raw}
    assert load_settings(env).require_sync_standby is wanted


def test_require_sync_standby_refuses_anything_else(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="require_sync_standby must be 1 or 0, got 'maybe'"):
        load_settings({"KMSQ_HOME": str(tmp_path), "KMSQ_REQUIRE_SYNC_STANDBY": "maybe"})

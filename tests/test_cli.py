"""The ``kmsq`` command as an operator runs it: real subprocesses, an embedded SoftHSM2 token per test."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from tests.conftest import run_kmsq, softhsm_library

pytestmark = pytest.mark.hsm


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    softhsm_library()
    path = tmp_path_factory.mktemp("kmsq-home")
    first = run_kmsq(path, "init", "--json")
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert report["token_created"] is True and report["database_migrated_from"] is None
    assert report["root_key_created"]["type"] == "aes-256"
    return path


def test_init_is_idempotent(home: Path) -> None:
    again = run_kmsq(home, "init", "--json")
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert report["token_created"] is False and report["root_key_created"] is None
    assert report["database_migrated_from"] is not None
    keys = json.loads(run_kmsq(home, "root-key", "list", "--json").stdout)
    assert len([k for k in keys if k["pool"] == "default"]) == 1


def test_pin_files_are_private(home: Path) -> None:
    for name in ("hsm-user.pin", "hsm-so.pin"):
        mode = stat.S_IMODE((home / name).stat().st_mode)
        assert mode == 0o600, (name, oct(mode))
    assert len((home / "hsm-user.pin").read_text().strip()) >= 24


def test_root_key_create_list_rotate(home: Path) -> None:
    created = run_kmsq(home, "root-key", "create", "--type", "rsa-2048", "--pool", "eu-1", "--json")
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    assert (key["type"], key["pool"], key["version"]) == ("rsa-2048", "eu-1", 1)
    rotated = json.loads(run_kmsq(home, "root-key", "rotate", key["id"], "--json").stdout)
    assert rotated["versions"] == [1, 2]
    listed = run_kmsq(home, "root-key", "list")
    assert listed.returncode == 0 and key["id"] in listed.stdout and "eu-1" in listed.stdout
    by_id = {k["id"]: k for k in json.loads(run_kmsq(home, "root-key", "list", "--json").stdout)}
    assert by_id[key["id"]]["version"] == 2


@pytest.mark.queue
def test_demo_runs_every_operation_through_the_queue(home: Path) -> None:
    """The main job on the embedded default: SoftHSM2, SQLite and a private redis-server on a Unix socket."""
    result = run_kmsq(home, "demo", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["broker"].startswith("embedded") and report["worker"]["exit_code"] == 0
    steps = {step["op"]: step for step in report["steps"]}
    assert steps["decrypt_data_key"]["matches"] and steps["get_key"]["matches"]
    assert steps["generate_data_key_without_plaintext"]["fields"] == ["encryptedKey"]
    assert steps["put_key again"]["result"].startswith("conflict")
    assert steps["get_key source=backup"]["result"].startswith("not_found")
    assert steps["tampered signature"]["result"].startswith("unauthenticated")
    assert "ready." in (home / "worker.log").read_text()
    assert not (home / "broker.sock").exists()  # the demo stopped the broker it started
    again = run_kmsq(home, "demo")  # the registered demo caller and its identity are reused
    assert again.returncode == 0, again.stderr
    assert "worker stopped cleanly" in again.stdout


def _one_line_error(result: object, code: int, needle: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)  # type: ignore[attr-defined]
    lines = result.stderr.strip().splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 1 and lines[0].startswith("kmsq: error: ") and needle in lines[0], lines
    assert "Traceback" not in result.stderr  # type: ignore[attr-defined]


def test_wrong_pin(home: Path) -> None:
    _one_line_error(run_kmsq(home, "root-key", "create", env={"KMSQ_PKCS11_PIN": "wrong-pin"}), 3, "wrong PIN")


def test_missing_library(home: Path) -> None:
    env = {"KMSQ_PKCS11_MODULE": "/nonexistent/libhsm.so", "KMSQ_PKCS11_PIN": "1234"}
    _one_line_error(run_kmsq(home, "init", env=env), 3, "PKCS#11 library not found")


def test_unreachable_database(home: Path) -> None:
    env = {"KMSQ_DATABASE_URL": "postgresql+psycopg://kmsq:topsecret@127.0.0.1:1/kmsq"}
    result = run_kmsq(home, "init", env=env)
    _one_line_error(result, 4, "database unreachable")
    assert "topsecret" not in result.stderr


def test_malformed_database_url(home: Path) -> None:
    _one_line_error(run_kmsq(home, "root-key", "list", env={"KMSQ_DATABASE_URL": "not-a-url"}), 3, "malformed")


def test_unknown_root_key(home: Path) -> None:
    _one_line_error(run_kmsq(home, "root-key", "rotate", "rk-000000000000"), 5, "no root key")


def test_init_never_touches_an_external_token(tmp_path: Path, home: Path) -> None:
    """With KMSQ_PKCS11_MODULE set, init uses the token as it is: no token is created under KMSQ_HOME."""
    from worker.config import load_settings

    embedded = load_settings({"KMSQ_HOME": str(home)})
    env = {
        "KMSQ_PKCS11_MODULE": embedded.module_path(),
        "KMSQ_PKCS11_TOKEN_LABEL": "kmsq",
        "KMSQ_PKCS11_PIN_FILE": str(home / "hsm-user.pin"),
        "KMSQ_DATABASE_URL": f"sqlite:///{tmp_path / 'ext.db'}",
        "SOFTHSM2_CONF": str(home / "softhsm2.conf"),
    }
    result = run_kmsq(tmp_path / "external-home", "init", "--json", env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["token_created"] is False and report["hsm"] == embedded.module_path()
    assert not (tmp_path / "external-home" / "tokens").exists()
    missing = run_kmsq(tmp_path / "other", "init", env={**env, "KMSQ_PKCS11_TOKEN_LABEL": "absent"})
    _one_line_error(missing, 3, "token 'absent' not found")


def test_a_usage_error_inside_a_command_is_a_usage_error_not_an_internal_one(home: Path) -> None:
    """click's UsageError raised by a command's own checks (after its options parsed) exits 2 with click's message;
    one_line_errors once turned it into "internal error (UsageError)", exit 1."""
    cases = [
        (("gateway", "--tls-cert", str(home / "hsm-user.pin")), "--tls-cert and --tls-key go together"),
        (("signing-key", "adopt", "--owner", "wm"), "name the keys (--key XPUB ...) or --all"),
    ]
    for args, needle in cases:
        result = run_kmsq(home, *args)
        assert result.returncode == 2 and needle in result.stderr and "internal error" not in result.stderr, result

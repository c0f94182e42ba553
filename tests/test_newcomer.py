"""A newcomer's path, run as commands: `kmsq init`, `kmsq demo`, then a first call of their own. Each error on
the way says what to run next, and following it works; `scripts/run.sh --json` prints one JSON document."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from schemas.files import FILE_VERSION, FLEET_KIND
from schemas.wire import b64u
from tests.conftest import missing_service, run_kmsq, softhsm_library

ROOT = Path(__file__).resolve().parent.parent
KMSQ = shutil.which("kmsq") or str(Path(sys.executable).with_name("kmsq"))


def kmsq_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment run_kmsq gives a command: no KMSQ_* or SOFTHSM2_* of the test run's, and KMSQ_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KMSQ_", "SOFTHSM2_"))}
    return {**env, "KMSQ_HOME": str(home), **extra}


def one_line(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    """Asserts a one-line error with exit ``code`` containing every needle; returns the line."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kmsq: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def redis_server() -> None:
    if shutil.which("redis-server") is None:
        missing_service("redis-server (the embedded broker)")


def caller_identity(home: Path) -> Path:
    """A caller identity made with `kmsq caller keygen` (no HSM, no registration)."""
    made = run_kmsq(home, "caller", "keygen", "newcomer", "--dir", str(home / "callers"), "--json")
    assert made.returncode == 0, made.stderr
    return Path(json.loads(made.stdout)["identity"])


def a_fleet_file(path: Path) -> Path:
    """A well-formed fleet file of fresh keys (no deployment behind it)."""
    document = {
        "kind": FLEET_KIND,
        "v": FILE_VERSION,
        "default_pool": "default",
        "pools": {
            "default": {
                "signing_key": b64u(Ed25519PrivateKey.generate().public_key().public_bytes_raw()),
                "transport_key": b64u(X25519PrivateKey.generate().public_key().public_bytes_raw()),
                "root_keys": [],
            }
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))
    return path


@pytest.fixture
def embedded_broker(tmp_path: Path) -> Iterator[Path]:
    """KMSQ_HOME with the embedded broker running (started with `kmsq broker start`), stopped afterwards."""
    redis_server()
    started = run_kmsq(tmp_path, "broker", "start")
    assert started.returncode == 0, started.stderr
    try:
        yield tmp_path
    finally:
        run_kmsq(tmp_path, "broker", "stop")


# -- the errors of a caller command, each naming what to run ------------------------------------------------


@pytest.mark.process
def test_a_missing_fleet_file_names_the_export_command(tmp_path: Path) -> None:
    identity = caller_identity(tmp_path)
    default = tmp_path / "fleet.json"
    result = run_kmsq(tmp_path, "generate-data-key", "--identity", str(identity))
    one_line(result, 3, f"no fleet file at {default}", f"`kmsq fleet-key export --out {default}`", "`kmsq init`")
    elsewhere = tmp_path / "etc" / "fleet.json"
    result = run_kmsq(tmp_path, "generate-data-key", "--identity", str(identity), "--fleet", str(elsewhere))
    one_line(result, 3, f"no fleet file at {elsewhere}", f"`kmsq fleet-key export --out {elsewhere}`")


@pytest.mark.process
def test_a_missing_identity_names_keygen(tmp_path: Path) -> None:
    a_fleet_file(tmp_path / "fleet.json")
    absent = tmp_path / "billing.key.json"
    result = run_kmsq(tmp_path, "generate-data-key", "--identity", str(absent))
    one_line(result, 3, f"no caller identity at {absent}", "`kmsq caller keygen NAME`", "`kmsq caller add")
    one_line(run_kmsq(tmp_path, "generate-data-key"), 3, "--identity", "KMSQ_IDENTITY")


@pytest.mark.process
def test_the_embedded_broker_not_running_names_kmsq_worker(tmp_path: Path) -> None:
    identity = caller_identity(tmp_path)
    a_fleet_file(tmp_path / "fleet.json")
    began = time.monotonic()
    result = run_kmsq(tmp_path, "generate-data-key", "--identity", str(identity))
    elapsed = time.monotonic() - began
    one_line(result, 4, "the embedded broker is not running", str(tmp_path / "broker.sock"), "`kmsq worker`")
    assert elapsed < 15, elapsed  # the embedded broker is local: no long wait for it


@pytest.mark.process
def test_an_unreachable_broker_url_says_so_within_the_timeout(tmp_path: Path) -> None:
    identity = caller_identity(tmp_path)
    a_fleet_file(tmp_path / "fleet.json")
    env = {"KMSQ_BROKER_URL": "redis://:hunter2@127.0.0.1:1/0"}
    began = time.monotonic()
    result = run_kmsq(tmp_path, "generate-data-key", "--identity", str(identity), "--timeout", "3", env=env)
    elapsed = time.monotonic() - began
    line = one_line(result, 4, "cannot connect to the broker redis://:***@127.0.0.1:1/0", "KMSQ_BROKER_URL")
    assert "hunter2" not in line and "`kmsq worker`" not in line  # a worker starts no Redis of KMSQ_BROKER_URL
    assert elapsed < 15, elapsed


@pytest.mark.queue
def test_no_worker_is_a_timeout_that_names_kmsq_worker(embedded_broker: Path) -> None:
    home = embedded_broker
    identity = caller_identity(home)
    a_fleet_file(home / "fleet.json")
    result = run_kmsq(home, "generate-data-key", "--identity", str(identity), "--timeout", "1")
    one_line(result, 4, "no reply from a worker in time", "is a worker running", "`kmsq worker`", "`kmsq status`")


# -- the whole path, following the advice ---------------------------------------------------------------------


@pytest.mark.hsm
def test_init_writes_the_fleet_file(tmp_path: Path) -> None:
    softhsm_library()
    first = run_kmsq(tmp_path, "init", "--json")
    assert first.returncode == 0, first.stderr
    path = tmp_path / "fleet.json"
    assert json.loads(first.stdout)["fleet_file"] == {"path": str(path), "written": True}
    exported = run_kmsq(tmp_path, "fleet-key", "export")
    assert exported.returncode == 0, exported.stderr
    assert path.read_text() == exported.stdout  # what `kmsq fleet-key export --out` writes
    mtime = path.stat().st_mtime_ns
    again = run_kmsq(tmp_path, "init", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["fleet_file"] == {"path": str(path), "written": False}
    assert path.stat().st_mtime_ns == mtime  # idempotent: an unchanged file is left alone
    created = run_kmsq(tmp_path, "root-key", "create", "--pool", "eu-1", "--json")
    assert created.returncode == 0, created.stderr
    assert json.loads(run_kmsq(tmp_path, "init", "--json").stdout)["fleet_file"]["written"] is True
    assert sorted(json.loads(path.read_text())["pools"]) == ["default", "eu-1"]
    assert "fleet file" in run_kmsq(tmp_path, "init").stdout


@pytest.mark.hsm
@pytest.mark.queue
def test_the_first_call_after_the_demo(tmp_path: Path) -> None:
    """init, demo, then the demo caller's own first call: each error says what to run, and doing it works."""
    softhsm_library()
    redis_server()
    home = tmp_path
    assert run_kmsq(home, "init").returncode == 0
    demo = run_kmsq(home, "demo")
    assert demo.returncode == 0, demo.stderr
    identity = home / "callers" / "demo.key.json"
    assert f"generate-data-key --identity {identity}" in demo.stdout  # the demo says how to go on
    call = ("generate-data-key", "--identity", str(identity), "--timeout", "30")
    one_line(run_kmsq(home, *call), 4, "the embedded broker is not running", "`kmsq worker`")
    log = (home / "worker-newcomer.log").open("wb")
    worker = subprocess.Popen([KMSQ, "worker", "--concurrency", "1"], env=kmsq_env(home), stdout=log,
                              stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while b" ready." not in (home / "worker-newcomer.log").read_bytes():
            assert worker.poll() is None and time.monotonic() < deadline, (home / "worker-newcomer.log").read_text()
            time.sleep(0.1)
        key = run_kmsq(home, *call)
        assert key.returncode == 0, key.stderr
        assert set(json.loads(key.stdout)) == {"plaintextKey", "encryptedKey"}
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0
        log.close()
    try:  # the worker started the embedded broker and left it running: now nothing answers
        result = run_kmsq(home, "generate-data-key", "--identity", str(identity), "--timeout", "1")
        one_line(result, 4, "no reply from a worker in time", "`kmsq worker`")
    finally:
        run_kmsq(home, "broker", "stop")


# -- scripts/run.sh --json ------------------------------------------------------------------------------------


@pytest.mark.hsm
@pytest.mark.queue
def test_run_sh_json_prints_one_document(tmp_path: Path) -> None:
    softhsm_library()
    redis_server()
    # setup.sh checks this virtualenv (the test run's) and skips pip when it is installed already.
    env = kmsq_env(tmp_path / "home", KMSQ_VENV=sys.prefix)
    result = subprocess.run(["bash", str(ROOT / "scripts" / "run.sh"), "--json"], env=env, capture_output=True,
                            text=True, timeout=600, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert sorted(document) == ["demo", "init"]
    assert document["init"]["token_created"] is True and document["init"]["home"] == str(tmp_path / "home")
    assert document["demo"]["worker"]["exit_code"] == 0
    assert all(step.get("ok", True) and step.get("matches", True) for step in document["demo"]["steps"])
    assert "setup: done" in result.stderr  # the setup output went to stderr


# -- the docs count the gateway's endpoints ---------------------------------------------------------------


def test_the_docs_count_the_gateway_endpoints() -> None:
    """The README's count of the gateway's endpoints is the number of routes kmsq/gateway.py serves."""
    routes = re.findall(r'@app\.(get|post|put|delete)\("([^"]+)"', (ROOT / "kmsq" / "gateway.py").read_text())
    words = {4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}  # six: POST /key, GET /key/{pub},
    # POST /generateDataKey, /decryptDataKey, /key/generate and /sign
    assert f"serves its {words[len(routes)]} endpoints" in (ROOT / "README.md").read_text(), routes
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = " ".join(path.read_text().split())
        stale = re.findall(r"\b(?:four|five|seven) (?:endpoints|gateway endpoints)", text)
        assert not stale, (path.name, stale)

"""The caller and operator commands as subprocesses against the running workers (Redis, Postgres, SoftHSM2),
and the main job (`kmsq init` + `kmsq demo`) against Redis and Postgres."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from schemas.limits import MAX_PRV_BYTES
from tests.conftest import fresh_database, random_pub
from tests.queue_fixtures import Deployment, kmsq_command
from tests.test_gateway_signing import address_of_xpub, recovered_address
from tests.test_signing_psbt import EVERY_TESTNET_TYPE
from tests.utxo_lib import UtxoLib


def run(env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*kmsq_command(), *args], env=env, input=stdin, capture_output=True, text=True, timeout=120,
                          check=False)  # fmt: skip


def one_line(result: subprocess.CompletedProcess[str], exit_code: int, fragment: str) -> None:
    assert result.returncode == exit_code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kmsq: error: ") and fragment in lines[0], result.stderr


@pytest.fixture(scope="module")
def caller_env(deployment: Deployment, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A caller made and registered with the commands, with its identity and fleet file in the environment."""
    directory = tmp_path_factory.mktemp("cli-caller")
    env = deployment.env()
    made = run(env, "caller", "keygen", "cli", "--dir", str(directory), "--json")
    assert made.returncode == 0, made.stderr
    assert stat.S_IMODE((directory / "cli.key.json").stat().st_mode) == 0o600
    added = run(env, "caller", "add", "cli", "--public-key", str(directory / "cli.pub.json"), "--allow",
                "generate_data_key,generate_data_key_without_plaintext,decrypt_data_key,put_key,get_key,"
                "generate_signing_key,sign,sign_hash",
                "--all-root-keys", "--plaintext", "--json")  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["key_id"] == json.loads(made.stdout)["key_id"]
    exported = run(env, "fleet-key", "export", "--out", str(directory / "fleet.json"))
    assert exported.returncode == 0, exported.stderr
    return {**env, "KMSQ_IDENTITY": str(directory / "cli.key.json"), "KMSQ_FLEET": str(directory / "fleet.json")}


def test_fleet_file_lists_pools_and_root_keys(deployment: Deployment, caller_env: dict[str, str]) -> None:
    fleet = json.loads(Path(caller_env["KMSQ_FLEET"]).read_text())
    assert {"alpha", "beta"} <= set(fleet["pools"])
    assert deployment.roots[("beta", "rsa-2048")] in fleet["pools"]["beta"]["root_keys"]
    assert "private" not in json.dumps(fleet)


def test_data_key_commands(deployment: Deployment, caller_env: dict[str, str]) -> None:
    generated = run(caller_env, "generate-data-key", "--root-key", deployment.roots[("beta", "rsa-2048")])
    assert generated.returncode == 0, generated.stderr
    key = json.loads(generated.stdout)
    assert set(key) == {"plaintextKey", "encryptedKey"}
    deployment.secrets.append(key["plaintextKey"].encode())
    decrypted = run(caller_env, "decrypt-data-key", key["encryptedKey"])
    assert json.loads(decrypted.stdout) == {"plaintextKey": key["plaintextKey"]}
    bare = run(caller_env, "generate-data-key", "--without-plaintext")
    assert set(json.loads(bare.stdout)) == {"encryptedKey"}
    one_line(run(caller_env, "decrypt-data-key", "kmsq:v1:AAAA"), 7, "integrity")


def test_private_key_commands(deployment: Deployment, caller_env: dict[str, str], tmp_path: Path) -> None:
    pub, prv = random_pub() + "/+=", "xprv" + uuid.uuid4().hex
    deployment.secrets.append(prv.encode())
    prv_file = tmp_path / "prv.txt"
    prv_file.write_text(prv + "\n")
    args = ["--pub", pub, "--prv-file", str(prv_file), "--coin", "btc", "--source", "user", "--type", "tss"]
    stored = run(caller_env, "put-key", *args)
    assert stored.returncode == 0, stored.stderr
    assert json.loads(stored.stdout) == {"pub": pub, "coin": "btc", "source": "user", "type": "tss"}
    assert prv not in stored.stdout + stored.stderr
    fetched = run(caller_env, "get-key", pub, "--source", "user")
    assert json.loads(fetched.stdout) == {"pub": pub, "prv": prv, "coin": "btc", "source": "user", "type": "tss"}
    one_line(run(caller_env, "put-key", *args), 6, "conflict")
    one_line(run(caller_env, "get-key", pub, "--source", "backup"), 5, "not_found")


def test_signing_commands(caller_env: dict[str, str], utxo_lib: UtxoLib) -> None:
    """``kmsq generate-key`` and ``kmsq sign``: a wallet PSBT read from standard input (it may not fit on a command
    line) and checked by utxo-lib, an ETH hash signed by a key kept in the token, and the refusals' exit codes."""
    made = run(caller_env, "generate-key", "--coin", "tbtc", "--source", "user")
    assert made.returncode == 0, made.stderr
    user = json.loads(made.stdout)["pub"]
    xpubs = [user, *utxo_lib.keys()[1][1:]]
    unsigned = utxo_lib.build("testnet", xpubs, [EVERY_TESTNET_TYPE[3], EVERY_TESTNET_TYPE[4]])
    signed = run(caller_env, "sign", user, "-", "--source", "user", stdin=unsigned + "\n")
    assert signed.returncode == 0, signed.stderr
    assert utxo_lib.signed_by("testnet", xpubs, json.loads(signed.stdout)["signature"]) == [{"user"}, {"user"}]
    token = run(caller_env, "generate-key", "--coin", "hteth", "--source", "backup", "--in-hsm")
    assert token.returncode == 0, token.stderr
    pub = json.loads(token.stdout)["pub"]
    digest = os.urandom(32)
    eth = run(caller_env, "sign", pub, "0x" + digest.hex(), "--source", "backup")
    assert recovered_address(json.loads(eth.stdout)["signature"], digest) == address_of_xpub(pub)
    one_line(run(caller_env, "get-key", pub, "--source", "backup"), 12, "not_exportable")
    in_hsm_utxo = run(caller_env, "generate-key", "--coin", "tbtc", "--source", "user", "--in-hsm")
    one_line(in_hsm_utxo, 7, "ETH-like coins only")
    one_line(run(caller_env, "sign", user, "0x" + "00" * 32, "--source", "user"), 7, "not a PSBT")


def test_put_key_of_an_mpcv2_key_share_and_the_prv_limit(
    deployment: Deployment, caller_env: dict[str, str], tmp_path: Path
) -> None:
    """The wallet manager's MPCv2 share (330,000 base64 characters), a key of exactly 1 MiB, and one byte more."""
    share = base64.b64encode(os.urandom(247_500)).decode()
    deployment.secrets.append(share[999:1095].encode())
    limit = "k" * (MAX_PRV_BYTES - 8) + uuid.uuid4().hex[:8]
    for prv in (share, limit):
        pub = random_pub()
        (tmp_path / "prv").write_text(prv)
        args = ["--pub", pub, "--prv-file", str(tmp_path / "prv"), "--coin", "hteth", "--source", "user"]
        stored = run(caller_env, "put-key", *args, "--type", "tss")
        assert stored.returncode == 0, stored.stderr
        fetched = run(caller_env, "get-key", pub, "--source", "user")
        assert fetched.returncode == 0 and json.loads(fetched.stdout)["prv"].encode() == prv.encode()

    pub = random_pub()
    (tmp_path / "prv").write_text(limit + "k")
    before = deployment.count("private_keys")
    args = ["--pub", pub, "--prv-file", str(tmp_path / "prv"), "--coin", "hteth", "--source", "user", "--type", "tss"]
    one_line(run(caller_env, "put-key", *args), 7, "invalid: prv must be at most 1048576 bytes")
    assert deployment.count("private_keys") == before
    one_line(run(caller_env, "get-key", pub, "--source", "user"), 5, "not_found")


def test_fleet_key_export_creates_a_missing_directory(deployment: Deployment, tmp_path: Path) -> None:
    out = tmp_path / "new" / "dir" / "fleet.json"
    result = run(deployment.env(), "fleet-key", "export", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert {"alpha", "beta"} <= set(json.loads(out.read_text())["pools"])
    (tmp_path / "file").write_text("")
    one_line(run(deployment.env(), "fleet-key", "export", "--out", str(tmp_path / "file" / "fleet.json")), 3,
             "cannot write")  # fmt: skip


def test_caller_registry_commands(deployment: Deployment, caller_env: dict[str, str], tmp_path: Path) -> None:
    env = deployment.env()
    assert run(env, "caller", "keygen", "cli-ro", "--dir", str(tmp_path)).returncode == 0
    public = str(tmp_path / "cli-ro.pub.json")
    one_line(run(env, "caller", "add", "cli-ro", "--public-key", public, "--allow", "get_key"), 7, "exactly one")
    one_line(
        run(env, "caller", "add", "cli-ro", "--public-key", public, "--allow", "delete_key", "--all-root-keys"),
        7,
        "delete_key",
    )
    one_line(
        run(env, "caller", "add", "other", "--public-key", public, "--allow", "get_key", "--all-root-keys"), 7, "cli-ro"
    )
    root = deployment.roots[("alpha", "aes-256")]
    added = run(
        env, "caller", "add", "cli-ro", "--public-key", public, "--allow", "generate_data_key", "--root-keys", root
    )
    assert added.returncode == 0, added.stderr
    one_line(
        run(env, "caller", "add", "cli-ro", "--public-key", public, "--allow", "get_key", "--all-root-keys"),
        6,
        "exists",
    )
    listed = {c["name"]: c for c in json.loads(run(env, "caller", "list", "--json").stdout)}
    assert listed["cli-ro"]["root_keys"] == [root] and listed["cli-ro"]["plaintext"] is False
    assert "cli-ro" in run(env, "caller", "list").stdout
    ro_env = {**caller_env, "KMSQ_IDENTITY": str(tmp_path / "cli-ro.key.json")}
    one_line(run(ro_env, "generate-data-key"), 9, "forbidden")  # no plaintext permission
    assert run(env, "caller", "disable", "cli-ro").returncode == 0
    time.sleep(1.1)  # workers cache callers for KMSQ_CACHE_SECONDS (1 in these tests)
    one_line(run(ro_env, "generate-data-key"), 8, "unauthenticated")
    one_line(run({**caller_env, "KMSQ_IDENTITY": str(tmp_path / "absent.key.json")}, "generate-data-key"), 3, "absent")


def test_main_job_on_redis_and_postgres(deployment: Deployment, tmp_path: Path) -> None:
    """`kmsq init` and `kmsq demo` with KMSQ_BROKER_URL and KMSQ_DATABASE_URL set."""
    with fresh_database("kmsq_demo") as database_url:
        env = {
            **deployment.env(),
            "KMSQ_HOME": str(tmp_path / "home"),
            "KMSQ_DATABASE_URL": database_url,
            "KMSQ_DEFAULT_POOL": "default",
        }
        assert run(env, "init").returncode == 0
        result = run(env, "demo", "--json")
        assert result.returncode == 0, result.stderr + (tmp_path / "home" / "worker.log").read_text()[-2000:]
        report = json.loads(result.stdout)
        assert report["broker"] == "KMSQ_BROKER_URL" and report["worker"]["exit_code"] == 0
        assert all(step.get("matches", True) and step.get("ok", True) for step in report["steps"])
        assert not (tmp_path / "home" / "broker.sock").exists()

"""`kmsq provision` as a subprocess against the running workers: interrupted (SIGINT, SIGKILL) and resumed, it
writes exactly N distinct keys, each decryptable; `--put-from` stores keys with per-item errors."""

from __future__ import annotations

import json
import signal
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tasks.client import KmsClient
from tests.conftest import random_pub
from tests.queue_fixtures import Deployment, kmsq_command


@pytest.fixture(scope="module")
def caller_env(deployment: Deployment) -> dict[str, str]:
    """The environment of a caller command for a caller allowed everything."""
    deployment.register("provisioner")
    fleet = deployment.directory / "provision-fleet.json"
    fleet.write_text(json.dumps(deployment.service.fleet_document()))
    identity = deployment.directory / "callers" / "provisioner.key.json"
    return deployment.env(KMSQ_IDENTITY=str(identity), KMSQ_FLEET=str(fleet))


def provision(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*kmsq_command(), "provision", *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def interrupt_midway(env: dict[str, str], args: list[str], out: Path, sig: signal.Signals, after_lines: int) -> None:
    # A suite started in the background by a non-interactive shell inherits SIGINT ignored; the job must not.
    process = subprocess.Popen(
        [*kmsq_command(), "provision", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if out.exists() and out.read_text().count("\n") >= after_lines:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the job finished before it could be interrupted; make it longer"
    process.send_signal(sig)
    process.wait(timeout=60)
    assert process.returncode != 0


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["sigkill", "sigint"])
def test_interrupted_and_resumed_job_has_exactly_n_keys(
    deployment: Deployment,
    client: KmsClient,
    caller_env: dict[str, str],
    tmp_path: Path,
    sig: signal.Signals,
) -> None:
    out = tmp_path / "keys.jsonl"
    args = ["--count", "4000", "--batch", "100", "--in-flight", "2", "--with-plaintext", "--out", str(out),
            "--job", f"t-{sig.name.lower()}", "--json"]  # fmt: skip
    interrupt_midway(caller_env, args, out, sig, after_lines=600)
    partial = out.read_text().count("\n")
    assert 0 < partial < 4000
    resumed = provision(caller_env, *args)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["already_done"] + summary["keys"] == 4000 and summary["errors"] == 0
    rows = lines(out)
    assert len(rows) == 4000
    assert len({r["id"] for r in rows}) == 4000 and len({r["plaintextKey"] for r in rows}) == 4000
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    deployment.secrets += [r["plaintextKey"].encode() for r in rows[:3]]
    for start in range(0, 4000, 1000):
        chunk = rows[start : start + 1000]
        decrypted = client.decrypt_data_keys([r["encryptedKey"] for r in chunk])["items"]
        assert [d["plaintextKey"] for d in decrypted] == [r["plaintextKey"] for r in chunk]
    again = provision(caller_env, *args)  # a finished job re-run sends nothing
    assert again.returncode == 0 and json.loads(again.stdout)["keys"] == 0 and len(lines(out)) == 4000


def test_resume_with_other_parameters_is_refused(caller_env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "keys.jsonl"
    assert provision(caller_env, "--count", "10", "--out", str(out), "--job", "p1", "--json").returncode == 0
    other = provision(caller_env, "--count", "20", "--out", str(out), "--job", "p1")
    assert other.returncode == 2 and "other parameters" in other.stderr
    wrong_job = provision(caller_env, "--count", "10", "--out", str(out), "--job", "p2")
    assert wrong_job.returncode == 2 and "--job p1" in wrong_job.stderr


def test_put_from_file_with_per_item_errors(
    deployment: Deployment,
    client: KmsClient,
    caller_env: dict[str, str],
    tmp_path: Path,
) -> None:
    source = tmp_path / "keys.jsonl"
    items = [{"pub": random_pub(), "prv": f"xprv-{i}-" + "z" * 40, "coin": "btc", "source": "user", "type": "tss"}
             for i in range(250)]  # fmt: skip
    items[17]["coin"] = "NOT\tA COIN"
    items[120]["pub"] = items[119]["pub"]  # a duplicate within the file
    deployment.secrets += [i["prv"].encode() for i in items[:3]]
    source.write_text("".join(json.dumps(i) + "\n" for i in items))
    out = tmp_path / "stored.jsonl"
    result = provision(caller_env, "--put-from", str(source), "--batch", "100", "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["keys"], summary["errors"]) == (248, 2)
    rows = {r["line"]: r for r in lines(out)}
    assert len(rows) == 250 and rows[18]["error"] == "invalid" and rows[121]["error"] == "conflict"
    written = out.read_text()
    assert all(item["prv"] not in written for item in items)  # the output holds public fields only
    assert client.get_key(items[200]["pub"], "user")["prv"] == items[200]["prv"]


def test_put_from_large_keys_splits_batches_by_size(
    deployment: Deployment, client: KmsClient, caller_env: dict[str, str], tmp_path: Path
) -> None:
    """30 MPCv2-sized shares (10 MB) under --batch 1000: the batches also stay within one message's size."""
    import base64
    import os

    items = [{"pub": random_pub(), "prv": base64.b64encode(os.urandom(247_500)).decode(), "coin": "hteth",
              "source": "backup", "type": "tss"} for _ in range(30)]  # fmt: skip
    deployment.secrets += [i["prv"][999:1095].encode() for i in items[:2]]
    source = tmp_path / "shares.jsonl"
    source.write_text("".join(json.dumps(i) + "\n" for i in items))
    out = tmp_path / "stored.jsonl"
    result = provision(caller_env, "--put-from", str(source), "--batch", "1000", "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    assert (json.loads(result.stdout)["keys"], json.loads(result.stdout)["errors"]) == (30, 0)
    written = lines(out)
    assert sorted(r["line"] for r in written) == list(range(1, 31)) and len({r["batch"] for r in written}) >= 2
    for item in items[::7]:
        assert client.get_key(item["pub"], "backup")["prv"] == item["prv"]


def test_a_job_over_its_callers_quota_backs_off_and_completes(deployment: Deployment, tmp_path: Path) -> None:
    """A caller allowed 2,000 items a second provisions 6,000 keys in batches of 1,000, four in flight: the batches
    its quota refuses wait and go again (the same journaled requests), and every key is there once."""
    from worker import callers
    from worker.storage.db import transaction

    deployment.register("metered-provisioner")
    with transaction(deployment.sessions) as db:
        callers.set_caller_limits(deployment.service.hsm, db, "metered-provisioner", "auto", None, 2000)
    fleet = deployment.directory / "provision-fleet.json"
    fleet.write_text(json.dumps(deployment.service.fleet_document()))
    identity = deployment.directory / "callers" / "metered-provisioner.key.json"
    env = deployment.env(KMSQ_IDENTITY=str(identity), KMSQ_FLEET=str(fleet))
    out = tmp_path / "keys.jsonl"
    started = time.monotonic()
    done = provision(env, "--count", "6000", "--batch", "1000", "--in-flight", "4", "--out", str(out), "--json")
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["keys"] == 6000 and summary["errors"] == 0 and summary["rate_limited"] >= 1
    assert elapsed >= 2.0  # a bucket of 2,000 and 2,000 a second: 6,000 items need two seconds of refill at least
    rows = lines(out)
    assert len(rows) == 6000 and len({r["encryptedKey"] for r in rows}) == 6000
    journal = [json.loads(line) for line in out.with_name(out.name + ".job").read_text().splitlines()[1:]]
    assert len(journal) == 6  # one journaled request per batch: a refused batch was sent again as it was

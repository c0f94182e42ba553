"""Signing rules against real workers (issue 26): Redis, Postgres, the run's SoftHSM2 token and worker processes.
Two workers and 50 concurrent signatures of 1 BTC each under a window of 10 BTC sign exactly 10 (the window lock
per scope); a redelivered sign counts once; a refusal is ``policy_denied`` and leaves no signing log entry."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from embit import bip32, script
from embit.networks import NETWORKS
from sqlalchemy import func, select

from tasks.client import KmsClient, KmsError
from tasks.identity import CallerIdentity
from tests.queue_fixtures import Deployment, WorkerProcess, start_worker
from tests.utxo_lib import UtxoLib
from worker.signing_rule_rows import set_rules
from worker.storage.db import transaction
from worker.storage.models import RequestRecord, SigningLogEntry

pytestmark = [pytest.mark.hsm, pytest.mark.process]
BTC = 100_000_000
POOL = "alpha"
CACHE_SECONDS = 1  # KMSQ_CACHE_SECONDS of the deployment's workers (tests.queue_fixtures.subprocess_env)
PAYEE = str(script.p2wpkh(bip32.HDKey.from_seed(b"\x07" * 32).key.get_public_key()).address(NETWORKS["test"]))


@pytest.fixture(scope="module")
def signer(deployment: Deployment) -> CallerIdentity:
    return deployment.register("rules-signer", ("generate_signing_key", "sign", "sign_hash"))


@pytest.fixture(scope="module")
def second_worker(deployment: Deployment, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """A second worker process of the pool, beside the deployment's own."""
    worker = start_worker(POOL, 2, deployment.env(), tmp_path_factory.mktemp("rules") / "worker.log")
    try:
        yield worker
    finally:
        worker.stop()


def _wallet(client: KmsClient, utxo_lib: UtxoLib) -> list[str]:
    """A wallet whose user key kmsq generated: [user, backup, bitgo] xpubs."""
    user = client.generate_signing_key("tbtc", "user")["pub"]
    _xprvs, xpubs = utxo_lib.keys()
    return [user, xpubs[1], xpubs[2]]


def _spend(utxo_lib: UtxoLib, xpubs: list[str], index: int, amount: int = BTC) -> str:
    inputs = [{"scriptType": "p2wsh", "signer": "user", "cosigner": "bitgo", "index": index, "value": amount + 51_000}]
    outputs = [{"address": PAYEE, "value": amount}, {"scriptType": "p2wsh", "index": index, "value": 50_000}]
    return utxo_lib.build("testnet", xpubs, inputs, outputs, global_xpubs=True)


def _key_rules(deployment: Deployment, pub: str, rules: dict[str, object]) -> None:
    from schemas.signing_rules import parse_rules

    with transaction(deployment.sessions) as db:
        set_rules(deployment.service.hsm, db, f"key:{pub}", parse_rules(json.dumps(rules)))
    time.sleep(CACHE_SECONDS + 0.5)  # every worker reads the rules again


def _logged(deployment: Deployment, pub: str) -> int:
    with deployment.sessions() as db:
        return int(db.scalar(select(func.count()).select_from(SigningLogEntry).where(SigningLogEntry.pub == pub)) or 0)


def test_two_workers_and_fifty_concurrent_signs_keep_a_window_of_ten(
    deployment: Deployment, signer: CallerIdentity, second_worker: WorkerProcess, utxo_lib: UtxoLib
) -> None:
    with deployment.client(signer, timeout=120) as client:
        xpubs = _wallet(client, utxo_lib)
        _key_rules(deployment, xpubs[0], {"window": {"seconds": 3600, "max_payment": 10 * BTC}})
        payloads = [_spend(utxo_lib, xpubs, i) for i in range(50)]
        futures = [client.submit_sign(xpubs[0], "user", p, pool=POOL) for p in payloads]
        signed, refused = 0, []
        for future in futures:
            try:
                client.wait(future)
                signed += 1
            except KmsError as e:
                refused.append((e.code, e.message))
    assert signed == 10, refused[:3]
    assert len(refused) == 40 and all(code == "policy_denied" and "signing rule window of key:" in message
                                      for code, message in refused)  # fmt: skip
    assert _logged(deployment, xpubs[0]) == 10
    assert "serves pool" in second_worker.log.read_text()  # both workers served the pool meanwhile


def test_a_redelivered_sign_counts_once(deployment: Deployment, signer: CallerIdentity, utxo_lib: UtxoLib) -> None:
    with deployment.client(signer) as client:
        xpubs = _wallet(client, utxo_lib)
        _key_rules(deployment, xpubs[0], {"window": {"seconds": 3600, "max_payment": 2 * BTC}})
        request_id = uuid.uuid4()
        params = {"op": "sign", "pub": xpubs[0], "source": "user", "payload": _spend(utxo_lib, xpubs, 0),
                  "algorithm": "ecdsa"}  # fmt: skip
        request, args = client.build_request(params, POOL, request_id)
        signatures = []
        for _ in range(3):  # the same message delivered three times
            future = client.expect(request_id)
            client.send(request, args)
            signatures.append(client.wait(future)["signature"])
        assert signatures[0] == signatures[1] == signatures[2]
        assert _logged(deployment, xpubs[0]) == 1
        # The window saw 1 BTC, not 3: a second BTC still passes, a third does not.
        client.sign(xpubs[0], "user", _spend(utxo_lib, xpubs, 1), pool=POOL)
        with pytest.raises(KmsError) as error:
            client.sign(xpubs[0], "user", _spend(utxo_lib, xpubs, 2), pool=POOL)
        assert error.value.code == "policy_denied"
    with deployment.sessions() as db:
        refused = db.scalars(select(RequestRecord).where(RequestRecord.error_code == "policy_denied")).all()
    assert refused and _logged(deployment, xpubs[0]) == 2


def test_the_exit_code_of_a_refusal(deployment: Deployment, signer: CallerIdentity, utxo_lib: UtxoLib,
                                    tmp_path: Path) -> None:  # fmt: skip
    """``kmsq sign`` exits 13 on policy_denied, the message naming the rule."""
    import subprocess

    from tests.queue_fixtures import kmsq_command

    with deployment.client(signer) as client:
        xpubs = _wallet(client, utxo_lib)
    _key_rules(deployment, xpubs[0], {"max_payment": BTC - 1})
    fleet = tmp_path / "fleet.json"
    fleet.write_text(json.dumps(deployment.service.fleet_document()))
    done = subprocess.run(
        [*kmsq_command(), "sign", xpubs[0], _spend(utxo_lib, xpubs, 0), "--source", "user", "--pool", POOL,
         "--identity", str(deployment.directory / "callers" / "rules-signer.key.json"), "--fleet", str(fleet)],
        env=deployment.env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 13, done.stdout + done.stderr
    assert "policy_denied" in done.stderr and "signing rule max_payment of key:" in done.stderr


def test_concurrent_signs_coalesce_into_batches_and_the_log_lists_them(
    deployment: Deployment, signer: CallerIdentity, tmp_path: Path
) -> None:
    """Through a coalescing client, 40 concurrent ETH hash signatures travel as sign_many batches (a key opened
    once per batch); each is logged, and ``kmsq signing-log`` lists them."""
    import subprocess

    from tests.queue_fixtures import kmsq_command
    from worker.storage.models import AuditRecord

    with deployment.client(signer, coalesce=True) as client:
        pub = client.generate_signing_key("hteth", "user", pool=POOL)["pub"]
        futures = [client.submit_sign(pub, "user", "0x" + uuid.uuid4().hex * 2, pool=POOL) for _ in range(40)]
        signatures = [client.wait(f)["signature"] for f in futures]
    assert len(set(signatures)) == 40 and all(s.startswith("0x") and len(s) == 132 for s in signatures)
    with deployment.sessions() as db:
        actions = list(
            db.scalars(
                select(AuditRecord.action).where(
                    AuditRecord.actor == "rules-signer", AuditRecord.action.in_(("sign", "sign_many"))
                )
            )
        )
    assert "sign_many" in actions, actions  # at least one batch
    listed = subprocess.run([*kmsq_command(), "signing-log", "--key", pub, "--limit", "100", "--json"],
                            env=deployment.env(), capture_output=True, text=True, timeout=60)  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    entries = json.loads(listed.stdout)
    assert (
        len(entries) == 40
        and {e["kind"] for e in entries} == {"hash"}
        and {e["caller"] for e in entries} == {"rules-signer"}
    )

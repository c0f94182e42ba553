"""Issue 25's tests on real components: Postgres, Redis, SoftHSM2 and a real worker, with a 2-of-3 operator set.
One operator alone cannot add a caller (the proposal stays pending and the worker refuses the caller); an
approval for another digest, an expired proposal and the same operator twice do not count; a second operator's
approval adds it and the worker serves it; one operator's disable takes effect within KMSQ_CACHE_SECONDS; every
step is in the audit chain and `kmsq audit verify` passes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from schemas.quorum import OperatorIdentity
from tasks.client import KmsClient, KmsError, KmsTimeout
from tasks.identity import CallerIdentity, Fleet
from tests.conftest import fresh_database, host_env, run_kmsq, softhsm_library
from tests.conftest import kmsq_ok as _ok
from tests.conftest import kmsq_refused as _refused
from tests.queue_fixtures import delete_namespace, start_worker

pytestmark = [pytest.mark.hsm, pytest.mark.process]
CACHE_SECONDS = 1  # tests.conftest.host_env
OPERATION = "generate_data_key_without_plaintext"  # what the caller may do


def test_two_of_three_operators_against_a_real_worker(tmp_path: Path, redis_url: str) -> None:
    softhsm_library()
    namespace = f"dual-{uuid.uuid4().hex[:10]}"
    home, keys = tmp_path / "home", tmp_path / "operators"
    with fresh_database("kmsq_dual") as url:
        env = host_env(home, url, redis_url, namespace) | {"KMSQ_DEFAULT_POOL": "default"}

        def kmsq(*args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
            return run_kmsq(home, *args, env=env | ({"KMSQ_OPERATOR_KEY": key} if key else {}))

        for name in ("alice", "bob", "carol"):
            _ok(kmsq("operator", "keygen", name, "--dir", str(keys), "--no-passphrase"))
        key = {n: str(keys / f"{n}.operator.json") for n in ("alice", "bob", "carol")}
        trio = ",".join(str(keys / f"{n}.operator.pub.json") for n in ("alice", "bob", "carol"))
        adoption = _ok(kmsq("init", "--operators", trio, "--quorum", "2", "--json"))["operators"]["adoption_proposal"]
        for name in ("alice", "bob", "carol"):
            _ok(kmsq("approve", str(adoption), "--operator-key", key[name]))
        _ok(kmsq("caller", "keygen", "wallet", "--dir", str(tmp_path / "callers")))
        identity = CallerIdentity.load(tmp_path / "callers" / "wallet.key.json")
        fleet = Fleet.from_document(json.loads(run_kmsq(home, "fleet-key", "export", env=env).stdout))
        add = ("caller", "add", "wallet", "--public-key", str(tmp_path / "callers" / "wallet.pub.json"), "--allow",
               OPERATION, "--all-root-keys")  # fmt: skip
        worker = start_worker("default", 1, env, tmp_path / "worker.log")
        try:
            with KmsClient(redis_url, identity, fleet, timeout=3, namespace=namespace) as client:
                # One operator alone: refused at the command; the proposal stays pending; the worker refuses.
                _refused(kmsq(*add, key=key["alice"]), 9, "needs 2 of the 3 operators")
                proposal = _ok(kmsq("propose", *add, "--operator-key", key["alice"], "--json"))
                _refused(kmsq("approve", str(proposal["id"]), "--operator-key", key["alice"]), 6, "already")
                assert _ok(kmsq("proposals", "show", str(proposal["id"]), "--json"))["state"] == "pending"
                with pytest.raises(KmsTimeout):  # an unknown caller gets no reply
                    client.generate_data_key(with_plaintext=False)

                # An approval over another digest, and one of an expired proposal, do not count.
                short = _short_proposal(env, tmp_path / "callers" / "wallet.pub.json")  # a second to approve it in
                run_kmsq(home, "proposals", "show", short, "--document", str(tmp_path / "short.json"), env=env)
                signed = run_kmsq(home, "operator", "sign", str(tmp_path / "short.json"), "--operator-key",
                                  key["bob"], env=env)  # fmt: skip
                (tmp_path / "bob-short.json").write_text(signed.stdout)
                _refused(kmsq("approve", str(proposal["id"]), "--approval", str(tmp_path / "bob-short.json")), 9,
                         "for another change")  # fmt: skip
                time.sleep(2.0)  # the short proposal expires
                _refused(kmsq("approve", short, "--operator-key", key["bob"]), 6, "expired")

                # A second operator: applied, and the worker serves the caller.
                done = _ok(kmsq("approve", str(proposal["id"]), "--operator-key", key["bob"], "--json"))
                assert done["state"] == "applied" and set(done["approved_by"]) == {"alice", "bob"}
                client.timeout = 30
                assert client.generate_data_key(with_plaintext=False)["encryptedKey"]

                # One operator disables it; the worker refuses it within the cache period.
                _ok(kmsq("caller", "disable", "wallet", key=key["carol"]))
                started, code = time.monotonic(), None
                while code != "unauthenticated":
                    try:
                        client.generate_data_key(with_plaintext=False)
                    except KmsError as e:
                        code = e.code
                    assert time.monotonic() - started < CACHE_SECONDS + 3, "the disable did not reach the worker"
                took = time.monotonic() - started
                assert took <= CACHE_SECONDS + 2, took
        finally:
            worker.stop()
            delete_namespace(redis_url, namespace)
        records = _ok(kmsq("audit", "tail", "-n", "500", "--json"))
        mine = [r["action"] for r in records if str(proposal["id"]) in r["detail"]]
        assert mine == ["proposal", "approval", "approval", "proposal applied"], mine
        assert any(r["action"] == "caller disable" for r in records)
        verified = kmsq("audit", "verify")
        assert verified.returncode == 0 and "intact" in verified.stdout, verified.stdout + verified.stderr


def _short_proposal(env: dict[str, str], public_key: Path) -> str:
    """Carol's proposal of the same caller, expiring a second after it is made (the command's shortest expiry is
    36 s), made through worker.proposals on the deployment's own database and token in a process of its own: the
    PKCS#11 library reads SOFTHSM2_CONF once per process, and this one may already have read another test's.
    Returns its id."""
    made = subprocess.run([sys.executable, "-c", f"from {__name__} import _propose_short; _propose_short()",
                           str(public_key)], env=env, cwd=Path(__file__).resolve().parent.parent,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert made.returncode == 0, made.stdout + made.stderr
    return made.stdout.strip().splitlines()[-1]


def _propose_short() -> None:
    """_short_proposal's process: proposes, approves as carol, prints the proposal's id."""
    from schemas.quorum import approve
    from worker import callers, proposals
    from worker.config import load_settings
    from worker.operators import read_pinned
    from worker.runtime import KeyService

    settings = load_settings(dict(os.environ))
    service = KeyService.from_settings(settings)
    carol = OperatorIdentity.load(Path(os.environ["KMSQ_HOME"]).parent / "operators" / "carol.operator.json")
    identity = callers.read_public_identity(Path(sys.argv[1]))
    arguments = {"name": "wallet", "signing_key": identity.signing_key, "reply_key": identity.reply_key,
                 "allowed_ops": [OPERATION], "root_keys": None, "plaintext": False}  # fmt: skip
    try:
        with service.sessions() as db:
            sets = proposals.deployment_sets(db, read_pinned(settings.operator_set_file))
        made = proposals.propose(service.hsm, service.sessions, sets, "caller.add", arguments, "carol",
                                 ttl_hours=1 / 3600)  # fmt: skip
        proposals.add_approval(service.hsm, service.sessions, sets, made.id, approve(carol, made.digest))
        print(made.id)
    finally:
        service.engine.dispose()

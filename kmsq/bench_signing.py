"""The signing figures of ``kmsq bench`` (K): signatures per second through the queue for ETH operation hashes
(a sealed xprv, and a key kept in the token) and for a 10-input wallet PSBT, each as a ratio to C (one
``generate_data_key`` round trip) measured by the same run with the same workers.

The PSBT is shaped like a BitGo wallet's (2-of-3 p2wsh inputs, per-input ``bip32Derivation`` of the three wallet
keys at ``m/0/0/20/<index>``), built here with embit so that the benchmark needs no node.js; the interop tests
check kmsq's signatures on PSBTs built by BitGo's own utxo-lib.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

PSBT_INPUTS = 10
_P2WSH_CHAIN = 20


def wallet_psbt(xpubs: list[str], inputs: int = PSBT_INPUTS) -> str:
    """Returns the hex of an unsigned PSBT spending ``inputs`` 2-of-3 p2wsh outputs of the wallet ``xpubs``
    (user, backup, bitgo; depth-0 roots) to one output, each input at ``m/0/0/20/<i>``."""
    from embit import bip32, script
    from embit.psbt import PSBT, DerivationPath
    from embit.transaction import Transaction, TransactionInput, TransactionOutput

    roots = [bip32.HDKey.from_string(xpub) for xpub in xpubs]
    vin, details = [], []
    for index in range(inputs):
        path = [0, 0, _P2WSH_CHAIN, index]
        pubs = [root.derive(path).key for root in roots]
        witness_script = script.multisig(2, pubs)
        vin.append(TransactionInput(secrets.token_bytes(32), index % 4))
        details.append((witness_script, pubs, path))
    change = script.p2wsh(details[0][0])
    psbt = PSBT(Transaction(vin=vin, vout=[TransactionOutput(inputs * 90_000, change)]))
    for inp, (witness_script, pubs, path) in zip(psbt.inputs, details, strict=True):
        inp.witness_utxo = TransactionOutput(100_000, script.p2wsh(witness_script))
        inp.witness_script = witness_script
        for root, pub in zip(roots, pubs, strict=True):
            inp.bip32_derivations[pub] = DerivationPath(root.my_fingerprint, path)
    return str(psbt.serialize().hex())


def random_xpub() -> str:
    """Returns the xpub of a fresh random BIP32 root (a wallet key kmsq does not hold)."""
    from embit import bip32

    return str(bip32.HDKey.from_seed(secrets.token_bytes(64)).to_public().to_string())


def measure_signing(
    client: Any,
    root_key: str,
    count: int,
    in_flight: int,
    run_window: Callable[..., dict[str, Any]],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Returns K: ``sign`` round trips per second (and latencies) for ETH hashes with a sealed xprv, with a
    token key, and for one 10-input PSBT (signatures per second = PSBTs per second x 10)."""
    eth = client.generate_signing_key("hteth", "user", "independent", root_key)["pub"]
    eth_token = client.generate_signing_key("hteth", "user", "independent", root_key, in_hsm=True)["pub"]
    btc = client.generate_signing_key("tbtc", "user", "independent", root_key)["pub"]
    psbt = wallet_psbt([btc, random_xpub(), random_xpub()])

    def signer(pub: str, payload: Callable[[], str]) -> Callable[[int], Future[Any]]:
        def start(_: int) -> Future[Any]:
            future: Future[Any] = client.submit_sign(pub, "user", payload(), "ecdsa", client.pool_for(root_key))
            return future

        return start

    def eth_hash() -> str:
        return "0x" + secrets.token_hex(32)

    out: dict[str, Any] = {}
    for name, start, total, per_call in (
        ("eth_hash", signer(eth, eth_hash), count, 1),
        ("eth_hash_in_hsm", signer(eth_token, eth_hash), count, 1),
        (f"psbt_{PSBT_INPUTS}_inputs", signer(btc, lambda: psbt), max(2, count // 4), PSBT_INPUTS),
    ):
        log(f"K sign: {name}")
        run_window(min(10, total), in_flight, start)  # warm-up
        out[name] = run_window(total, in_flight, start, per_call) | {"signatures_per_call": per_call}
    out["psbt_bytes"] = len(psbt) // 2
    return out


def measure_raw_signing(svc: Any, root_key: str, pool: str, count: int) -> dict[str, Any]:
    """K raw: what one ETH hash signature costs without a queue, in this process: the sealed xprv opened in the
    HSM, its key taken, the hash signed with libsecp256k1 (``worker.signing``), one key at a time, as A is to a
    data key. The key is generated here (its row stays, owned by no caller)."""
    import time

    from kmsq.bench_common import summarize
    from worker import service, signing
    from worker.storage.db import transaction

    with transaction(svc.sessions) as db:
        pub = service.generate_signing_key(svc.hsm, db, coin="hteth", source="user", type="independent",
                                           root_key_id=root_key, pool=pool).pub  # fmt: skip
    with svc.sessions() as db:
        row = service.private_key_row(db, pub, "user", for_signing=True)
        for _ in range(10):
            signing.sign(
                service.open_private_key(svc.hsm, db, row).prv, signing.Signable(digest=secrets.token_bytes(32))
            )
        latencies = []
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(count):
            t = time.perf_counter()
            key = service.open_private_key(svc.hsm, db, row)
            signing.sign(key.prv, signing.Signable(digest=secrets.token_bytes(32)))
            latencies.append(time.perf_counter() - t)
        cpu_ms = round((time.process_time() - cpu) * 1000 / count, 4)
    per_item = {"client": cpu_ms, "total": cpu_ms}
    return {**summarize(count, time.perf_counter() - start, latencies), "cpu_ms_per_item": per_item}

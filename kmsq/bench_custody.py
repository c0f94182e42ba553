"""``python -m kmsq.bench_custody``: what key custody costs (docs/PERFORMANCE.md, "Key custody").

- **K1, keys replicated per second.** Token A wraps every root key for token B (``export``: AES key wrap with
  padding under a replication key that RSA-OAEP carries, inside A) and B unwraps and checks each one's key check
  value (``import``); the baseline, measured in the same run on token A, is data keys generated per second
  (CKM_AES_KEY_WRAP_PAD of a fresh key under a root key).
- **K2, backup and restore of every root key.** ``kmsq backup create``, then ``kmsq backup restore`` (each the
  command, in its own process, as an operator runs it) into a new token, with the deployment's database
  holding ``--stored`` private keys (1,000 and 100,000 by default), alternating, ``--repeat`` times each. The
  rows stay in the database and the restore reads none, so its time should not grow with them: the figure is
  the ratio of the medians.

Everything runs in a work directory of its own: an embedded SoftHSM2 token directory (A, B and one token per
restore), SQLite databases and the custodians' keys.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_SOFTHSM2_UTIL = "softhsm2-util"


def _kmsq(env: dict[str, str], *args: str) -> tuple[float, str]:
    """Runs ``kmsq ARGS``; returns its wall seconds and stdout. Raises RuntimeError when it fails."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "kmsq", *args], env=env, capture_output=True, text=True,
                          check=False)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"kmsq {' '.join(args[:2])} failed: {done.stderr.strip()[-400:]}")
    return time.perf_counter() - started, done.stdout


def _new_token(conf: Path, label: str, pin: str, so_pin: str) -> None:
    subprocess.run([_SOFTHSM2_UTIL, "--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", so_pin],
                   env={**os.environ, "SOFTHSM2_CONF": str(conf)}, check=True, capture_output=True)  # fmt: skip


def _token_directory(directory: Path, like: Path, pin: str, so_pin: str) -> Path:
    """A SoftHSM2 configuration of its own under ``directory`` (as ``like``, another token directory) with one
    token, labelled ``restore``; returns the configuration's path."""
    tokens = directory / "tokens"
    tokens.mkdir(parents=True)
    conf = directory / "softhsm2.conf"
    lines = [f"directories.tokendir = {tokens}" if line.startswith("directories.tokendir") else line
             for line in like.read_text().splitlines()]  # fmt: skip
    conf.write_text("\n".join(lines) + "\n")
    _new_token(conf, "restore", pin, so_pin)
    return conf


def _store(service: Any, root_key_id: str, count: int) -> None:
    """Stores ``count`` private keys (batches of 1,000, as ``put_keys`` does)."""
    from worker.batch import PrivateKeyItem, store_private_keys
    from worker.storage.db import transaction

    for start in range(0, count, 1000):
        items = [
            PrivateKeyItem(pub="xpub661MyMwAqRbc" + secrets.token_urlsafe(24), coin="btc", source="user",
                           type="independent", prv="xprv9s21ZrQH143K" + secrets.token_urlsafe(60))
            for _ in range(min(1000, count - start))
        ]  # fmt: skip
        with transaction(service.sessions) as db:
            store_private_keys(service.hsm, db, items, root_key_id, service.default_pool)


def run(root_keys: int, stored: list[int], repeat: int, work: Path, log: Any) -> dict[str, Any]:
    """Builds the deployment under ``work``, measures K1 and K2, and returns the report."""
    from worker import hsm_custody as custody
    from worker.config import load_settings
    from worker.hsm import Hsm
    from worker.runtime import KeyService, hsm_from_settings
    from worker.service import hsm_handle, wrapping_version
    from worker.storage.db import create_db_engine, session_factory, transaction

    home = work / "home"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("KMSQ_", "SOFTHSM2_"))}
    env = base | {"KMSQ_HOME": str(home)}
    log("kmsq init (embedded token, SQLite)")
    _kmsq(env, "init")
    settings = load_settings({"KMSQ_HOME": str(home)})
    pin, so_pin = settings.embedded_pin_file.read_text().strip(), (home / "hsm-so.pin").read_text().strip()
    conf = settings.softhsm2_conf
    _new_token(conf, "custody-b", pin, so_pin)  # made before this process reads the token directory
    # Each restore goes into a token of a directory of its own: SoftHSM2 reads every token of its directory
    # when a process starts, so restores into one directory would take longer one after the other.
    restores = [_token_directory(work / f"restore-{i}", conf, pin, so_pin) for i in range(repeat * len(stored))]
    hsm = hsm_from_settings(settings)
    service = KeyService(hsm, session_factory(create_db_engine(settings.database_url)), settings.default_pool)
    log(f"{root_keys} root keys")
    existing = len(service.list_root_keys())
    for _ in range(max(0, root_keys - existing)):
        service.create_root_key("aes-256")
    root = service.list_root_keys()[0]
    with transaction(service.sessions) as db:
        handle = hsm_handle(wrapping_version(db, root.id, service.default_pool))

    # K1 -----------------------------------------------------------------------------------------------------
    count = 2000
    started = time.perf_counter()
    for _ in range(count):
        _, plaintext = hsm.generate_data_key(handle, readable=True)
        if plaintext is not None:
            plaintext.wipe()
    baseline = count / (time.perf_counter() - started)
    b = Hsm(settings.module_path(), "custody-b", lambda: pin, conf)
    der, _ = custody.ensure_transport_key(b)
    name = b.token_serial()
    custody.trust_transport_key(hsm, name, der, so_pin)
    started = time.perf_counter()
    copies = custody.export_keys(hsm, name)
    exported = time.perf_counter() - started
    started = time.perf_counter()
    imported = custody.import_keys(b, copies)
    taken = time.perf_counter() - started
    keys = len([c for c in copies if c.kind != custody.REPLICATION])
    k1 = {"keys": keys, "export_per_s": round(keys / exported, 1), "import_per_s": round(len(imported) / taken, 1),
          "baseline_data_keys_per_s": round(baseline, 1),
          "export_over_baseline": round(keys / exported / baseline, 3),
          "import_over_baseline": round(len(imported) / taken / baseline, 3)}  # fmt: skip
    log(f"K1: {k1}")

    # K2 -----------------------------------------------------------------------------------------------------
    custodians = work / "custodians"
    for who in ("alice", "bob", "carol"):
        _kmsq(env, "backup", "custodian-key", who, "--dir", str(custodians), "--no-passphrase")
    listed = [
        a for who in ("alice", "bob", "carol") for a in ("--custodian", str(custodians / f"{who}.custodian.json"))
    ]
    _, out = _kmsq(env, "backup", "init", "--threshold", "2", "--out", str(work / "backup-key.json"), *listed,
                   "--so-pin-file", str(home / "hsm-so.pin"), "--json")  # fmt: skip
    fingerprint = json.loads(out)["fingerprint"]
    create_seconds, _ = _kmsq(env, "backup", "create", "--key", str(work / "backup-key.json"), "--out",
                              str(work / "all.kmsq-backup"))  # fmt: skip
    databases: dict[int, Path] = {}
    have = 0
    for size in sorted(stored):
        log(f"a database with {size} stored keys")
        _store(service, root.id, size - have)
        have = size
        databases[size] = work / f"stored-{size}.db"
        shutil.copyfile(home / "kmsq.db", databases[size])
    restore_home = work / "restore-home"
    restore_home.mkdir()
    shutil.copy(home / "operator-set.json", restore_home / "operator-set.json")  # it pins the operator set
    operator_key = str(home / "operators" / "admin.operator.json")  # the restore needs the operators' quorum
    seconds: dict[int, list[float]] = {size: [] for size in stored}
    tokens = iter(restores)
    for _ in range(repeat):
        for size in stored:  # alternating: the machine's noise falls on both
            restore_env = base | {"KMSQ_HOME": str(restore_home), "KMSQ_DATABASE_URL": f"sqlite:///{databases[size]}",
                                  "KMSQ_PKCS11_MODULE": settings.module_path(), "KMSQ_PKCS11_TOKEN_LABEL": "restore",
                                  "KMSQ_PKCS11_PIN_FILE": str(settings.embedded_pin_file),
                                  "SOFTHSM2_CONF": str(next(tokens))}  # fmt: skip
            wall, out = _kmsq(restore_env, "backup", "restore", str(work / "all.kmsq-backup"), "--fingerprint",
                              fingerprint, "--custodian-key", str(custodians / "alice.custodian-key.json"),
                              "--custodian-key", str(custodians / "carol.custodian-key.json"), "--operator-key",
                              operator_key, "--json")  # fmt: skip
            if len(json.loads(out)["restored"]) != keys:
                raise RuntimeError(f"the restore put back {len(json.loads(out)['restored'])} of {keys} keys")
            seconds[size].append(wall)
    medians = {size: statistics.median(values) for size, values in seconds.items()}
    smallest, largest = min(stored), max(stored)
    k2 = {"keys": keys, "create_seconds": round(create_seconds, 2),
          "restore_seconds": {str(s): [round(v, 2) for v in values] for s, values in seconds.items()},
          "restore_median_seconds": {str(s): round(v, 2) for s, v in medians.items()},
          "restore_ratio_largest_over_smallest": round(medians[largest] / medians[smallest], 3)}  # fmt: skip
    log(f"K2: {k2}")
    b.reset()
    hsm.reset()
    return {"root_keys": root_keys, "K1_replication": k1, "K2_backup_restore": k2}


def main(argv: list[str] | None = None) -> None:
    """Runs the measurement and prints the report (JSON with ``--json``)."""
    parser = argparse.ArgumentParser(prog="python -m kmsq.bench_custody", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--root-keys", type=int, default=100)
    parser.add_argument("--stored", default="1000,100000", help="Stored private keys, comma-separated.")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work-dir", type=Path)
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args(argv)
    work = options.work_dir or Path(tempfile.mkdtemp(prefix="kmsq-bench-custody-"))
    work.mkdir(parents=True, exist_ok=True)
    stored = sorted({int(s) for s in options.stored.split(",") if s.strip()})
    from kmsq.output import console, print_json

    report = run(
        options.root_keys,
        stored,
        options.repeat,
        work,
        lambda m: None if options.json else console.print(f"[dim]{m}[/dim]"),
    )
    if options.json:
        print_json(report)
        return
    k1, k2 = report["K1_replication"], report["K2_backup_restore"]
    console.print(f"K1: {k1['keys']} keys: export {k1['export_per_s']}/s ({k1['export_over_baseline']} of the "
                  f"baseline), import {k1['import_per_s']}/s ({k1['import_over_baseline']}); baseline "
                  f"{k1['baseline_data_keys_per_s']} data keys/s")  # fmt: skip
    console.print(
        f"K2: backup of {k2['keys']} keys in {k2['create_seconds']} s; restore medians "
        f"{k2['restore_median_seconds']} s by stored keys; ratio {k2['restore_ratio_largest_over_smallest']}"
    )


if __name__ == "__main__":
    main()

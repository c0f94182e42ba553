"""``kmsq demo``: the whole queue path once, end to end, on whatever ``kmsq init`` set up.

It starts the embedded broker when no ``KMSQ_BROKER_URL`` is set, starts a worker process for the default
pool, registers a demo caller (identity under ``$KMSQ_HOME/callers``), runs each operation through the queue
with a signed request and a sealed reply, shows a tampered request refused (no reply, counted), and stops
the worker (and the broker it started) cleanly. Secrets are shown only as lengths and fingerprints. It
refreshes ``$KMSQ_HOME/fleet.json`` (as ``kmsq init`` writes it) and ends with the commands that make the
demo caller's own first call work.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from kmsq.commands.common import write_fleet_file
from kmsq.output import console, fingerprint, one_line_errors, print_json

DEMO_CALLER = "demo"


def _ensure_demo_caller(service: Any, directory: Path) -> Path:
    """Creates and registers the demo caller once; returns its identity file."""
    from schemas.operations import ALLOWABLE_OPS
    from tasks.identity import CallerIdentity
    from worker import callers
    from worker.errors import ConfigError
    from worker.storage.db import transaction

    private_path = directory / f"{DEMO_CALLER}.key.json"
    if not private_path.exists():
        CallerIdentity.generate(DEMO_CALLER).write(directory)
    identity = CallerIdentity.load(private_path)
    public = callers.read_public_identity(directory / f"{DEMO_CALLER}.pub.json")
    with transaction(service.sessions) as db:
        registered = {c.name: c for c in callers.list_callers(db)}.get(DEMO_CALLER)
        if registered is None:
            callers.add_caller(service.hsm, db, DEMO_CALLER, public, list(ALLOWABLE_OPS), None, plaintext=True)
        elif registered.key_id != identity.key_id:
            raise ConfigError(f"caller {DEMO_CALLER!r} is registered with another key than {private_path}")
    return private_path


def _start_worker(home: Path, timeout: float = 60.0) -> subprocess.Popen[bytes]:
    """Starts ``kmsq worker`` and waits until Celery reports it ready (so that stopping it later is a clean,
    warm shutdown even when another worker of the pool answered every request)."""
    from worker.errors import ConfigError

    path = home / "worker.log"
    offset = path.stat().st_size if path.exists() else 0
    with path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "kmsq", "worker", "--concurrency", "2"], stdout=log, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with path.open("rb") as log:
            log.seek(offset)
            if b" ready." in log.read():
                return process
        if process.poll() is not None:
            raise ConfigError(f"the worker exited with {process.returncode}; see {path}")
        time.sleep(0.1)
    _stop_worker(process)
    raise ConfigError(f"the worker did not start within {timeout:.0f} s; see {path}")


def _stop_worker(process: subprocess.Popen[bytes]) -> int:
    """Warm shutdown (SIGTERM: finish the task in hand, then exit); returns the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


def _next_commands(home: Path, identity_file: Path) -> list[str]:
    """The commands that take the demo caller from here to its own first call: the demo stopped its worker
    (and the embedded broker it started), and ``kmsq worker`` starts the embedded broker first."""
    kmsq = Path(sys.executable).with_name("kmsq")
    command = "kmsq" if not kmsq.exists() or shutil.which("kmsq") == str(kmsq) else shlex.quote(str(kmsq))
    home = home.resolve()
    prefix = f"KMSQ_HOME={shlex.quote(str(home))} "
    fleet = ""
    if os.environ.get("KMSQ_FLEET") and Path(os.environ["KMSQ_FLEET"]).resolve() != home / "fleet.json":
        fleet = f" --fleet {shlex.quote(str(home / 'fleet.json'))}"  # the caller commands would read KMSQ_FLEET
    return [
        f"{prefix}{command} worker &",
        f"{prefix}{command} generate-data-key --identity {shlex.quote(str(identity_file.resolve()))}{fleet}",
    ]


def _steps(client: Any, sessions: Any) -> list[dict[str, Any]]:
    from tasks.client import KmsError

    steps: list[dict[str, Any]] = []
    key = client.generate_data_key()
    steps.append({"op": "generate_data_key", "encryptedKey_length": len(key["encryptedKey"]),
                  "plaintextKey": fingerprint(key["plaintextKey"])})  # fmt: skip
    again = client.decrypt_data_key(key["encryptedKey"])
    steps.append({"op": "decrypt_data_key", "plaintextKey": fingerprint(again["plaintextKey"]),
                  "matches": again["plaintextKey"] == key["plaintextKey"]})  # fmt: skip
    bare = client.generate_data_key(with_plaintext=False)
    steps.append({"op": "generate_data_key_without_plaintext", "fields": sorted(bare)})
    pub = "xpub-demo-" + secrets.token_hex(8)
    prv = "xprv-demo-" + secrets.token_urlsafe(64)
    stored = client.put_key(pub, prv, "btc", "user", "independent")
    steps.append({"op": "put_key", "pub": stored["pub"], "prv": fingerprint(prv), "sealed_to": "fleet transport key"})
    record = client.get_key(pub, "user")
    steps.append(
        {"op": "get_key", "pub": record["pub"], "prv": fingerprint(record["prv"]), "matches": record["prv"] == prv}
    )
    for label, call, expected in (
        ("put_key again", lambda: client.put_key(pub, prv, "btc", "user", "independent"), "conflict"),
        ("get_key source=backup", lambda: client.get_key(pub, "backup"), "not_found"),
    ):
        try:
            call()
            steps.append({"op": label, "result": "accepted (BUG)", "ok": False})
        except KmsError as e:
            steps.append({"op": label, "result": f"{e.code}: {e.message}", "ok": e.code == expected})
    steps.append(_tampered(client, sessions))
    return steps


def _tampered(client: Any, sessions: Any) -> dict[str, Any]:
    """Sends a generate_data_key request whose signature has one flipped character: the worker answers
    nothing (an unauthenticated message gets no reply) and counts it in rejection_counts."""
    from sqlalchemy import select

    from worker.storage.models import RejectionCount

    request, args = client.build_request({"op": "generate_data_key"}, client.fleet.default_pool)
    args[3] = ("B" if args[3][0] == "A" else "A") + args[3][1:]
    future = client.submit_raw(request, args)
    deadline = time.monotonic() + 10
    row = None
    while row is None and time.monotonic() < deadline:
        time.sleep(0.1)
        with sessions() as db:
            query = select(RejectionCount).where(RejectionCount.last_request_id == str(request.request_id))
            row = db.scalars(query).first()
    time.sleep(0.3)  # a reply would have followed the count
    replied = future.done()
    future.cancel()
    if row is None:
        return {"op": "tampered signature", "result": "not counted (BUG)", "ok": False}
    result = f"{row.code}: {row.reason}, no reply" + (" (BUG: it got one)" if replied else "")
    return {"op": "tampered signature", "result": result, "ok": row.code == "unauthenticated" and not replied}


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def demo(as_json: bool) -> None:
    """Run every operation once through the queue and a real worker; secrets appear only as fingerprints."""
    from kmsq import broker
    from tasks.client import KmsClient
    from tasks.identity import CallerIdentity, Fleet
    from worker.config import load_settings
    from worker.operators import authorize_process
    from worker.runtime import KeyService

    settings = load_settings()
    service = KeyService.from_settings(settings)
    authorize_process(settings)  # the demo caller is approved by this host's operator key (kmsq init's 1-of-1)
    started_broker = broker.start(settings.home) if settings.embedded_broker else False
    identity_file = _ensure_demo_caller(service, settings.home / "callers")
    document = service.fleet_document()
    fleet = Fleet.from_document(document)
    fleet_path = settings.home / "fleet.json"
    write_fleet_file(fleet_path, document)
    worker = _start_worker(settings.home)
    try:
        identity = CallerIdentity.load(identity_file)
        with KmsClient(
            settings.effective_broker_url, identity, fleet, timeout=60, namespace=settings.namespace
        ) as client:
            steps = _steps(client, service.sessions)
    finally:
        service.engine.dispose()
        worker_exit = _stop_worker(worker)
        if started_broker:
            broker.stop(settings.home)
    report = {
        "broker": "embedded redis-server (unix socket)" if settings.embedded_broker else "KMSQ_BROKER_URL",
        "worker": {"pool": fleet.default_pool, "exit_code": worker_exit, "log": str(settings.home / "worker.log")},
        "steps": steps,
        "caller_identity": str(identity_file),
        "fleet_file": str(fleet_path),
        "next": _next_commands(settings.home, identity_file),
    }
    ok = worker_exit == 0 and all(s.get("matches", True) and s.get("ok", True) for s in steps)
    if as_json:
        print_json(report)
    else:
        console.print(f"broker   {report['broker']}; worker pool {fleet.default_pool} (pid {worker.pid})")
        for step in steps:
            details = ", ".join(f"{k}={v}" for k, v in step.items() if k != "op")
            console.print(f"[bold]{step['op']:<36}[/bold] {details}", highlight=False)
        console.print(
            f"worker stopped cleanly (exit {worker_exit})" if worker_exit == 0 else f"worker exit {worker_exit}"
        )
        stopped = "its worker and the broker it started" if started_broker else "its worker"
        console.print(f"\nnext: the demo stopped {stopped}; to call kmsq as the demo caller yourself, run")
        for command in report["next"]:
            console.print(f"  {command}", markup=False, highlight=False)
    if not ok:
        raise SystemExit(1)

"""The checker of a chaos run: from the recorded history and the deployment's own state, what was lost,
what happened twice, whether the job's output is what the database holds, whether a reply opens for anyone
but its caller, and whether a plaintext is anywhere it must not be."""

from __future__ import annotations

import base64
import binascii
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from kmsq.chaos.environment import Deployment
from kmsq.chaos.faults import FaultRecord
from kmsq.chaos.workload import PRV_MARKER, History, ProvisionJob, Stream


@dataclass
class Check:
    """One property of the run and whether it held."""

    name: str
    ok: bool
    detail: str


def request_figures(history: History) -> dict[str, Any]:
    """Counts of the single requests: sent, answered, retried, lost, unexpected outcomes, wrong answers."""
    records = history.records
    outcomes = Counter(r.outcome for r in records)
    return {
        "sent": len(records),
        "answered": sum(1 for r in records if r.outcome not in (None, "lost")),
        "retried": sum(1 for r in records if r.attempts > 1),
        "resent": sum(1 for r in records if r.resent),
        "lost": sum(1 for r in records if r.outcome in (None, "lost")),
        "unexpected": sum(1 for r in records if r.outcome not in (None, "lost", r.expected)),
        "wrong_answers": sum(1 for r in records if r.wrong_answer),
        "outcomes": dict(outcomes),
        "by_op": dict(Counter(r.op for r in records)),
    }


def fault_figures(history: History, faults: list[FaultRecord]) -> list[dict[str, Any]]:
    """Per fault: seconds from healing to the next successful request, and ok requests/s during and after."""
    done = sorted(r.done for r in history.records if r.outcome == "ok" and r.done is not None)
    out = []
    for fault in faults:
        healed = fault.healed_at or fault.injected_at
        after = next((t for t in done if t >= healed), None)
        during = sum(1 for t in done if fault.injected_at <= t <= healed)
        following = sum(1 for t in done if healed <= t <= healed + 15)
        out.append({
            "fault": fault.name,
            "lasted_s": round(healed - fault.injected_at, 2),
            "recovery_s": None if after is None else round(after - healed, 2),
            "ok_per_s_during": round(during / max(healed - fault.injected_at, 0.001), 1),
            "ok_per_s_after": round(following / 15, 1),
        })  # fmt: skip
    return out


def _service(deployment: Deployment) -> Any:
    import os

    from worker.config import load_settings
    from worker.runtime import KeyService

    # The HSM through the same fault module as the workers (no fault is active now).
    for name in ("SOFTHSM2_CONF", "KMSQ_FAULT_REAL_MODULE", "KMSQ_FAULT_FILE"):
        os.environ[name] = deployment.env[name]
    return KeyService.from_settings(load_settings(deployment.env))


def job_checks(deployment: Deployment, job: ProvisionJob) -> tuple[list[Check], int]:
    """The job's output against its input and the database, every stored key opened in the HSM. Returns the
    checks and the number of duplicated effects (items answered ``conflict``: stored by an earlier delivery)."""
    from sqlalchemy import select

    from worker.service import get_private_key
    from worker.storage.models import PrivateKey

    wanted = {item["pub"]: item for item in map(json.loads, job.source.read_text().splitlines())}
    lines = [json.loads(line) for line in job.out.read_text().splitlines()] if job.out.exists() else []
    numbers = Counter(line["line"] for line in lines)
    errors = Counter(line.get("error") for line in lines if line.get("error"))
    service = _service(deployment)
    with service.sessions() as db:
        stored = set(db.scalars(select(PrivateKey.pub).where(PrivateKey.pub.startswith(job.job + "-"))))
        wrong = 0
        for pub, item in wanted.items():
            try:
                if get_private_key(service.hsm, db, pub, item["source"]).prv != item["prv"]:
                    wrong += 1
            except Exception:
                wrong += 1
    service.engine.dispose()
    codes = [r.exit_code for r in job.runs]
    checks = [
        Check("the job finished", job.error is None and bool(codes) and codes[-1] == 0,
              f"{len(codes)} runs, exit codes {codes}" + (f": {job.error}" if job.error else "")),
        Check("every input line is in the output exactly once",
              set(numbers) == set(range(1, len(wanted) + 1)) and all(n == 1 for n in numbers.values()),
              f"{len(lines)} lines for {len(wanted)} keys"),
        Check("the output has no failed item", not errors, f"errors: {dict(errors)}" if errors else "none"),
        Check("the database holds exactly the job's keys", stored == set(wanted),
              f"{len(stored)} stored, {len(wanted)} wanted"),
        Check("every stored key opens in the HSM to its input", wrong == 0, f"{wrong} wrong or unreadable"),
    ]  # fmt: skip
    return checks, errors.get("conflict", 0)


def stream_checks(deployment: Deployment, history: History, streams: list[Stream]) -> list[Check]:
    """Every key a stream stored is in the database once and opens to what was sent; no reply's secrets open
    with another caller's key."""
    from schemas.wire import WireError, open_reply_secret
    from worker.service import get_private_key

    puts = [put for stream in streams for put in stream.puts]
    service = _service(deployment)
    wrong = 0
    with service.sessions() as db:
        for pub, prv in puts:
            try:
                wrong += get_private_key(service.hsm, db, pub, "user").prv != prv
            except Exception:
                wrong += 1
    service.engine.dispose()
    identities = {stream.client.identity.caller: stream.client.identity for stream in streams}
    opened_by_others = own_failed = tried = 0
    for caller, reply in history.replies:
        for field, sealed in reply.sealed.items():
            for name, identity in identities.items():
                tried += 1
                try:
                    open_reply_secret(identity.reply, reply.request_id, field, sealed)
                    opened_by_others += name != caller
                except WireError:
                    own_failed += name == caller
    return [
        Check("every stream put opens in the HSM to what was sent", wrong == 0, f"{len(puts)} keys, {wrong} wrong"),
        Check("no reply opens for anyone but its caller", opened_by_others == 0 and own_failed == 0,
              f"{len(history.replies)} replies, {tried} attempts with every caller's key"),
    ]  # fmt: skip


def _forms(secret: bytes) -> list[bytes]:
    """A secret as raw bytes, hex and base64 at each of the three alignments."""
    forms = [secret, binascii.hexlify(secret)]
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + secret)[4 if shift else 0 :]
        forms.append(encoded[: max(4, len(encoded) - 4)])
    return forms


def _redis_dump(deployment: Deployment) -> bytes:
    if deployment.redis is None:
        return b""
    client: Any = redis.Redis.from_url(deployment.redis.url)
    out = bytearray()
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        out += key + b"\n"
        if kind == b"list":
            out += b"\n".join(client.lrange(key, 0, -1))
        elif kind == b"hash":
            out += b"\n".join(k + b"=" + v for k, v in client.hgetall(key).items())
        elif kind == b"set":
            out += b"\n".join(client.smembers(key))
        elif kind == b"string":
            out += client.get(key) or b""
        elif kind == b"zset":
            out += b"\n".join(m for m, _ in client.zrange(key, 0, -1, withscores=True))
    client.close()
    return bytes(out)


def scan_check(deployment: Deployment, history: History, job: ProvisionJob) -> Check:
    """No plaintext private key (every one carries a marker) or sampled secret in the broker (Redis's keys and
    append-only files, or every file of the RabbitMQ nodes), the database dump, the logs or any file of the run,
    but the job's own input."""
    places: dict[str, bytes] = {"redis": _redis_dump(deployment), "postgres": deployment.postgres.dump()}
    skip = {job.source.resolve()}
    for path in deployment.work.rglob("*"):
        if path.is_file() and path.resolve() not in skip and "tokens" not in path.parts:
            places[str(path.relative_to(deployment.work))] = path.read_bytes()
    if deployment.rabbit is not None:  # every node's message stores, queue logs and its own log
        for path in deployment.rabbit.directory.rglob("*"):
            if path.is_file():
                places["rabbitmq/" + str(path.relative_to(deployment.rabbit.directory))] = path.read_bytes()
    secrets = [PRV_MARKER.encode(), *(s.encode() for s in history.secrets)]
    found = [
        name for name, data in places.items() if any(form in data for secret in secrets for form in _forms(secret))
    ]
    size = sum(len(d) for d in places.values())
    return Check("no plaintext anywhere it must not be", not found,
                 f"{len(secrets)} secrets in {len(places)} places ({size / 1e6:.1f} MB)"
                 + (f"; found in {', '.join(found[:5])}" if found else ""))  # fmt: skip


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Writes the report as JSON."""
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")

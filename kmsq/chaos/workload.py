"""The chaos workload and its recorded history: a resumable provisioning job (``kmsq provision --put-from``,
run again with the same ``--job`` whenever it stops) and streams of single requests of every operation from
several callers.

Each single request is resolved to exactly one outcome the way a careful caller would: wait for its reply;
on no reply (or an ``unavailable`` one) send the *same signed message* again, which a worker that already ran
it answers with the stored reply; give up only after ``RESOLVE_WITHIN`` seconds, which makes it ``lost``.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from schemas.wire import task_name
from tasks.client import KmsClient, KmsError

ATTEMPT_SECONDS = 10.0  # wait this long for a reply before sending the same message again
RESOLVE_WITHIN = 240.0  # a request without an outcome after this long is lost (its TTL is 600 s)
PRV_MARKER = "CHAOS-PLAINTEXT-PRIVATE-KEY-"  # every private key of the run starts with it: the scan looks for it


@dataclass
class Record:
    """One request and its outcome."""

    caller: str
    op: str
    request_id: str
    sent: float
    done: float | None = None
    outcome: str | None = None  # ok, an error code, or "lost"
    expected: str = "ok"
    attempts: int = 0
    resent: int = 0  # sent again after a publish that succeeded had no reply within ATTEMPT_SECONDS
    resent_at: list[float] = field(default_factory=list)  # when (time.time()) each of those was sent again
    wrong_answer: bool = False  # an outcome whose content contradicts what was sent earlier


@dataclass
class History:
    """Every request of the run, thread-safe."""

    records: list[Record] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)  # plaintexts the run handled, for the scan (a sample)
    replies: list[tuple[str, Any]] = field(default_factory=list)  # (caller, Reply) with sealed fields, a sample
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, record: Record) -> None:
        """Keeps ``record`` (it is filled in as the request resolves)."""
        with self.lock:
            self.records.append(record)

    def keep_secret(self, secret: str) -> None:
        """Keeps a plaintext for the secrets scan (the first 200)."""
        with self.lock:
            if len(self.secrets) < 200:
                self.secrets.append(secret)

    def dump(self, path: Path) -> None:
        """Writes the history as JSON lines."""
        with self.lock:
            path.write_text("".join(json.dumps(asdict(r)) + "\n" for r in self.records))


class Stream(threading.Thread):
    """One caller sending every operation in turn until ``stop`` is set."""

    def __init__(self, client: KmsClient, history: History, stop: threading.Event) -> None:
        super().__init__(name=f"chaos-{client.identity.caller}", daemon=True)
        self.client = client
        self.history = history
        self.stop = stop
        self.puts: list[tuple[str, str]] = []  # (pub, prv) stored with an ok outcome

    def run(self) -> None:
        while not self.stop.is_set():
            self.cycle()

    def cycle(self) -> None:
        """generate_data_key, decrypt_data_key, put_key, get_key, generate without plaintext, an absent get."""
        pool = self.client.fleet.default_pool
        key, _ = self.call({"op": "generate_data_key", "key_spec": "AES-256"}, pool)
        if key is not None:
            self.history.keep_secret(key["plaintextKey"])
            again, record = self.call({"op": "decrypt_data_key", "encrypted_key": key["encryptedKey"]}, pool)
            record.wrong_answer = again is not None and again["plaintextKey"] != key["plaintextKey"]
        pub, prv = f"chaos-{uuid.uuid4().hex}", PRV_MARKER + secrets.token_hex(24)
        request_id = uuid.uuid4()
        params, put_pool = self.client.put_key_params(pub, prv, "btc", "user", "tss", None, request_id)
        if self.call(params, put_pool, request_id)[0] is not None:
            self.puts.append((pub, prv))
            self.history.keep_secret(prv)
            got, record = self.call({"op": "get_key", "pub": pub, "source": "user"}, pool)
            record.wrong_answer = got is not None and got["prv"] != prv
        self.call({"op": "generate_data_key_without_plaintext", "key_spec": "AES-256"}, pool)
        self.call({"op": "get_key", "pub": f"absent-{uuid.uuid4().hex}", "source": "user"}, pool, expected="not_found")

    def call(
        self, params: dict[str, Any], pool: str, request_id: uuid.UUID | None = None, expected: str = "ok"
    ) -> tuple[dict[str, Any] | None, Record]:
        """Sends one request until it has an outcome, and records it. Returns its fields (when it succeeded)
        and its record."""
        request, args = self.client.build_request(params, pool, request_id)
        rid = str(request.request_id)
        record = Record(self.client.identity.caller, request.params.op, rid, time.time(), expected=expected)
        self.history.add(record)
        deadline = time.monotonic() + RESOLVE_WITHIN
        while time.monotonic() < deadline:
            record.attempts += 1
            future = self.client.expect(request.request_id, args)
            try:
                self.client.publish(task_name(request.params.op), args, rid, pool, request.reply_queue)
                fields = future.result(timeout=ATTEMPT_SECONDS)
            except FutureTimeout:
                future.cancel()
                record.resent += 1
                record.resent_at.append(time.time())
                continue
            except KmsError as e:
                if e.code == "unavailable":  # the worker gave up retrying: the same message again
                    time.sleep(1)
                    continue
                record.outcome, record.done = e.code, time.time()
                return None, record
            except Exception:  # the broker is down: publishing failed; try again shortly
                future.cancel()
                time.sleep(1)
                continue
            record.outcome, record.done = "ok", time.time()
            if future.reply is not None and future.reply.sealed:
                with self.history.lock:
                    if len(self.history.replies) < 300:
                        self.history.replies.append((self.client.identity.caller, future.reply))
            return dict(fields), record
        record.outcome, record.done = "lost", time.time()
        return None, record


@dataclass
class JobRun:
    """One run of the provisioning command."""

    started: float
    seconds: float
    exit_code: int


class ProvisionJob(threading.Thread):
    """``kmsq provision --put-from`` of ``count`` private keys, run again with the same job id until it exits
    0 (every interruption is resumed). Its input and output are kept for the checker."""

    def __init__(self, env: dict[str, str], directory: Path, count: int) -> None:
        super().__init__(name="chaos-provision", daemon=True)
        self.env = env
        self.count = count
        self.job = "chaos-" + secrets.token_hex(4)
        self.source = directory / "job-input.jsonl"
        self.out = directory / "job-output.jsonl"
        self.runs: list[JobRun] = []
        self.finished = threading.Event()
        self.error: str | None = None
        with self.source.open("w") as f:
            for i in range(count):
                item = {"pub": f"{self.job}-{i:07d}", "prv": PRV_MARKER + secrets.token_hex(24), "coin": "btc",
                        "source": "backup", "type": "independent"}  # fmt: skip
                f.write(json.dumps(item) + "\n")
        os.chmod(self.source, 0o600)

    def run(self) -> None:
        command = [sys.executable, "-m", "kmsq", "provision", "--put-from", str(self.source), "--out", str(self.out),
                   "--job", self.job, "--batch", "500", "--in-flight", "4", "--timeout", "20", "--json"]  # fmt: skip
        try:
            while True:
                started = time.time()
                result = subprocess.run(command, env=self.env, capture_output=True, text=True, check=False)
                self.runs.append(JobRun(started, time.time() - started, result.returncode))
                if result.returncode == 0:
                    return
                if result.returncode == 2:  # a usage error (e.g. a mismatched journal) never resolves itself
                    self.error = result.stderr.strip()[-500:]
                    return
                time.sleep(1)
        finally:
            self.finished.set()

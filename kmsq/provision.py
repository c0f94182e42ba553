"""``kmsq provision``: batch key provisioning through the queue, resumable.

Batches stream with K in flight on a durable reply queue of the job. Every batch's signed request is written
to a journal (``OUT.job``, fsynced) *before* it is sent; every finished batch's lines are appended to the
output in one write and fsynced. A run interrupted at any point (SIGINT, SIGKILL) and started again with the
same ``--job`` therefore:

* keeps the batches whose lines are complete in the output (a torn last batch is cut off);
* re-sends the journaled request of every other journaled batch *unchanged*: a worker that already ran it
  answers with its stored reply (the same keys), one that did not runs it now; a request that expired
  unprocessed is sent again as a new attempt;
* sends the batches never journaled as new requests.

So no key is missing from the output and none appears twice.
"""

from __future__ import annotations

import json
import os
import secrets
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.client import KmsClient, KmsError, RequestFuture

JOURNAL_SUFFIX = ".job"
MAX_BACKOFF_SECONDS = 30.0  # the longest a rate_limited batch waits before it is sent again


class ProvisionError(Exception):
    """The job cannot start or continue (bad arguments, a mismatched journal)."""


@dataclass
class Job:
    """A provisioning job: its parameters (the journal's header) and its progress."""

    job: str
    mode: str  # generate | put
    total: int
    batch: int
    root_key_id: str | None
    with_plaintext: bool
    source: str | None = None  # put mode: the input file
    done: set[int] = field(default_factory=set)
    journaled: dict[int, dict[str, Any]] = field(default_factory=dict)
    # (start, stop) of each batch: ``batch`` items each, or in put mode also at most a message's size
    # (tasks.client.put_keys_batches); derived from the input, so a resumed job splits it the same way.
    ranges: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.ranges:
            self.ranges = [(start, min(start + self.batch, self.total)) for start in range(0, self.total, self.batch)]

    @property
    def batches(self) -> int:
        """The number of batches."""
        return len(self.ranges)

    def start(self, index: int) -> int:
        """The index of batch ``index``'s first item."""
        return self.ranges[index][0]

    def size(self, index: int) -> int:
        """Items in batch ``index``."""
        start, stop = self.ranges[index]
        return stop - start

    def header(self) -> dict[str, Any]:
        """The journal's first line."""
        keys = ("job", "mode", "total", "batch", "root_key_id", "with_plaintext", "source")
        return {key: getattr(self, key) for key in keys}


@dataclass
class Stats:
    """Counts for the progress bar and the summary."""

    keys: int = 0
    errors: int = 0
    resumed_keys: int = 0
    rate_limited: int = 0  # batches the caller's quota refused, and that were sent again after the wait
    started: float = field(default_factory=time.monotonic)

    def summary(self, job: Job, out: Path) -> dict[str, Any]:
        """The end-of-run summary."""
        elapsed = time.monotonic() - self.started
        return {
            "job": job.job,
            "out": str(out),
            "keys": self.keys,
            "errors": self.errors,
            "already_done": self.resumed_keys,
            "rate_limited": self.rate_limited,
            "elapsed_s": round(elapsed, 3),
            "keys_per_s": round(self.keys / elapsed, 1) if elapsed > 0 else None,
        }


def _fsync_append(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def open_job(out: Path, job_id: str | None, fresh: Job) -> Job:
    """Returns the job to run: ``fresh`` for a new output, or the journaled job with its progress.

    Raises ProvisionError when the output exists for another job or with other parameters.
    """
    journal = out.with_name(out.name + JOURNAL_SUFFIX)
    if not journal.exists():
        if out.exists() and out.stat().st_size > 0:
            raise ProvisionError(f"{out} exists and has no journal; choose another --out")
        _fsync_append(journal, json.dumps(fresh.header()) + "\n")
        out.touch(mode=0o600)
        return fresh
    lines = journal.read_text(encoding="utf-8").splitlines()
    header = json.loads(lines[0])
    if job_id is None or header["job"] != job_id:
        raise ProvisionError(f"{out} belongs to job {header['job']}; resume with --job {header['job']}")
    if {k: v for k, v in header.items() if k != "job"} != {k: v for k, v in fresh.header().items() if k != "job"}:
        raise ProvisionError(f"job {job_id} was started with other parameters: {json.dumps(header)}")
    job = fresh
    for line in lines[1:]:
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a torn last line: that batch was never sent
        job.journaled[entry["batch"]] = entry
    job.done = _completed_batches(out, job)
    return job


def _completed_batches(out: Path, job: Job) -> set[int]:
    """Batches whose every line is in ``out``; cuts off a torn tail and the lines of incomplete batches."""
    raw = out.read_bytes()
    keep_until = raw.rfind(b"\n") + 1
    lines = raw[:keep_until].decode("utf-8").splitlines()
    per_batch: dict[int, list[str]] = {}
    for line in lines:
        per_batch.setdefault(int(json.loads(line)["batch"]), []).append(line)
    done = {b for b, ls in per_batch.items() if len(ls) == job.size(b)}
    kept = [line for b in sorted(done) for line in per_batch[b]]
    if len(kept) != len(lines) or keep_until != len(raw):
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.chmod(tmp, 0o600)
        os.replace(tmp, out)
    return done


class Provisioner:
    """Runs a job with ``in_flight`` batches outstanding."""

    def __init__(self, client: KmsClient, job: Job, out: Path, in_flight: int, put_items: list[dict[str, str]] | None):
        self.client = client
        self.job = job
        self.out = out
        self.journal = out.with_name(out.name + JOURNAL_SUFFIX)
        self.in_flight = in_flight
        self.put_items = put_items
        self.stats = Stats()
        self.stats.resumed_keys = sum(job.size(b) for b in job.done)

    def _params(self, index: int) -> dict[str, Any]:
        if self.job.mode == "generate":
            return {
                "op": "generate_data_keys",
                "count": self.job.size(index),
                "with_plaintext": self.job.with_plaintext,
                "root_key_id": self.job.root_key_id,
            }
        assert self.put_items is not None
        start, stop = self.job.ranges[index]
        return {"items": self.put_items[start:stop]}

    def _send_new(self, index: int, attempt: int) -> RequestFuture:
        request_id = uuid.uuid5(uuid.NAMESPACE_URL, f"kmsq-provision:{self.job.job}:{index}:{attempt}")
        if self.job.mode == "generate":
            params = self._params(index)
            pool = self.client.pool_for(self.job.root_key_id)
        else:
            params, pool = self.client.put_keys_params(self._params(index)["items"], self.job.root_key_id, request_id)
        request, args = self.client.build_request(params, pool, request_id)
        entry = {"batch": index, "attempt": attempt, "request_id": str(request_id), "op": request.params.op,
                 "pool": pool, "reply_queue": request.reply_queue, "args": args}  # fmt: skip
        _fsync_append(self.journal, json.dumps(entry) + "\n")
        self.job.journaled[index] = entry
        return self.client.submit_raw(request, args)

    def _resend(self, entry: dict[str, Any]) -> RequestFuture:
        rid = uuid.UUID(entry["request_id"])
        future = self.client.expect(rid, entry["args"])
        self.client.publish(f"kmsq.{entry['op']}", entry["args"], entry["request_id"], entry["pool"],
                            entry["reply_queue"], self.client.lane_for(entry["op"]))  # fmt: skip
        return future

    def _start(self, index: int) -> RequestFuture:
        entry = self.job.journaled.get(index)
        return self._resend(entry) if entry is not None else self._send_new(index, 0)

    def _lines(self, index: int, items: list[dict[str, Any]]) -> str:
        start = self.job.start(index)
        lines = []
        for offset, item in enumerate(items):
            n = start + offset
            if self.job.mode == "generate":
                line: dict[str, Any] = {
                    "id": f"{self.job.job}-{n:09d}",
                    "batch": index,
                    "encryptedKey": item.get("encryptedKey"),
                }
                if self.job.with_plaintext:
                    line["plaintextKey"] = item.get("plaintextKey")
            else:
                line = {"line": n + 1, "batch": index, **item}
            if "error" in item:
                self.stats.errors += 1
                line["error"] = item["error"]
                line["message"] = item.get("message")
            else:
                self.stats.keys += 1
            lines.append(json.dumps(line, separators=(",", ":")))
        return "".join(line + "\n" for line in lines)

    def run(self, progress: Any = None) -> None:
        """Sends every batch not done yet and writes its lines. Raises KmsError when a batch fails as a
        whole (the job can be resumed after fixing the cause)."""
        pending = iter([b for b in range(self.job.batches) if b not in self.job.done])
        outstanding: dict[Future[Any], int] = {}
        for index in _take(pending, self.in_flight):
            outstanding[self._start(index)] = index
        while outstanding:
            finished, _ = wait(list(outstanding), timeout=self.client.timeout, return_when=FIRST_COMPLETED)
            if not finished:
                raise KmsError("unavailable", "no reply from a worker in time; run again with the same --job")
            for future in finished:
                index = outstanding.pop(future)
                try:
                    items = future.result()["items"]
                except KmsError as e:
                    if e.code == "rate_limited":  # over the caller's quota, nothing done: the same request later
                        self.stats.rate_limited += 1
                        time.sleep(min(e.retry_after or 1.0, MAX_BACKOFF_SECONDS))
                        outstanding[self._resend(self.job.journaled[index])] = index
                        continue
                    if e.code != "expired":
                        raise
                    attempt = int(self.job.journaled[index]["attempt"]) + 1  # sent too long ago, never run
                    outstanding[self._send_new(index, attempt)] = index
                    continue
                _fsync_append(self.out, self._lines(index, items))
                self.job.done.add(index)
                if progress is not None:
                    progress(self.job.size(index))
                for nxt in _take(pending, 1):
                    outstanding[self._start(nxt)] = nxt


def _take(iterator: Iterator[int], n: int) -> list[int]:
    out = []
    for _ in range(n):
        try:
            out.append(next(iterator))
        except StopIteration:
            break
    return out


def read_put_items(path: Path) -> list[dict[str, str]]:
    """Reads ``{pub, prv, coin, source, type}`` lines. Raises ProvisionError for a malformed line."""
    items = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                items.append({k: str(data[k]) for k in ("pub", "prv", "coin", "source", "type")})
            except (ValueError, KeyError, TypeError):
                raise ProvisionError(
                    f"{path}:{number}: expected a JSON object with pub, prv, coin, source, type"
                ) from None
    if not items:
        raise ProvisionError(f"{path} has no items")
    return items


def new_job_id() -> str:
    """A fresh job id."""
    return secrets.token_hex(6)

"""The faults of a chaos run, each injected and healed on a schedule, with the times the checker needs."""

from __future__ import annotations

import base64
import json
import shutil
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import redis

from kmsq.chaos.environment import Deployment, wait_until
from kmsq.chaos.hsm_faults import CKR_DEVICE_REMOVED, CKR_SESSION_HANDLE_INVALID


@dataclass
class FaultRecord:
    """One injected fault: when it started and when the system was whole again (from the outside)."""

    name: str
    injected_at: float
    healed_at: float | None = None


def _kill_pool_process(d: Deployment) -> None:
    d.kill_pool_process(0)


def _kill_worker(d: Deployment) -> None:
    d.signal_worker(0, signal.SIGKILL, whole_group=True)  # main and pool processes; the supervisor restarts it
    time.sleep(3)


def _terminate_worker(d: Deployment) -> None:
    d.signal_worker(len(d.workers) - 1, signal.SIGTERM, whole_group=False)  # a warm shutdown under load
    time.sleep(3)


def _redis_restart(d: Deployment) -> None:
    d.redis.shutdown()
    time.sleep(2)
    d.redis.start()


def _redis_crash(d: Deployment) -> None:
    d.redis.kill()
    time.sleep(2)
    d.redis.start()


def _postgres_restart(d: Deployment) -> None:
    d.postgres.stop("immediate")
    time.sleep(3)
    d.postgres.start()


def _postgres_failover(d: Deployment) -> None:
    d.postgres.fail_over()


def _hsm_window(code: int) -> Callable[[Deployment], None]:
    def inject(d: Deployment) -> None:
        d.switch.fail(code)
        time.sleep(5)
        d.switch.clear()

    return inject


def _hsm_lost(d: Deployment) -> None:
    """Token B destroyed under load: its worker killed -9 and its token directory deleted; the pool runs on token
    A alone for 5 s; then a new token takes B's place, enrolled and replicated as an operator does, and its worker
    starts again (the supervisor restarts it)."""
    worker = d.workers[1]
    worker.wanted = False
    d.signal_worker(1, signal.SIGKILL, whole_group=True)
    worker.process.wait(timeout=30)
    tokens = d.home_b / "tokens"
    shutil.rmtree(tokens)
    tokens.mkdir()
    time.sleep(5)
    d.enroll_token_b()
    worker.wanted = True
    wait_until(lambda: d.workers[1] is not worker and len(d.workers[1].children()) >= 2, 90, "worker 1 on a new token")


def _flood(d: Deployment) -> None:
    """3,000 entries that are not kombu messages and 2,000 task messages from a caller nobody registered."""
    client = redis.Redis.from_url(d.redis.url)
    queue = "kms.chaos"
    garbage = ["not json", "[1,2,3]", '{"x": 1}', "[" * 5000 + "]" * 5000]
    client.lpush(queue, *(garbage[i % len(garbage)] for i in range(3000)))
    args = [["nobody", "ed25519:0000000000000000", "e30", "c2ln"], {}, {"callbacks": None, "errbacks": None}]
    encoded = base64.b64encode(json.dumps(args).encode()).decode()
    fake = []
    for _ in range(2000):
        task_id = str(uuid.uuid4())
        body = {"body": encoded,
                "content-encoding": "utf-8", "content-type": "application/json",
                "headers": {"task": "kmsq.generate_data_key", "id": task_id, "lang": "py", "retries": 0},
                "properties": {"body_encoding": "base64", "delivery_tag": task_id, "delivery_mode": 2, "priority": 0,
                               "correlation_id": task_id, "reply_to": "kmsq.reply.nobody.x",
                               "delivery_info": {"exchange": "", "routing_key": queue}}}  # fmt: skip
        fake.append(json.dumps(body))
    client.lpush(queue, *fake)
    wait_until(lambda: int(client.llen(queue)) == 0, 120, "the flood to drain")
    client.close()


FAULTS: dict[str, Callable[[Deployment], None]] = {
    "kill -9 of a pool process": _kill_pool_process,
    "kill -9 of a whole worker": _kill_worker,
    "SIGTERM of a worker under load": _terminate_worker,
    "Redis restarted (clean shutdown)": _redis_restart,
    "Redis killed (-9, AOF everysec)": _redis_crash,
    "Postgres restarted (immediate)": _postgres_restart,
    "HSM: CKR_DEVICE_REMOVED for 5 s": _hsm_window(CKR_DEVICE_REMOVED),
    "HSM: CKR_SESSION_HANDLE_INVALID for 5 s": _hsm_window(CKR_SESSION_HANDLE_INVALID),
    "one HSM lost (token B deleted, its worker killed -9), then replaced": _hsm_lost,
    "broker flood of invalid messages": _flood,
}
# Faults that need a standby (kmsq chaos --standby sync|async).
STANDBY_FAULTS: dict[str, Callable[[Deployment], None]] = {
    "Postgres primary killed -9, standby promoted": _postgres_failover,
}


def schedule_of(standby: str) -> dict[str, Callable[[Deployment], None]]:
    """The faults a run with a database ``standby`` (sync, async, none) injects, in order: every fault, and with a
    standby the failover right after the Postgres restart (early, while the provisioning job still writes)."""
    if standby == "none":
        return dict(FAULTS)
    names = list(FAULTS)
    at = names.index("Postgres restarted (immediate)") + 1
    ordered = [*names[:at], *STANDBY_FAULTS, *names[at:]]
    return {name: (FAULTS | STANDBY_FAULTS)[name] for name in ordered}


def run_schedule(d: Deployment, rounds: int, gap: float, stop: Callable[[], bool],
                 log: Callable[[str], None] = lambda _: None) -> list[FaultRecord]:  # fmt: skip
    """Injects every fault ``rounds`` times, ``gap`` seconds apart (after each one heals). Returns the
    records; stops early when ``stop()`` is true."""
    records: list[FaultRecord] = []
    for _ in range(rounds):
        for name, inject in schedule_of(d.postgres.standby).items():
            if stop():
                return records
            time.sleep(gap)
            record = FaultRecord(name, time.time())
            records.append(record)
            log(f"fault: {name}")
            inject(d)
            record.healed_at = time.time()
    return records

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

from kmsq.chaos.environment import POOL, Deployment, Redis, wait_until
from kmsq.chaos.hsm_faults import CKR_DEVICE_REMOVED, CKR_SESSION_HANDLE_INVALID, ChaosError
from kmsq.chaos.rabbitmq import RabbitCluster

QUEUE = f"kms.{POOL}"


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


def _redis(d: Deployment) -> Redis:
    if d.redis is None:
        raise ChaosError("a Redis fault in a run without Redis")
    return d.redis


def _redis_restart(d: Deployment) -> None:
    _redis(d).shutdown()
    time.sleep(2)
    _redis(d).start()


def _redis_crash(d: Deployment) -> None:
    _redis(d).kill()
    time.sleep(2)
    _redis(d).start()


def _rabbit(d: Deployment) -> RabbitCluster:
    if d.rabbit is None:
        raise ChaosError("a RabbitMQ fault in a run without RabbitMQ")
    return d.rabbit


def _rabbit_node_lost(leader: bool) -> Callable[[Deployment], None]:
    """A node of the cluster killed -9 under load (the pool queue's leader, or another one), then started
    again 5 s later; the fault heals once the node runs again (it rejoins the cluster and its queue replicas)."""

    def inject(d: Deployment) -> None:
        cluster = _rabbit(d)
        lead = cluster.leader_of(QUEUE)
        node = lead if leader else next(n for n in range(len(cluster.names)) if n != lead)
        cluster.kill(node)
        time.sleep(5)
        cluster.start_node(node)

    return inject


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
    if d.rabbit is not None:
        _flood_rabbit(d)
        return
    client = redis.Redis.from_url(_redis(d).url)
    queue = QUEUE
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


def _flood_rabbit(d: Deployment) -> None:
    """The same on RabbitMQ: 3,000 messages that are not task messages and 2,000 task messages from a caller
    nobody registered, published to the pool's quorum queue."""
    from amqp.basic_message import Message
    from kombu.connection import Connection

    cluster = _rabbit(d)
    args = [["nobody", "ed25519:0000000000000000", "e30", "c2ln"], {}, {"callbacks": None, "errbacks": None}]
    garbage = [b"not json", b"[1,2,3]", b'{"x": 1}', b"[" * 5000 + b"]" * 5000]
    with Connection(cluster.url) as conn:
        channel = conn.default_channel
        for i in range(3000):
            channel.basic_publish(Message(garbage[i % len(garbage)], content_type="application/json"), exchange="",
                                  routing_key=QUEUE)  # fmt: skip
        for _ in range(2000):
            task_id = str(uuid.uuid4())
            headers = {"task": "kmsq.generate_data_key", "id": task_id, "lang": "py", "retries": 0}
            channel.basic_publish(Message(json.dumps(args).encode(), content_type="application/json",
                                          content_encoding="utf-8", application_headers=headers,
                                          correlation_id=task_id, reply_to="kmsq.reply.nobody.x"),
                                  exchange="", routing_key=QUEUE)  # fmt: skip
    wait_until(lambda: cluster.depth(QUEUE) == 0, 120, "the flood to drain")


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


# With RabbitMQ (kmsq chaos --broker rabbitmq) these take the place of the Redis faults.
RABBITMQ_FAULTS: dict[str, Callable[[Deployment], None]] = {
    "RabbitMQ node killed -9 (not the pool queue's leader), restarted": _rabbit_node_lost(leader=False),
    "RabbitMQ node leading the pool queue killed -9, restarted": _rabbit_node_lost(leader=True),
}
REDIS_FAULTS = ("Redis restarted (clean shutdown)", "Redis killed (-9, AOF everysec)")


BROKER_FAULTS = (*REDIS_FAULTS, *RABBITMQ_FAULTS, "broker flood of invalid messages")


def schedule_of(
    standby: str, broker: str = "redis", broker_only: bool = False
) -> dict[str, Callable[[Deployment], None]]:
    """The faults a run with a database ``standby`` (sync, async, none) and a ``broker`` (redis, rabbitmq)
    injects, in order: every fault, with a standby the failover right after the Postgres restart (early, while
    the provisioning job still writes), and with RabbitMQ its node faults in the place of Redis's. With
    ``broker_only``, the broker's faults alone."""
    if broker_only:
        return {name: inject for name, inject in schedule_of(standby, broker).items() if name in BROKER_FAULTS}
    names: list[str] = []
    for name in FAULTS:
        if name in REDIS_FAULTS and broker == "rabbitmq":
            if name == REDIS_FAULTS[0]:
                names += list(RABBITMQ_FAULTS)
            continue
        names.append(name)
        if name == "Postgres restarted (immediate)" and standby != "none":
            names += list(STANDBY_FAULTS)
    every = FAULTS | STANDBY_FAULTS | RABBITMQ_FAULTS
    return {name: every[name] for name in names}


def run_schedule(d: Deployment, rounds: int, gap: float, stop: Callable[[], bool],
                 log: Callable[[str], None] = lambda _: None,
                 broker_only: bool = False) -> list[FaultRecord]:  # fmt: skip
    """Injects every fault of :func:`schedule_of` ``rounds`` times, ``gap`` seconds apart (after each one heals).
    Returns the records; stops early when ``stop()`` is true."""
    records: list[FaultRecord] = []
    for _ in range(rounds):
        for name, inject in schedule_of(d.postgres.standby, d.broker, broker_only).items():
            if stop():
                return records
            time.sleep(gap)
            record = FaultRecord(name, time.time())
            records.append(record)
            log(f"fault: {name}")
            inject(d)
            record.healed_at = time.time()
    return records

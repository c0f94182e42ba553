"""A private deployment for a chaos run, in one work directory: its own redis-server (append-only file,
fsync every second), its own PostgreSQL primary (with a synchronous or an asynchronous standby), a SoftHSM2
token behind the fault-injecting PKCS#11 module, and worker processes under a small supervisor. Faults are done
to these, never to shared services.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmsq.chaos.hsm_faults import ChaosError, FaultSwitch, build_fault_module, fault_environment
from kmsq.chaos.rabbitmq import RabbitCluster
from kmsq.procfs import alive, children_of

POOL = "chaos"


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Polls ``check`` until it is true. Raises ChaosError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise ChaosError(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(0.1)


def _tool(name: str) -> str:
    installed = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    found = shutil.which(name) or next(iter(installed), None)
    if found is None:
        raise ChaosError(f"kmsq chaos needs {name} (install redis-server and the postgresql server package)")
    return found


class Redis:
    """A private redis-server on 127.0.0.1 with an append-only file fsynced every second."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        """The broker URL workers and callers use."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Starts it (replaying its append-only file) and waits until it answers."""
        command = [_tool("redis-server"), "--bind", "127.0.0.1", "--port", str(self.port),
                   "--dir", str(self.directory), "--appendonly", "yes", "--appendfsync", "everysec",
                   "--save", "", "--logfile", "redis.log"]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._answers, 30, "redis-server start")

    def _answers(self) -> bool:
        result = subprocess.run([_tool("redis-cli"), "-p", str(self.port), "ping"], capture_output=True, text=True,
                                check=False)  # fmt: skip
        return result.stdout.strip() == "PONG"

    def shutdown(self) -> None:
        """A clean stop (SHUTDOWN: the append-only file is fsynced)."""
        subprocess.run([_tool("redis-cli"), "-p", str(self.port), "shutdown"], capture_output=True, check=False)
        if self.process is not None:
            self.process.wait(timeout=30)

    def kill(self) -> None:
        """A crash: SIGKILL (up to a second of writes is lost)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=30)


STANDBY_MODES = ("sync", "async", "none")


class Postgres:
    """A private PostgreSQL primary on 127.0.0.1, with a streaming standby unless ``standby`` is ``none``
    (``sync``: a commit waits until the standby has it, ``synchronous_standby_names = '*'``; ``async``: it does
    not). Clients reach it through a multi-host URL (``target_session_attrs=read-write``), so that after
    :meth:`fail_over` they find the promoted standby by themselves. Runs as the ``postgres`` user when this is
    root, in a directory of its own under the system's temporary directory (the work directory's parents may be
    closed to it); its nodes listen on TCP only."""

    def __init__(self, directory: Path, standby: str = "none") -> None:
        if standby not in STANDBY_MODES:
            raise ChaosError(f"standby must be one of {', '.join(STANDBY_MODES)}")
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            directory = Path(tempfile.mkdtemp(prefix="kmsq-chaos-pg-"))
            os.chmod(directory, 0o711)  # noqa: S103 - traversable only: the cluster directories below are 0700
        self.home = directory
        self.standby = standby
        self.ports = [free_port() for _ in range(1 if standby == "none" else 2)]
        self.primary = 0  # index of the node that is the primary now
        self.failovers = 0

    def node_dir(self, node: int) -> Path:
        """The data directory of node ``node``."""
        return self.home / f"node{node}"

    @property
    def directory(self) -> Path:
        """The primary's data directory."""
        return self.node_dir(self.primary)

    @property
    def port(self) -> int:
        """The primary's port."""
        return self.ports[self.primary]

    @property
    def url(self) -> str:
        """The database URL of the ``kmsq`` database: every node, the writable one chosen at connection."""
        if len(self.ports) == 1:
            return f"postgresql+psycopg://postgres@127.0.0.1:{self.ports[0]}/kmsq"
        hosts = "&".join(f"host=127.0.0.1:{port}" for port in self.ports)
        return f"postgresql+psycopg://postgres@/kmsq?{hosts}&target_session_attrs=read-write"

    def _run(self, *command: str) -> None:
        result = subprocess.run([*self.as_user, *command], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise ChaosError(f"{Path(command[0]).name} failed: {(result.stderr or result.stdout)[-500:]}")

    def _empty_dir(self, node: int) -> Path:
        directory = self.node_dir(node)
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        if self.as_user:
            shutil.chown(directory, "postgres", "postgres")
        os.chmod(directory, 0o700)
        return directory

    def create(self) -> None:
        """initdb (trust authentication on 127.0.0.1 only), start, create the ``kmsq`` database, and the
        standby when there is one. Raises ChaosError when a step fails."""
        directory = self._empty_dir(0)
        self._run(_tool("initdb"), "-D", str(directory), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self._start(0)
        self._run(_tool("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "kmsq")
        if self.standby != "none":
            self._make_standby(1)

    def _start(self, node: int) -> None:
        options = (f"-c listen_addresses=127.0.0.1 -p {self.ports[node]} -c unix_socket_directories='' "
                   f"-c cluster_name=node{node} -c wal_keep_size=512MB")  # fmt: skip
        directory = self.node_dir(node)
        self._run(_tool("pg_ctl"), "-D", str(directory), "-o", options, "-l", str(directory / "log"), "-w", "-t",
                  "120", "start")  # fmt: skip

    def start(self) -> None:
        """Starts the primary and waits until it accepts connections."""
        self._start(self.primary)

    def stop(self, mode: str) -> None:
        """Stops the primary: ``fast`` (clean) or ``immediate`` (a crash: recovery at the next start)."""
        self._stop(self.primary, mode)

    def _stop(self, node: int, mode: str) -> None:
        self._run(_tool("pg_ctl"), "-D", str(self.node_dir(node)), "-m", mode, "-w", "-t", "120", "stop")

    def stop_all(self) -> None:
        """Stops every node (fast); a node already down is left as it is."""
        for node in range(len(self.ports)):
            with contextlib.suppress(ChaosError):
                self._stop(node, "fast")

    def _sql(self, node: int, statement: str, *params: object) -> list[tuple[object, ...]]:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.ports[node], user="postgres", dbname="postgres",
                             autocommit=True, connect_timeout=5) as conn:  # fmt: skip
            cursor = conn.execute(statement, params or None)
            return list(cursor.fetchall()) if cursor.description else []

    def _answers(self, node: int, sql: str = "SELECT 1", *params: object) -> bool:
        try:
            return bool(self._sql(node, sql, *params))
        except Exception:  # not up yet, whatever the reason
            return False

    def _make_standby(self, node: int) -> None:
        """Makes ``node`` a streaming standby of the primary (pg_basebackup -R) and, for ``sync``, has the
        primary wait for it at every commit. Raises ChaosError when it does not stream within 120 s."""
        directory = self._empty_dir(node)
        self._run(_tool("pg_basebackup"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-D",
                  str(directory), "-R", "-X", "stream", "-c", "fast")  # fmt: skip
        self._start(node)
        streaming = "SELECT 1 FROM pg_stat_replication WHERE application_name = %s AND state = 'streaming'"
        wait_until(lambda: self._answers(self.primary, streaming, f"node{node}"), 120, f"standby node{node} streaming")
        # Only now: a primary told to wait for a standby that does not stream yet holds every commit.
        wanted = "'*'" if self.standby == "sync" else "''"
        self._sql(self.primary, f"ALTER SYSTEM SET synchronous_standby_names = {wanted}")
        self._sql(self.primary, "SELECT pg_reload_conf()")

    def _processes(self, node: int) -> list[int]:
        """The node's postmaster and its children (pids)."""
        try:
            postmaster = int((self.node_dir(node) / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return []
        return [postmaster, *children_of(postmaster)]

    def fail_over(self) -> float:
        """The primary is lost while the standby lags: the standby's WAL receiver is stopped for 2 s under load
        (with ``sync`` commits wait meanwhile; with ``async`` they are answered), then every process of the
        primary and the receiver are killed -9 (what the receiver had not read is gone with it), the standby is
        promoted, and the old primary's node is rebuilt as the new primary's standby. Returns the seconds from
        the kill to the promoted node taking writes. Raises ChaosError when a step fails."""
        if self.standby == "none":
            raise ChaosError("no standby to fail over to (kmsq chaos --standby sync|async)")
        old, new = self.primary, 1 - self.primary
        receiver = self._sql(new, "SELECT pid FROM pg_stat_wal_receiver")
        receiver_pid = int(str(receiver[0][0])) if receiver and receiver[0][0] is not None else None
        if receiver_pid is not None:
            os.kill(receiver_pid, signal.SIGSTOP)
        time.sleep(2)
        doomed = self._processes(old)
        for pid in doomed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if receiver_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(receiver_pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: not any(alive(pid) for pid in doomed), 30, "the old primary's exit")
        self._run(_tool("pg_ctl"), "-D", str(self.node_dir(new)), "-w", "-t", "120", "promote")
        wait_until(lambda: self._answers(new, "SELECT 1 WHERE NOT pg_is_in_recovery()"), 120, "the promotion")
        taken_over = time.monotonic() - killed
        self.primary = new
        self.failovers += 1
        self._make_standby(old)
        return taken_over

    def dump(self) -> bytes:
        """The whole ``kmsq`` database as pg_dump writes it (for the secrets scan)."""
        result = subprocess.run([_tool("pg_dump"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "kmsq"],
                                capture_output=True, check=True)  # fmt: skip
        return result.stdout


@dataclass
class Worker:
    """One ``kmsq worker`` (a main process and its pool processes)."""

    number: int
    process: subprocess.Popen[bytes]
    log: Path
    wanted: bool = True  # False while a fault keeps it down on purpose

    def children(self) -> list[int]:
        """The pool processes' pids."""
        return children_of(self.process.pid)


@dataclass
class Deployment:
    """The run's services, its ``KMSQ_*`` environment and its supervised workers."""

    work: Path
    redis: Redis | None  # the broker: Redis, or
    postgres: Postgres
    switch: FaultSwitch
    env: dict[str, str]
    # Host B: its own embedded token (no fault module), the same database and broker; worker 1 runs on it.
    env_b: dict[str, str] = field(default_factory=dict)
    workers: list[Worker] = field(default_factory=list)
    rabbit: RabbitCluster | None = None  # a three-node RabbitMQ cluster (kmsq chaos --broker rabbitmq)
    restarts: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def broker_url(self) -> str:
        """The URL workers and callers use (the run's namespace is in it for RabbitMQ: the vhost)."""
        return self.rabbit.url if self.rabbit is not None else self.redis.url if self.redis is not None else ""

    @property
    def broker(self) -> str:
        """``redis`` or ``rabbitmq``."""
        return "rabbitmq" if self.rabbit is not None else "redis"

    @property
    def home(self) -> Path:
        """KMSQ_HOME of the run (token, callers, fleet file)."""
        return Path(self.env["KMSQ_HOME"])

    @property
    def home_b(self) -> Path:
        """KMSQ_HOME of host B (its token)."""
        return Path(self.env_b["KMSQ_HOME"])

    def env_of(self, number: int) -> dict[str, str]:
        """The environment of worker ``number``: host B's for worker 1, host A's for the others."""
        return self.env_b if number == 1 and self.env_b else self.env

    def kmsq(self, *args: str, timeout: float = 300, on_b: bool = False) -> subprocess.CompletedProcess[str]:
        """Runs a ``kmsq`` command in the run's environment (host B's with ``on_b``). Raises ChaosError when it
        fails."""
        env = self.env_b if on_b else self.env
        result = subprocess.run([sys.executable, "-m", "kmsq", *args], env=env, capture_output=True, text=True,
                                timeout=timeout, check=False)  # fmt: skip
        if result.returncode != 0:
            raise ChaosError(f"kmsq {' '.join(args[:2])} failed: {result.stderr.strip()[-500:]}")
        return result

    def start_worker(self, number: int) -> Worker:
        """Starts worker ``number`` (2 pool processes) and waits until it is ready."""
        log = self.work / f"worker-{number}.log"
        with log.open("ab") as out:
            process = subprocess.Popen([sys.executable, "-m", "kmsq", "worker", "--pool", POOL, "--concurrency", "2"],
                                       env=self.env_of(number), stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)  # fmt: skip
        worker = Worker(number, process, log)
        wait_until(lambda: len(worker.children()) >= 2 or process.poll() is not None, 60, f"worker {number} start")
        return worker

    def enroll_token_b(self) -> None:
        """Puts host B's token into the deployment, as an operator does (docs/OPERATIONS.md, "Key custody"): B
        enrolled, its transport key trusted by A's security officer, the keys wrapped on A and taken on B.
        Raises ChaosError when a step fails."""
        enrolled = json.loads(self.kmsq("hsm", "enroll", "--json", on_b=True).stdout)
        self.kmsq("hsm", "trust", enrolled["name"], "--fingerprint", enrolled["fingerprint"], "--so-pin-file",
                  str(self.home / "hsm-so.pin"))  # fmt: skip
        self.kmsq("hsm", "replicate")
        self.kmsq("hsm", "replicate", on_b=True)

    def supervise(self) -> None:
        """Restarts (after 1 s) every worker that exits while it is wanted, as systemd or compose would."""

        def loop() -> None:
            while not self._stop.wait(0.5):
                with self._lock:
                    for i, worker in enumerate(self.workers):
                        if worker.wanted and worker.process.poll() is not None:
                            time.sleep(1)
                            try:
                                self.workers[i] = self.start_worker(worker.number)
                            except ChaosError:
                                continue  # not ready yet (its database may be down): tried again
                            self.restarts += 1

        threading.Thread(target=loop, name="chaos-supervisor", daemon=True).start()

    def signal_worker(self, index: int, sig: signal.Signals, whole_group: bool) -> None:
        """Sends ``sig`` to a worker's main process, or to its whole process group (main and pool)."""
        worker = self.workers[index]
        if whole_group:
            os.killpg(worker.process.pid, sig)
        else:
            worker.process.send_signal(sig)

    def kill_pool_process(self, index: int) -> None:
        """SIGKILL to one pool process of a worker (Celery replaces it)."""
        children = self.workers[index].children()
        if children:
            os.kill(children[0], signal.SIGKILL)

    def close(self) -> None:
        """Stops the workers, Redis and Postgres."""
        self._stop.set()
        with self._lock:
            for worker in self.workers:
                worker.wanted = False
                if worker.process.poll() is None:
                    worker.process.send_signal(signal.SIGTERM)
            for worker in self.workers:
                try:
                    worker.process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(worker.process.pid, signal.SIGKILL)
        self.switch.clear()
        if self.redis is not None:
            self.redis.shutdown()
        if self.rabbit is not None:
            self.rabbit.close()
        self.postgres.stop_all()
        if self.postgres.home != self.work / "postgres":
            shutil.rmtree(self.postgres.home, ignore_errors=True)


def create(
    work: Path, workers: int, standby: str = "none", broker: str = "redis", two_tokens: bool = True
) -> Deployment:
    """Builds the run's deployment under ``work`` and starts it: services, token, ``kmsq init``, workers (with
    ``two_tokens`` and more than one worker, worker 1 on host B's token, enrolled as an operator does).

    Raises ChaosError when a tool is missing or something does not start.
    """
    from worker.config import SOFTHSM2_LIBRARY_PATHS, load_settings
    from worker.softhsm import ensure_embedded_token

    work.mkdir(parents=True, exist_ok=True)
    home = work / "home"
    real_module = next((p for p in SOFTHSM2_LIBRARY_PATHS if Path(p).exists()), None)
    if real_module is None:
        raise ChaosError("kmsq chaos needs SoftHSM2 (the softhsm2 package)")
    settings = load_settings({"KMSQ_HOME": str(home)})
    ensure_embedded_token(settings)  # an embedded token, then used through the fault module
    switch = FaultSwitch(work / "hsm-fault")
    switch.clear()
    module = build_fault_module(work)
    redis, rabbit = None, None
    postgres = Postgres(work / "postgres", standby)
    try:
        if broker == "rabbitmq":
            rabbit = RabbitCluster()
            rabbit.create()
        else:
            redis = Redis(work / "redis")
            redis.start()
        postgres.create()
        return _deploy(work, settings, module, real_module, switch, redis, rabbit, postgres, workers, two_tokens)
    except BaseException:  # nothing left running: the clusters live outside the work directory
        if rabbit is not None:
            rabbit.close()
        if redis is not None:
            redis.kill()
        postgres.stop_all()
        if postgres.home != work / "postgres":
            shutil.rmtree(postgres.home, ignore_errors=True)
        raise


def _deploy(work: Path, settings: Any, module: Path, real_module: str, switch: FaultSwitch, redis: Redis | None,
            rabbit: RabbitCluster | None, postgres: Postgres, workers: int,
            two_tokens: bool) -> Deployment:  # fmt: skip
    home = work / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KMSQ_", "SOFTHSM2_"))}
    env |= {
        "KMSQ_HOME": str(home),
        "KMSQ_DATABASE_URL": postgres.url,
        "KMSQ_BROKER_URL": rabbit.url if rabbit is not None else redis.url if redis is not None else "",
        "KMSQ_DEFAULT_POOL": POOL,
        "KMSQ_PKCS11_MODULE": str(module),
        "KMSQ_PKCS11_TOKEN_LABEL": settings.pkcs11_token_label,
        "KMSQ_PKCS11_PIN_FILE": str(settings.embedded_pin_file),
        "SOFTHSM2_CONF": str(settings.softhsm2_conf),
        **fault_environment(real_module, switch),
    }
    host_b = {name: value for name, value in env.items() if not name.startswith(("KMSQ_PKCS11_", "KMSQ_FAULT_"))
              and name != "SOFTHSM2_CONF"}  # fmt: skip
    two_tokens = two_tokens and workers > 1
    env_b = host_b | {"KMSQ_HOME": str(work / "home-b")} if two_tokens else {}
    deployment = Deployment(work, redis, postgres, switch, env, env_b, rabbit=rabbit)
    try:
        deployment.kmsq("init")
        if two_tokens:  # host B pins the deployment's operator set too (docs/DUAL_CONTROL.md)
            Path(env_b["KMSQ_HOME"]).mkdir(parents=True, exist_ok=True)
            shutil.copy(home / "operator-set.json", Path(env_b["KMSQ_HOME"]) / "operator-set.json")
            deployment.enroll_token_b()
        deployment.workers = [deployment.start_worker(n) for n in range(workers)]
    except BaseException:
        for worker in deployment.workers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.process.pid, signal.SIGKILL)
        raise
    deployment.supervise()
    return deployment

"""Operator commands for the queue: workers, the embedded broker, fleet keys and the caller registry."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from kmsq.output import EXIT_INVALID, console, one_line_errors, print_json, print_table
from schemas.wire import pool_queue


def _settings() -> Any:
    from worker.config import load_settings

    return load_settings()


def _service() -> Any:
    from worker.runtime import KeyService

    return KeyService.from_settings(_settings())


# -- worker ----------------------------------------------------------------------------------------


@click.command()
@click.option("--pool", default=None, help="HSM pool to serve (default: the configured default pool).")
@click.option("--concurrency", "-c", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option("--loglevel", default="info", show_default=True)
@click.option("--benchmark-noop", is_flag=True, hidden=True, help="Also serve kmsq.noop (kmsq bench's baseline).")
@one_line_errors
def worker(pool: str | None, concurrency: int, loglevel: str, benchmark_noop: bool) -> None:
    """Run a worker that consumes only the pool's queue kms.<pool>."""
    from sqlalchemy import select

    from worker.errors import ConfigError
    from worker.runtime import transaction
    from worker.storage.db import create_db_engine, session_factory
    from worker.storage.models import FleetKey

    settings = _settings()
    pool = pool or settings.default_pool
    # Checked in this (parent) process without touching the HSM: children open their own sessions.
    engine = create_db_engine(settings.database_url)
    try:
        with transaction(session_factory(engine)) as db:
            has_fleet_key = db.scalars(select(FleetKey.pool).where(FleetKey.pool == pool)).first() is not None
    finally:
        engine.dispose()
    if not has_fleet_key:
        raise ConfigError(f"pool {pool!r} has no fleet key (run: kmsq fleet-key create --pool {pool})")
    if settings.embedded_broker:
        from kmsq import broker

        broker.start(settings.home)
    os.environ["KMSQ_WORKER_POOL"] = pool
    if benchmark_noop:
        os.environ["KMSQ_WORKER_NOOP"] = "1"
    from tasks.worker import app

    argv = [
        "worker",
        "--queues", pool_queue(pool),
        "--concurrency", str(concurrency),
        "--pool", "prefork",
        "--hostname", f"{pool}.{os.getpid()}@%h",
        "--loglevel", loglevel,
        "--without-gossip",
        "--without-mingle",
    ]  # fmt: skip
    app.worker_main(argv)


# -- embedded broker -------------------------------------------------------------------------------


@click.group("broker")
def broker_group() -> None:
    """The embedded broker (a private redis-server on a Unix socket under KMSQ_HOME)."""


@broker_group.command("start")
@one_line_errors
def broker_start() -> None:
    """Start the embedded broker unless it is running."""
    from kmsq import broker

    home = _settings().home
    started = broker.start(home)
    console.print(f"broker {'started' if started else 'already running'} on {broker.socket_path(home)}")


@broker_group.command("stop")
@one_line_errors
def broker_stop() -> None:
    """Stop the embedded broker."""
    from kmsq import broker

    console.print("broker stopped" if broker.stop(_settings().home) else "broker was not running")


# -- fleet keys ------------------------------------------------------------------------------------


@click.group("fleet-key")
def fleet_key() -> None:
    """The pools' fleet keys (reply signing and inbound transport)."""


@fleet_key.command("create")
@click.option("--pool", default=None, help="Pool (default: the configured default pool).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def fleet_key_create(pool: str | None, as_json: bool) -> None:
    """Create the pool's fleet keys (sealed under its root key) unless they exist."""
    service = _service()
    public, created = service.ensure_fleet_key(pool)
    if as_json:
        print_json({**asdict(public), "signing_key_id": public.signing_key_id, "created": created})
    else:
        console.print(
            f"fleet key of pool {public.pool}: {public.signing_key_id} ({'created' if created else 'exists'})"
        )


@fleet_key.command("export")
@click.option("--pool", "pools", multiple=True, help="Only these pools (default: all).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write to a file instead of stdout.")
@one_line_errors
def fleet_key_export(pools: tuple[str, ...], out: Path | None) -> None:
    """Print the fleet file callers use: public keys and root keys per pool (JSON)."""
    document = _service().fleet_document(list(pools) or None)
    if not document["pools"]:
        from worker.errors import NotFound

        raise NotFound("no fleet keys yet (run: kmsq init, or kmsq fleet-key create --pool NAME)")
    text = json.dumps(document, indent=2) + "\n"
    if out is None:
        sys.stdout.write(text)
    else:
        from worker.errors import ConfigError

        try:
            out.parent.mkdir(parents=True, exist_ok=True)  # a new deployment's directory, e.g. /etc/kmsq
            out.write_text(text, encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot write {out}: {e.strerror or type(e).__name__}") from None
        console.print(f"wrote {out} ({', '.join(document['pools'])})")


# -- caller registry -------------------------------------------------------------------------------


def _split(values: str | None) -> list[str]:
    return [v.strip() for v in (values or "").split(",") if v.strip()]


@click.command("add")
@click.argument("name")
@click.option("--public-key", "public_key", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--allow", required=True, help="Operations, comma-separated (e.g. generate_data_key,put_key).")
@click.option("--root-keys", default=None, help="Root key ids the caller may use, comma-separated.")
@click.option("--all-root-keys", is_flag=True, help="Allow every root key, including future ones.")
@click.option("--plaintext", is_flag=True, help="Allow operations that return plaintext secrets.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def caller_add(
    name: str, public_key: Path, allow: str, root_keys: str | None, all_root_keys: bool, plaintext: bool, as_json: bool
) -> None:
    """Register a caller from its NAME.pub.json."""
    from worker import callers
    from worker.errors import InvalidRequest
    from worker.runtime import transaction

    if all_root_keys == (root_keys is not None):
        raise InvalidRequest("give exactly one of --root-keys and --all-root-keys")
    identity = callers.read_public_identity(public_key)
    if identity.caller != name:
        raise InvalidRequest(f"{public_key} is the identity of {identity.caller!r}, not {name!r}")
    service = _service()
    with transaction(service.sessions) as db:
        info = callers.add_caller(
            service.hsm, db, name, identity, _split(allow), None if all_root_keys else _split(root_keys), plaintext
        )
    if as_json:
        print_json(asdict(info))
    else:
        console.print(f"registered caller {info.name} ({info.key_id}): {', '.join(info.allowed_ops)}")


@click.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def caller_list(as_json: bool) -> None:
    """List registered callers."""
    from worker import callers
    from worker.runtime import transaction

    with transaction(_service().sessions) as db:
        infos = callers.list_callers(db)
    if as_json:
        print_json([asdict(i) for i in infos])
        return
    print_table(
        "callers",
        ["name", "key id", "operations", "root keys", "plaintext", "state"],
        [
            [i.name, i.key_id, ",".join(i.allowed_ops), "all" if i.root_keys is None else ",".join(i.root_keys),
             "yes" if i.plaintext else "no", i.state]
            for i in infos
        ],
    )  # fmt: skip


def _set_state(name: str, state: str) -> None:
    from worker import callers
    from worker.runtime import transaction

    service = _service()
    with transaction(service.sessions) as db:
        info = callers.set_caller_state(service.hsm, db, name, state)
    console.print(f"caller {info.name} is {info.state}")


@click.command("disable")
@click.argument("name")
@one_line_errors
def caller_disable(name: str) -> None:
    """Disable a caller: its requests are rejected as unauthenticated from now on."""
    _set_state(name, "disabled")


@click.command("enable")
@click.argument("name")
@one_line_errors
def caller_enable(name: str) -> None:
    """Enable a disabled caller again."""
    _set_state(name, "enabled")


# -- benchmark -------------------------------------------------------------------------------------


def _print_cpu(report: dict[str, Any]) -> None:
    """B's and C's CPU per round trip by process group, and W (C's work without messaging)."""
    for workers, measured in report["workers"].items():
        for name in ("B_noop_round_trip", "C_generate_data_key"):
            cpu = measured[name].get("cpu_ms_per_item")
            if cpu:
                parts = ", ".join(f"{k} {v}" for k, v in cpu.items())
                console.print(f"{workers} worker(s), {name}: CPU ms per round trip: {parts}")
    if "W_request_work" in report:
        console.print(f"W, C's own work without messaging: {report['W_request_work']['cpu_ms_per_item']} CPU ms")


@click.command()
@click.option("--quick", is_flag=True, help="Tiny sizes (CI): checks that every figure is produced.")
@click.option("--workers", "worker_counts", default="1,2", show_default=True, help="Worker process counts.")
@click.option("--rss-job", "rss_keys", type=click.IntRange(0), default=0, help="Also provision N keys, sampling RSS.")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("bench-results"),
              show_default=True)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@one_line_errors
def bench(quick: bool, worker_counts: str, rss_keys: int, out_dir: Path, as_json: bool) -> None:
    """Measure A-F side by side (see docs/PERFORMANCE.md); writes OUT_DIR/bench.json and bench.png."""
    from kmsq.bench import BATCH_SIZES, run_bench

    counts = sorted({int(c) for c in worker_counts.split(",") if c.strip()})

    def log(message: str) -> None:
        if not as_json:
            console.print(f"[dim]{message}[/dim]")

    report = run_bench(quick, counts, rss_keys, out_dir, log)
    if as_json:
        print_json(report)
        return
    rows = [["A raw HSM loop (1 process)", "-", report["A_raw_hsm"]["per_s"], report["A_raw_hsm"]["p50_ms"],
             report["A_raw_hsm"]["p99_ms"]],
            ["F PBKDF2+AES-CCM (1 process)", "-", report["F_pbkdf2_aes_ccm"]["per_s"],
             report["F_pbkdf2_aes_ccm"]["p50_ms"], report["F_pbkdf2_aes_ccm"]["p99_ms"]]]  # fmt: skip
    for workers, m in report["workers"].items():
        named = [("B noop round trip", m["B_noop_round_trip"]), ("C generate_data_key", m["C_generate_data_key"])]
        named += [(f"D generate_data_keys x{s}", m["D_generate_data_keys"][str(s)]) for s in BATCH_SIZES]
        named += [("E put_key", m["E_put_key_single"]), ("E put_keys x100", m["E_put_keys_batch_100"])]
        rows += [[name, workers, r["per_s"], r["p50_ms"], r["p99_ms"]] for name, r in named]
    print_table(
        "kmsq bench (items/s; latency per message)", ["measurement", "workers", "items/s", "p50 ms", "p99 ms"], rows
    )
    _print_cpu(report)
    for workers, r in report["ratios"].items():
        if workers != "targets":
            console.print(f"{workers} worker(s): " + ", ".join(f"{k} = {v}" for k, v in r.items()))
    console.print(f"targets: {report['ratios']['targets']}; wrote {out_dir / 'bench.json'} and {out_dir / 'bench.png'}")


# -- policy -------------------------------------------------------------------------------------------------


@click.group("policy")
def policy_group() -> None:
    """The HSM-held MACs over callers and root keys, which workers check on every load."""


def _review(seal: bool, as_json: bool) -> None:
    from worker import policy
    from worker.runtime import transaction

    service = _service()
    with transaction(service.sessions) as db:
        statuses = policy.review(service.hsm, db, seal_failing=seal)
    failing = [s.row for s in statuses if not s.verifies]
    if as_json:
        print_json({"rows": len(statuses), "failing": failing, "sealed": failing if seal else []})
    else:
        for row in failing:
            console.print(f"{'sealed' if seal else 'FAILS '} {row}")
        console.print(f"{len(statuses)} rows, {len(failing)} " + ("sealed" if seal else "failing the check"))
    if failing and not seal:
        sys.exit(EXIT_INVALID)


@policy_group.command("check")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def policy_check(as_json: bool) -> None:
    """List the caller and root key rows whose MAC is missing or wrong (workers refuse them); exit 7 if any."""
    _review(seal=False, as_json=as_json)


@policy_group.command("seal")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def policy_seal(as_json: bool) -> None:
    """Approve every caller and root key row as it stands now: seal the ones that fail the check.

    Run it once after upgrading to a kmsq with policy MACs, after reviewing `kmsq caller list` and
    `kmsq root-key list`: whatever the database holds then becomes trusted."""
    _review(seal=True, as_json=as_json)

"""``kmsq bench``: the measurements of docs/PERFORMANCE.md (run by kmsq.bench), printed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from kmsq.output import console, one_line_errors, print_json, print_table


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
    if "W_audit_append" in report:
        append = report["W_audit_append"]["append"]
        console.print(f"W, the audit chain's append: {append['cpu_ms']} CPU ms, {append['wall_ms']} ms wall")


def _print_gateway(report: dict[str, Any]) -> None:
    """G: each endpoint and client count, coalescing off and on."""
    for workers, measured in report["workers"].items():
        g = measured.get("G_gateway")
        if not g:
            continue
        rows = []
        for endpoint, cells in g["on"].items():
            for clients, on in cells.items():
                off = g["off"][endpoint][clients]
                rows.append([endpoint, clients, off["per_s"], on["per_s"], round(on["per_s"] / off["per_s"], 2),
                             off["p99_ms"], on["p99_ms"], off["cpu_ms_per_item"]["total"],
                             on["cpu_ms_per_item"]["total"]])  # fmt: skip
        print_table(
            f"G: the gateway, {workers} worker processes (HTTP requests/s; CPU ms per request, all processes)",
            ["endpoint", "clients", "off /s", "on /s", "on/off", "p99 off", "p99 on", "CPU off", "CPU on"],
            rows,
        )


@click.command()
@click.option("--quick", is_flag=True, help="Tiny sizes (CI): checks that every figure is produced.")
@click.option("--workers", "worker_counts", default="1,2", show_default=True, help="Worker process counts.")
@click.option("--rss-job", "rss_keys", type=click.IntRange(0), default=0, help="Also provision N keys, sampling RSS.")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("bench-results"),
              show_default=True)  # fmt: skip
@click.option("--compare-broker", "other_broker", default=None, metavar="URL",
              help="Also measure B, C, D and G on this broker (amqp://... for RabbitMQ, KMSQ_NAMESPACE its vhost) "
                   "and report each figure over KMSQ_BROKER_URL's.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@one_line_errors
def bench(quick: bool, worker_counts: str, rss_keys: int, out_dir: Path, other_broker: str | None,
          as_json: bool) -> None:  # fmt: skip
    """Measure A-F side by side (see docs/PERFORMANCE.md); writes OUT_DIR/bench.json and bench.png."""
    from kmsq.bench import BATCH_SIZES, run_bench

    counts = sorted({int(c) for c in worker_counts.split(",") if c.strip()})

    def log(message: str) -> None:
        if not as_json:
            console.print(f"[dim]{message}[/dim]")

    report = run_bench(quick, counts, rss_keys, out_dir, log, other_broker)
    if as_json:
        print_json(report)
        return
    rows = [["A raw HSM loop (1 process)", "-", report["A_raw_hsm"]["per_s"], report["A_raw_hsm"]["p50_ms"],
             report["A_raw_hsm"]["p99_ms"]],
            ["F PBKDF2+AES-CCM (1 process)", "-", report["F_pbkdf2_aes_ccm"]["per_s"],
             report["F_pbkdf2_aes_ccm"]["p50_ms"], report["F_pbkdf2_aes_ccm"]["p99_ms"]],
            ["R rewrap stored rows (1 process)", "-", report["R_rewrap"]["per_s"], report["R_rewrap"]["p50_ms"],
             report["R_rewrap"]["p99_ms"]]]  # fmt: skip
    for workers, m in report["workers"].items():
        named = [("B noop round trip", m["B_noop_round_trip"]), ("C generate_data_key", m["C_generate_data_key"])]
        if "C_coalesced" in m:
            named.append((f"C through coalescing, {m['C_coalesced']['in_flight']} in flight", m["C_coalesced"]))
        named += [(f"D generate_data_keys x{s}", m["D_generate_data_keys"][str(s)]) for s in BATCH_SIZES]
        named += [("E put_key", m["E_put_key_single"]), ("E put_keys x100", m["E_put_keys_batch_100"])]
        rows += [[name, workers, r["per_s"], r["p50_ms"], r["p99_ms"]] for name, r in named]
    print_table(
        "kmsq bench (items/s; latency per message)", ["measurement", "workers", "items/s", "p50 ms", "p99 ms"], rows
    )
    _print_gateway(report)
    _print_cpu(report)
    for workers, r in report["ratios"].items():
        if workers.isdigit():
            console.print(f"{workers} worker(s): " + ", ".join(f"{k} = {v}" for k, v in r.items() if k != "G"))
    comparison = report.get("broker_comparison")
    if comparison:
        console.print(f"on {comparison['broker']} over the first broker (items/s, {comparison['workers']} workers): "
                      + ", ".join(f"{k} = {v}" for k, v in comparison["over_first_broker"].items()))  # fmt: skip
    console.print(f"R_over_A = {report['ratios'].get('R_over_A')} (rows rewrapped per data key generated)")
    console.print(f"targets: {report['ratios']['targets']}")
    console.print(f"wrote {out_dir / 'bench.json'}, {out_dir / 'bench.png'} and {out_dir / 'bench-gateway.png'}")

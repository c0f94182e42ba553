"""``kmsq soak``: many requests with a short retention, showing that what kmsq keeps stays flat (kmsq.soak)."""

from __future__ import annotations

from pathlib import Path

import click

from kmsq.output import console, one_line_errors, print_json, print_table


@click.command()
@click.option("--requests", type=click.IntRange(1), default=1_000_000, show_default=True, help="Requests to run.")
@click.option("--in-flight", type=click.IntRange(1, 10_000), default=64, show_default=True)
@click.option("--coalesce", is_flag=True, help="Coalesce concurrent requests into batch messages, as the gateway.")
@click.option("--workers", type=click.IntRange(1, 64), default=2, show_default=True, help="Pool processes.")
@click.option("--ttl", type=click.IntRange(1, 3600), default=5, show_default=True, help="Request validity (s).")
@click.option("--skew", type=click.IntRange(0, 3600), default=1, show_default=True, help="Clock skew (s).")
@click.option("--grace", type=click.IntRange(0), default=5, show_default=True, help="Reply grace (s).")
@click.option("--audit-retention", type=click.IntRange(1), default=60, show_default=True, help="Seconds.")
@click.option("--no-prune", is_flag=True, help="The worker does not prune (to measure what pruning costs).")
@click.option("--sample-seconds", type=click.FloatRange(0.5), default=5.0, show_default=True)
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("soak-results"),
              show_default=True)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@one_line_errors
def soak(requests: int, in_flight: int, coalesce: bool, workers: int, ttl: int, skew: int, grace: int,
         audit_retention: int, no_prune: bool, sample_seconds: float, out_dir: Path,
         as_json: bool) -> None:  # fmt: skip
    """Run REQUESTS generate_data_key requests through a worker of its own with a short retention, sampling the
    database, Redis and worker memory; writes OUT_DIR/soak.json and soak.png (see docs/PERFORMANCE.md)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from kmsq.soak import SoakConfig, run_soak

    config = SoakConfig(requests, in_flight, coalesce, workers, ttl, skew, grace, audit_retention,
                        0 if no_prune else 1, sample_seconds)  # fmt: skip
    with Progress(TextColumn("soak"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, disable=as_json) as bar:  # fmt: skip
        task = bar.add_task("requests", total=requests)

        def log(message: str) -> None:
            if not as_json:
                console.print(f"[dim]{message}[/dim]")

        report = run_soak(config, out_dir, log, lambda done: bar.update(task, completed=done))
    if as_json:
        print_json(report)
        return
    steady = report["steady"]
    rows = [[name, value["min"], value["max"], value["growth"]] for name, value in steady.items()
            if isinstance(value, dict)]  # fmt: skip
    print_table(f"after {steady['warm_up_seconds']} s of warm-up ({steady['samples']} samples)",
                ["figure", "min", "max", "growth (2nd half / 1st)"], rows)  # fmt: skip
    console.print(
        f"{report['requests']:,} requests in {report['elapsed_s']} s ({report['per_s']}/s, p50 {report['p50_ms']} ms,"
        f" p99 {report['p99_ms']} ms); {steady['bytes_per_request_row']} bytes per request record, "
        f"{steady['request_bytes_per_request_kept']} per request kept; expected records "
        f"{steady['expected_request_rows'] or '-'}; audit chain "
        f"{'intact' if report['audit_chain']['ok'] else 'BROKEN'}; CPU ms per request "
        f"{report['cpu_ms_per_request']['total']}"
    )
    console.print(f"wrote {out_dir / 'soak.json'} and {out_dir / 'soak.png'}")

"""``kmsq chaos``: the fault-injection run of kmsq.chaos, printed (docs/RELIABILITY.md)."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from kmsq.chaos.run import SCHEDULES, run
from kmsq.output import console, one_line_errors, print_json


def _print(report: dict[str, Any]) -> None:
    from rich.table import Table

    requests = report["requests"]
    summary = Table(
        title=f"kmsq chaos ({report['schedule']}, Postgres standby {report['standby']}): {report['seconds']} s"
    )
    for column in ("sent", "answered", "retried", "lost", "duplicated effects", "job keys", "job runs",
                   "workers restarted"):  # fmt: skip
        summary.add_column(column)
    summary.add_row(*(str(v) for v in (requests["sent"], requests["answered"], requests["retried"], requests["lost"],
                                       requests["duplicated_effects"], report["job"]["keys"], report["job"]["runs"],
                                       report["workers_restarted"])))  # fmt: skip
    console.print(summary)
    table = Table(title="faults")
    for column in ("fault", "lasted s", "recovery s", "ok/s during", "ok/s after"):
        table.add_column(column)
    for f in report["faults"]:
        table.add_row(f["fault"], str(f["lasted_s"]), str(f["recovery_s"]), str(f["ok_per_s_during"]),
                      str(f["ok_per_s_after"]))  # fmt: skip
    console.print(table)
    checks = Table(title="checks")
    for column in ("check", "result", "detail"):
        checks.add_column(column)
    for c in report["checks"]:
        checks.add_row(c["check"], "ok" if c["ok"] else "[red]FAILED[/red]", c["detail"])
    console.print(checks)


@click.command("chaos")
@click.option("--keys", type=click.IntRange(1), default=5000, show_default=True, help="Keys the job stores.")
@click.option("--schedule", type=click.Choice(sorted(SCHEDULES)), default="short", show_default=True,
              help="short: every fault once; long: twice; broker: the broker's faults once.")  # fmt: skip
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the run's services and records go (default: a new temporary directory).")  # fmt: skip
@click.option("--standby", type=click.Choice(["sync", "async", "none"]), default="sync", show_default=True,
              help="The database's standby: sync (a commit waits for it), async, or none. With a standby the "
                   "schedule has the fault 'Postgres primary killed -9, standby promoted'.")  # fmt: skip
@click.option("--broker", type=click.Choice(["redis", "rabbitmq"]), default="redis", show_default=True,
              help="redis: a private redis-server; rabbitmq: a private three-node RabbitMQ cluster (quorum queues), "
                   "whose node faults take the place of Redis's.")  # fmt: skip
@click.option("--keep", is_flag=True, help="Keep the work directory (it is kept anyway when a check fails).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@one_line_errors
def chaos(keys: int, schedule: str, work_dir: Path | None, standby: str, broker: str, keep: bool,
          as_json: bool) -> None:  # fmt: skip
    """Run a workload against a private deployment (its own Redis, Postgres, SoftHSM2 token behind a
    fault-injecting PKCS#11 module, and workers) while injecting faults; report what was lost."""
    from kmsq.chaos.checker import write_report

    work = work_dir or Path(tempfile.mkdtemp(prefix="kmsq-chaos-"))

    def log(text: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {text}"
        if as_json:  # the report alone on stdout; the progress on stderr
            click.echo(line, err=True)
        else:
            console.print(f"[dim]{line[:8]}[/dim]{line[8:]}")

    from kmsq.chaos.hsm_faults import ChaosError
    from kmsq.output import EXIT_CONFIG, fail

    try:
        report = run(keys, schedule, work, log, standby, broker)
    except ChaosError as e:
        fail(f"kmsq chaos cannot run here: {e}", EXIT_CONFIG)
    write_report(work / "report.json", report)
    if as_json:
        print_json(report)
    else:
        _print(report)
        console.print(f"report: {work / 'report.json'}; history: {work / 'history.jsonl'}")
    if report["ok"] and not keep and work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    if not report["ok"]:
        raise SystemExit(1)

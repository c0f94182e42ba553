"""``kmsq provision``: many data keys generated, or many private keys stored, in batches; resumable."""

from __future__ import annotations

import time
from pathlib import Path

import click

from kmsq.commands.common import caller_options, open_client
from kmsq.output import console, one_line_errors, print_json


@click.command("provision")
@click.option("--count", type=click.IntRange(1), help="Data keys to generate.")
@click.option("--put-from", "put_from", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Store the keys of this JSONL file ({pub, prv, coin, source, type} per line) instead.")  # fmt: skip
@click.option("--batch", type=click.IntRange(1, 1000), default=1000, show_default=True, help="Items per message.")
@click.option("--in-flight", "in_flight", type=click.IntRange(1, 256), default=4, show_default=True,
              help="Batches outstanding at once.")  # fmt: skip
@click.option("--root-key", default=None, help="Root key id (default: the pool's default root key).")
@click.option("--with-plaintext", is_flag=True, help="Also write each plaintextKey (needs the plaintext permission).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Output JSONL (0600).")
@click.option("--job", "job_id", default=None, help="Job id: give the same one to resume an interrupted run.")
@click.option("--lane", type=click.Choice(["bulk", "interactive"]), default="bulk", show_default=True,
              help="The pool queue the batches go to (docs/OPERATIONS.md, Sharing a pool).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (no progress bar).")
@caller_options
@one_line_errors
def provision(
    count: int | None,
    put_from: Path | None,
    batch: int,
    in_flight: int,
    root_key: str | None,
    with_plaintext: bool,
    out: Path,
    job_id: str | None,
    lane: str,
    as_json: bool,
    identity: Path | None,
    fleet: Path | None,
    timeout: float,
) -> None:
    """Generate COUNT data keys (or store the keys of --put-from) in batches; resumable with --job."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from kmsq import provision as prov
    from kmsq.output import EXIT_USAGE, fail

    if (count is None) == (put_from is None):
        fail("give exactly one of --count and --put-from", EXIT_USAGE)
    from tasks.client import put_keys_batches

    items = prov.read_put_items(put_from) if put_from else None
    fresh = prov.Job(
        job=job_id or prov.new_job_id(),
        mode="put" if items else "generate",
        total=len(items) if items else int(count or 0),
        batch=batch,
        root_key_id=root_key,
        with_plaintext=with_plaintext,
        source=str(put_from.resolve()) if put_from else None,
        ranges=put_keys_batches(items, batch) if items else [],
    )
    try:
        job = prov.open_job(out, job_id, fresh)
    except prov.ProvisionError as e:
        fail(str(e), EXIT_USAGE)
        return
    with open_client(identity, fleet, timeout, reply_queue=f"job-{job.job}", lane=lane) as client:
        runner = prov.Provisioner(client, job, out, in_flight, items)
        if as_json:
            runner.run()
        else:
            console.print(f"job {job.job}: {job.total} items in {job.batches} batches -> {out}"
                          + (f" (resuming: {runner.stats.resumed_keys} done)" if job.done else ""))  # fmt: skip
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[rate]} keys/s"), TimeRemainingColumn())  # fmt: skip
            with Progress(*columns, console=console) as bar:
                task = bar.add_task("provisioning", total=job.total, completed=runner.stats.resumed_keys, rate="-")

                def advance(n: int) -> None:
                    elapsed = max(time.monotonic() - runner.stats.started, 1e-9)
                    bar.update(task, advance=n, rate=f"{(runner.stats.keys + runner.stats.errors) / elapsed:,.0f}")

                runner.run(advance)
    summary = runner.stats.summary(job, out)
    if as_json:
        print_json(summary)
    else:
        console.print(
            f"{summary['keys']} keys, {summary['errors']} errors, {summary['already_done']} from before, "
            f"{summary['elapsed_s']} s, {summary['keys_per_s']} keys/s"
        )

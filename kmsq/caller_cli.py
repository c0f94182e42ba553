"""Caller commands: make an identity, and run the four key-provider operations through the queue.

They print JSON with the key-provider API's field names and need only the caller install (no HSM or
database code). Settings: ``KMSQ_BROKER_URL`` (default: the embedded broker under ``KMSQ_HOME``),
``KMSQ_IDENTITY`` or ``--identity`` (the caller's ``NAME.key.json``), ``KMSQ_FLEET`` or ``--fleet``
(default ``$KMSQ_HOME/fleet.json``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import click

from kmsq.output import console, one_line_errors, print_json
from schemas.limits import KEY_TYPES, SOURCES


def home() -> Path:
    """``KMSQ_HOME`` (default ``./var``), resolved."""
    from worker.config import load_settings  # stdlib-only: works without the worker extra

    return Path(load_settings().home)


def caller_options(func: Any) -> Any:
    """Adds ``--identity``, ``--fleet`` and ``--timeout``."""
    func = click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds to wait.")(func)
    func = click.option("--fleet", type=click.Path(dir_okay=False, path_type=Path), help="Fleet file.")(func)
    return click.option("--identity", type=click.Path(dir_okay=False, path_type=Path), help="NAME.key.json.")(func)


def open_client(identity: Path | None, fleet: Path | None, timeout: float, **options: Any) -> Any:
    """Returns a connected KmsClient (broker and namespace from the settings). Raises IdentityError when a file
    is missing."""
    from tasks.client import KmsClient
    from tasks.identity import IdentityError
    from worker.config import load_settings

    identity = identity or (Path(os.environ["KMSQ_IDENTITY"]) if os.environ.get("KMSQ_IDENTITY") else None)
    if identity is None:
        raise IdentityError("no caller identity: pass --identity NAME.key.json or set KMSQ_IDENTITY")
    fleet = fleet or Path(os.environ.get("KMSQ_FLEET") or home() / "fleet.json")
    settings = load_settings()
    return KmsClient.from_files(
        settings.effective_broker_url, identity, fleet, timeout=timeout, namespace=settings.namespace, **options
    )


@click.command("keygen")
@click.argument("name")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=".", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def caller_keygen(name: str, directory: Path, as_json: bool) -> None:
    """Write a new caller identity: NAME.key.json (0600, private) and NAME.pub.json (for the operator)."""
    from tasks.identity import CallerIdentity

    identity = CallerIdentity.generate(name)
    private_path, public_path = identity.write(directory)
    if as_json:
        print_json(
            {"caller": name, "key_id": identity.key_id, "identity": str(private_path), "public": str(public_path)}
        )
    else:
        console.print(f"wrote {private_path} (private, 0600) and {public_path} (give this one to the operator)")
        console.print(f"key id {identity.key_id}")


@click.command("generate-data-key")
@click.option("--root-key", default=None, help="Root key id (default: the pool's default root key).")
@click.option("--without-plaintext", is_flag=True, help="Return only the encryptedKey.")
@caller_options
@one_line_errors
def generate_data_key(
    root_key: str | None, without_plaintext: bool, identity: Path | None, fleet: Path | None, timeout: float
) -> None:
    """Generate a data key: prints {plaintextKey, encryptedKey}."""
    with open_client(identity, fleet, timeout) as client:
        print_json(client.generate_data_key(root_key, with_plaintext=not without_plaintext))


@click.command("decrypt-data-key")
@click.argument("encrypted_key")
@caller_options
@one_line_errors
def decrypt_data_key(encrypted_key: str, identity: Path | None, fleet: Path | None, timeout: float) -> None:
    """Decrypt an encryptedKey: prints {plaintextKey}."""
    with open_client(identity, fleet, timeout) as client:
        print_json(client.decrypt_data_key(encrypted_key))


@click.command("put-key")
@click.option("--pub", required=True)
@click.option("--prv-file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--coin", required=True)
@click.option("--source", required=True, type=click.Choice(SOURCES))
@click.option("--type", "key_type", required=True, type=click.Choice(KEY_TYPES))
@click.option("--root-key", default=None, help="Root key id (default: the pool's default root key).")
@caller_options
@one_line_errors
def put_key(
    pub: str,
    prv_file: Path,
    coin: str,
    source: str,
    key_type: str,
    root_key: str | None,
    identity: Path | None,
    fleet: Path | None,
    timeout: float,
) -> None:
    """Store a private key (read from a file, sealed before it leaves): prints {pub, coin, source, type}."""
    prv = prv_file.read_text(encoding="utf-8").strip()
    with open_client(identity, fleet, timeout) as client:
        print_json(client.put_key(pub, prv, coin, source, key_type, root_key))


@click.command("get-key")
@click.argument("pub")
@click.option("--source", required=True, type=click.Choice(SOURCES))
@click.option("--pool", default=None, help="Pool holding the key (default: the fleet file's default pool).")
@caller_options
@one_line_errors
def get_key(pub: str, source: str, pool: str | None, identity: Path | None, fleet: Path | None, timeout: float) -> None:
    """Read a stored private key: prints {prv, pub, coin, source, type}."""
    with open_client(identity, fleet, timeout) as client:
        print_json(client.get_key(pub, source, pool))


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
    with open_client(identity, fleet, timeout, reply_queue=f"job-{job.job}") as client:
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


GATEWAY_EXTRA_MODULES = ("fastapi", "starlette", "uvicorn")  # what `pip install 'kmsq[gateway]'` adds


def _host_port(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter("expected HOST:PORT, e.g. 127.0.0.1:8080", param_hint="--listen")
    return host.strip("[]"), int(port)


@click.command("gateway")
@click.option("--listen", default="127.0.0.1:8080", show_default=True, help="HOST:PORT to serve on.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Server certificate.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Its private key.")
@click.option("--client-ca", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Require client certificates issued by this CA (mTLS).")  # fmt: skip
@click.option("--root-key", default=None, help="Root key for new keys (default: the pool's default root key).")
@click.option("--reply-queue", default=None, help="Suffix of the gateway's durable reply queue (default: random).")
@caller_options
@one_line_errors
def gateway(
    listen: str,
    tls_cert: Path | None,
    tls_key: Path | None,
    client_ca: Path | None,
    root_key: str | None,
    reply_queue: str | None,
    identity: Path | None,
    fleet: Path | None,
    timeout: float,
) -> None:
    """Serve the key-provider HTTP API (POST /key, GET /key/{pub}, POST /generateDataKey, POST /decryptDataKey)
    as this caller. --timeout is how long a request waits for a worker before answering 503."""
    from kmsq.output import EXIT_CONFIG, fail

    try:
        import uvicorn  # noqa: F401 - imported by serve(); checked here, before anything starts

        from kmsq.gateway import GatewaySettings, TlsFiles, create_app, serve
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in GATEWAY_EXTRA_MODULES:
            raise
        fail(f"kmsq gateway needs the gateway extra (no module {e.name}): pip install 'kmsq[gateway]'", EXIT_CONFIG)

    host, port = _host_port(listen)
    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    if client_ca is not None and tls_cert is None:
        raise click.UsageError("--client-ca needs --tls-cert and --tls-key")
    tls = TlsFiles(tls_cert, tls_key, client_ca) if tls_cert is not None and tls_key is not None else None
    with open_client(identity, fleet, timeout, reply_queue=reply_queue) as client:
        app = create_app(client, GatewaySettings(root_key_id=root_key, timeout=timeout))
        serve(app, host, port, tls)

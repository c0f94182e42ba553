"""``kmsq fleet-key create|export``: the pools' fleet keys and the fleet file callers use."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import click

from kmsq.commands.common import service
from kmsq.output import console, one_line_errors, print_json


@click.group("fleet-key")
def fleet_key() -> None:
    """The pools' fleet keys (reply signing and inbound transport)."""


@fleet_key.command("create")
@click.option("--pool", default=None, help="Pool (default: the configured default pool).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def fleet_key_create(pool: str | None, as_json: bool) -> None:
    """Create the pool's fleet keys (sealed under its root key) unless they exist."""
    public, created = service().ensure_fleet_key(pool)
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
    document = service().fleet_document(list(pools) or None)
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

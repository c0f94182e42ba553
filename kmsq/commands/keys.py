"""The caller's key operations through the queue: ``kmsq generate-data-key``, ``decrypt-data-key``,
``rewrap-data-key``, ``put-key``, ``get-key``, ``generate-key`` and ``sign``. They print JSON with the
key-provider API's field names and need only the caller install (no HSM or database code)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from kmsq.commands.common import caller_options, open_client
from kmsq.output import one_line_errors, print_json
from schemas.limits import KEY_TYPES, MAX_SIGNABLE_PAYLOAD_CHARS, SOURCES


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


@click.command("rewrap-data-key")
@click.argument("encrypted_key")
@caller_options
@one_line_errors
def rewrap_data_key(encrypted_key: str, identity: Path | None, fleet: Path | None, timeout: float) -> None:
    """Wrap an encryptedKey again under its root key's current version: prints {encryptedKey}. The plaintext
    stays in the HSM; needs the rewrap_data_key permission, not decrypt."""
    with open_client(identity, fleet, timeout) as client:
        print_json(client.rewrap_data_key(encrypted_key))


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


@click.command("generate-key")
@click.option("--coin", required=True, help="The coin (UTXO or ETH-like, as BitGo names them: btc, tbtc, hteth...).")
@click.option("--source", required=True, type=click.Choice(SOURCES))
@click.option("--root-key", default=None, help="Root key id (default: the pool's default root key).")
@click.option("--in-hsm", is_flag=True, help="ETH-like coins: keep a secp256k1 key in the token (CKM_ECDSA).")
@caller_options
@one_line_errors
def generate_key(
    coin: str,
    source: str,
    root_key: str | None,
    in_hsm: bool,
    identity: Path | None,
    fleet: Path | None,
    timeout: float,
) -> None:
    """Generate a signing key kept inside kmsq (never exported): prints {pub (its xpub), coin, source, type}."""
    with open_client(identity, fleet, timeout) as client:
        print_json(client.generate_signing_key(coin, source, "independent", root_key, in_hsm=in_hsm))


@click.command("sign")
@click.argument("pub")
@click.argument("payload")
@click.option("--source", required=True, type=click.Choice(SOURCES))
@click.option("--pool", default=None, help="Pool holding the key (default: the fleet file's default pool).")
@caller_options
@one_line_errors
def sign(
    pub: str, payload: str, source: str, pool: str | None, identity: Path | None, fleet: Path | None, timeout: float
) -> None:
    """Sign PAYLOAD with a generated key: 0x and a 32-byte hash for ETH-like coins, the hex of a wallet PSBT for
    UTXO coins (- reads it from standard input: a PSBT may not fit on a command line). Prints {signature}."""
    if payload == "-":
        payload = sys.stdin.read(MAX_SIGNABLE_PAYLOAD_CHARS + 2).strip()
    with open_client(identity, fleet, timeout) as client:
        print_json(client.sign(pub, source, payload, "ecdsa", pool))

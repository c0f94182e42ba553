"""``kmsq import-legacy`` on the old table as the replaced system's DDL wrote it, unquoted: SQLite keeps
``rootKey``, ``encryptedDataKey`` and ``encryptedPrv``; Postgres folds them to ``rootkey``, ``encrypteddatakey``
and ``encryptedprv``. Both import every row (an MPCv2-sized key share among them), a re-run skips them all,
and a table where a name matches two columns is refused."""

from __future__ import annotations

import base64
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from kmsq.output import EXIT_CONFIG
from tasks.client import KmsClient
from tests.conftest import fresh_database
from tests.queue_fixtures import Deployment
from tests.test_legacy import VECTORS, import_legacy, summary_of
from worker.legacy import sjcl

# The old system's DDL, unquoted, valid as it stands on SQLite and on Postgres.
OLD_DDL = """
CREATE TABLE private_keys (
    id INTEGER PRIMARY KEY,
    pub TEXT NOT NULL,
    source TEXT NOT NULL,
    coin TEXT NOT NULL,
    type TEXT NOT NULL,
    provider TEXT,
    rootKey TEXT NOT NULL,
    encryptedDataKey TEXT NOT NULL,
    encryptedPrv TEXT NOT NULL,
    created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP
)"""
INSERT = (
    "INSERT INTO private_keys (id, pub, source, coin, type, provider, rootKey, encryptedDataKey, encryptedPrv) "
    "VALUES (:id, :pub, :source, :coin, :type, :provider, :rootKey, :encryptedDataKey, :encryptedPrv)"
)


def old_rows(vectors: list[dict[str, Any]], deployment: Deployment) -> list[dict[str, Any]]:
    """The 25 vector rows under pubs nobody stored yet, and a row holding a 330,000-character key share."""
    tag = uuid.uuid4().hex[:8]
    rows = [
        {k: r[k] for k in ("id", "source", "coin", "type", "provider", "rootKey", "encryptedDataKey", "encryptedPrv")}
        | {"pub": f"{r['pub']}-{tag}", "prv": r["expected"]["prv"]}
        for r in vectors
    ]
    share = base64.b64encode(os.urandom(247_500)).decode()
    deployment.secrets.append(share[999:1095].encode())
    data_key = base64.b64encode(os.urandom(32)).decode()
    rows.append({
        "id": 26, "pub": f"xpub-mpc-{tag}", "source": "user", "coin": "hteth", "type": "tss", "provider": "dinamo",
        "rootKey": "legacy-root", "encryptedDataKey": sjcl.encrypt("legacy-root", data_key, ks=256, ts=128),
        "encryptedPrv": sjcl.encrypt(data_key, share, ks=256), "prv": share,
    })  # fmt: skip
    return rows


def load(url: str, rows: list[dict[str, Any]], ddl: str = OLD_DDL) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(ddl))
        if rows:
            conn.execute(text(INSERT), [{k: v for k, v in r.items() if k != "prv"} for r in rows])
    engine.dispose()


@pytest.fixture(scope="module")
def vector_rows() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(VECTORS.read_text())["rows"]
    return rows


@pytest.fixture
def postgres_source() -> Iterator[str]:
    with fresh_database("kmsq_legacy_ci") as url:
        yield url


def imports_every_row(deployment: Deployment, client: KmsClient, url: str, rows: list[dict[str, Any]]) -> None:
    first = summary_of(import_legacy(deployment, "--from", url, "--json"), 0)
    assert (first["rows"], first["imported"], first["failed"], first["skipped"]) == (26, 26, 0, 0)
    for row in rows:
        got = client.get_key(row["pub"], row["source"], pool="alpha")
        assert (got["prv"], got["coin"], got["type"]) == (row["prv"], row["coin"], row["type"])
    again = summary_of(import_legacy(deployment, "--from", url, "--json"), 0)
    assert (again["imported"], again["skipped"], again["failed"]) == (0, 26, 0)


def test_sqlite_table_as_the_ddl_wrote_it(
    deployment: Deployment,
    client: KmsClient,
    vector_rows: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    rows = old_rows(vector_rows, deployment)
    load(url, rows)
    with create_engine(url).connect() as conn:  # SQLite kept the DDL's spelling
        assert "rootKey" in list(conn.execute(text("SELECT * FROM private_keys LIMIT 0")).keys())
    imports_every_row(deployment, client, url, rows)


def test_postgres_table_with_the_names_folded(
    deployment: Deployment,
    client: KmsClient,
    vector_rows: list[dict[str, Any]],
    postgres_source: str,
) -> None:
    rows = old_rows(vector_rows, deployment)
    load(postgres_source, rows)
    with create_engine(postgres_source).connect() as conn:  # Postgres folded the unquoted names
        columns = set(conn.execute(text("SELECT * FROM private_keys LIMIT 0")).keys())
    assert {"rootkey", "encrypteddatakey", "encryptedprv"} <= columns and "rootKey" not in columns
    imports_every_row(deployment, client, postgres_source, rows)


def test_a_name_matching_two_columns_is_refused(deployment: Deployment, postgres_source: str) -> None:
    load(postgres_source, [], OLD_DDL.replace("rootKey TEXT NOT NULL,", 'rootKey TEXT NOT NULL, "rootKey" TEXT,'))
    result = import_legacy(deployment, "--from", postgres_source, "--json")
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert "'rootKey' is ambiguous" in result.stderr and "rootKey, rootkey" in result.stderr

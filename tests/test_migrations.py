"""The migrations make exactly the schema the models describe (alembic's autogenerate finds nothing to change), on
Postgres and on SQLite (whose columns keep the type they were made with: SQLite does not enforce lengths)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, create_engine

from tests.conftest import fresh_database
from worker.storage.db import migrate
from worker.storage.models import Base


def _differences(engine: Engine, *, compare_type: bool) -> list[object]:
    migrate(engine)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": compare_type})
        return list(compare_metadata(context, Base.metadata))


@pytest.fixture
def postgres() -> Iterator[Engine]:
    with fresh_database("kmsq_migrations") as url:
        engine = create_engine(url)
        yield engine
        engine.dispose()


@pytest.mark.db
def test_the_migrations_make_the_models_schema_on_postgres(postgres: Engine) -> None:
    assert _differences(postgres, compare_type=True) == []


def test_the_migrations_make_the_models_schema_on_sqlite(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'kmsq.db'}")
    assert _differences(engine, compare_type=False) == []

"""docs/ARCHITECTURE.md names every module of the four packages: a module the page does not name fails here."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parent.parent
PAGE = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
# Named by their folder: one Alembic revision per schema change, and Alembic's environment.
BY_FOLDER = ("worker/storage/migrations/",)


def modules() -> list[str]:
    """Every module of schemas, worker, tasks and kmsq, as its path from the repository root."""
    found = []
    for package in ("schemas", "worker", "tasks", "kmsq"):
        for path in sorted((ROOT / package).rglob("*.py")):
            found.append(path.relative_to(ROOT).as_posix())
    return found


def named(module: str) -> bool:
    """A module is named by its path; a package's ``__init__.py`` by its folder (``kmsq/commands/``)."""
    if module.startswith(BY_FOLDER):
        return any(folder in PAGE for folder in BY_FOLDER)
    if module.endswith("/__init__.py"):
        folder = module.removesuffix("__init__.py")
        return f"`{folder}`" in PAGE or folder.count("/") == 1  # a top-level package: its section
    return f"`{module}`" in PAGE


def test_the_architecture_page_names_every_module() -> None:
    missing = [module for module in modules() if not named(module)]
    assert missing == [], f"docs/ARCHITECTURE.md does not name {missing}"
    assert len(modules()) > 90  # the walk found the packages


def test_the_check_finds_a_module_the_page_does_not_name() -> None:
    assert not named("worker/no_such_module.py") and named("worker/pipeline.py")

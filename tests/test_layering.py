"""The dependency direction of docs/ARCHITECTURE.md: schemas ← worker ← tasks ← entry points, and a caller that
runs without the worker extra (no python-pkcs11, SQLAlchemy, psycopg or Alembic)."""

from __future__ import annotations

import ast
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('pkcs11', 'sqlalchemy', 'psycopg', 'alembic'):
            raise ImportError('blocked for this test: ' + name)
sys.meta_path.insert(0, Block())
"""


@functools.cache
def imported_modules(package: str) -> set[str]:
    """Top-level names of every module imported anywhere in ``package`` (including inside functions)."""
    names: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_schemas_import_nothing_of_kmsq_above_them() -> None:
    assert not imported_modules("schemas") & {"worker", "tasks", "kmsq", "celery", "kombu", "sqlalchemy", "pkcs11"}


def test_worker_does_not_import_celery_or_tasks() -> None:
    assert not imported_modules("worker") & {"tasks", "kmsq", "celery", "kombu"}


@pytest.mark.process  # a Python process of its own, with the extra's modules blocked
def test_the_caller_side_runs_without_the_worker_extra(tmp_path: Path) -> None:
    code = (
        BLOCKER
        + f"""
import tasks.client, tasks.identity
from kmsq.cli import main
sys.argv = ['kmsq', 'caller', 'keygen', 'lean', '--dir', {str(tmp_path)!r}, '--json']
main()
"""
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "lean.key.json").exists() and '"key_id"' in result.stdout
    blocked = subprocess.run(
        [sys.executable, "-c", BLOCKER + "import worker.hsm"], capture_output=True, text=True, check=False
    )
    assert "blocked for this test" in blocked.stderr  # the blocker really blocks


@pytest.mark.process  # a Python process of its own, with the extra's modules blocked
def test_the_gateway_and_the_sjcl_codec_run_without_the_worker_extra() -> None:
    code = BLOCKER + "import kmsq.gateway, worker.legacy.sjcl\nprint(kmsq.gateway.create_app.__name__)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "create_app" in result.stdout, result.stderr


@pytest.mark.process  # a Python process of its own, with the extra's modules blocked
def test_the_gateway_command_names_its_missing_extra(tmp_path: Path) -> None:
    blocker = BLOCKER.replace("('pkcs11', 'sqlalchemy', 'psycopg', 'alembic')", "('fastapi', 'uvicorn', 'starlette')")
    # As Python reports a package that is not installed.
    blocker = blocker.replace(
        "raise ImportError('blocked for this test: ' + name)", "raise ModuleNotFoundError(name, name=name)"
    )
    code = blocker + "from kmsq.cli import main\nsys.argv = ['kmsq', 'gateway']\nmain()"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMSQ_")} | {"KMSQ_HOME": str(tmp_path)}
    command = [sys.executable, "-c", code]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 3, result.stderr
    assert result.stderr.strip() == (
        "kmsq: error: kmsq gateway needs the gateway extra (no module uvicorn): pip install 'kmsq[gateway]'"
    )


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """Module -> the kmsq modules it imports anywhere (inside functions too), over all four packages."""
    modules: dict[str, Path] = {}
    for package in ("schemas", "worker", "tasks", "kmsq"):
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while (top := stack.pop()) != node:
                component.append(top)
            if component:
                found.append(sorted([node, *component]))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]  # the check itself finds one


def test_legacy_code_lives_in_one_place() -> None:
    """Only the data-key handlers (which tell the replaced API's envelopes apart) and the legacy commands reach
    into worker.legacy."""
    graph = import_graph()
    users = {m for m, deps in graph.items() if any(d.startswith("worker.legacy") for d in deps)}
    outside = {m for m in users if not m.startswith("worker.legacy")}
    assert outside <= {"worker.handlers.data_keys", "kmsq.commands.legacy"}, outside

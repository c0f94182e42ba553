"""kmsq as a user installs it: the wheel built from this repository, installed (not editable) with the extras
``[worker,gateway]`` into a fresh virtualenv outside the work tree, then used from there.

The module fixture builds the wheel once, from a copy of the repository (a build in the work tree would leave
``build/`` behind, whose stale modules setuptools would ship in later wheels), and installs it once; pip takes
the dependencies from its cache or the index. Every command then runs from a directory outside the repository,
without ``PYTHONPATH`` or any ``KMSQ_*``/``SOFTHSM2_*`` variable, so nothing of the source tree can be
imported by accident: a module or a data file missing from the wheel fails here.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import missing_service, softhsm_library

pytestmark = pytest.mark.hsm

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("schemas", "worker", "tasks", "kmsq")
EXTRAS = "worker,gateway"
# Scripts, not imported: `python -m kmsq` runs the command line, and Alembic runs env.py inside a migration.
SCRIPTS = frozenset({"kmsq.__main__", "worker.storage.migrations.env"})
# Not copied for the build (.gitignore and .dockerignore leave them out of a checkout and of the image): at the
# repository's top, and anywhere.
_NOT_SOURCES_AT_TOP = frozenset({".git", ".venv", "venv", "var", "build", "dist", "bench-results", "soak-results"})
_NOT_SOURCES = frozenset({"__pycache__", "node_modules", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis"})
_TIMEOUT = 600

# Run in the fresh virtualenv: every module of the installed packages, found by walking their directories.
_PROBE = """
import importlib, json, pkgutil, sys, sysconfig, traceback
report = {"prefix": sys.prefix, "purelib": sysconfig.get_paths()["purelib"], "files": {}, "modules": [],
          "errors": {}}
scripts = set(sys.argv[2].split(","))
for name in sys.argv[1].split(","):
    package = importlib.import_module(name)
    report["files"][name] = package.__file__
    report["modules"].append(name)
    walk_errors = []
    for info in pkgutil.walk_packages(package.__path__, name + ".", onerror=walk_errors.append):
        report["modules"].append(info.name)
    for failed in walk_errors:
        report["errors"][failed] = "walk_packages could not import it"
for module in report["modules"]:
    if module in scripts:
        continue
    try:
        importlib.import_module(module)
    except BaseException:
        report["errors"][module] = traceback.format_exc()[-2000:]
print(json.dumps(report))
"""


@dataclass(frozen=True)
class Installed:
    """The built wheel and the fresh virtualenv it is installed in."""

    wheel: Path
    venv: Path
    cwd: Path  # an empty directory outside the repository, the working directory of every command

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def kmsq(self) -> Path:
        return self.venv / "bin" / "kmsq"

    def env(self, home: Path | None = None) -> dict[str, str]:
        """This environment without PYTHON*, KMSQ_* and SOFTHSM2_* variables, the fresh venv first on PATH."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("PYTHON", "KMSQ_", "SOFTHSM2_")) and k not in ("VIRTUAL_ENV", "CONDA_PREFIX")
        }
        env["PATH"] = os.pathsep.join([str(self.venv / "bin"), env.get("PATH", os.defpath)])
        env["VIRTUAL_ENV"] = str(self.venv)
        if home is not None:
            env["KMSQ_HOME"] = str(home)
        return env

    def run(self, *args: str | Path, home: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(a) for a in args],
            cwd=self.cwd,
            env=self.env(home),
            capture_output=True,
            text=True,
            timeout=_TIMEOUT,
            check=False,
        )


def _ignore(directory: str, names: list[str]) -> set[str]:
    at_top = Path(directory) == ROOT
    return {
        n
        for n in names
        if n in _NOT_SOURCES or (at_top and n in _NOT_SOURCES_AT_TOP) or n.endswith((".egg-info", ".pyc", ".whl"))
    }


def _build_isolation() -> list[str]:
    """``--no-build-isolation`` when this virtualenv already meets build-system.requires (no index needed)."""
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["build-system"]["requires"]
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return []
    for requirement in map(Requirement, requires):
        try:
            version = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            return []
        if not requirement.specifier.contains(version, prereleases=True):
            return []
    return ["--no-build-isolation"]


def _checked(result: subprocess.CompletedProcess[str], what: str) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, (
        f"{what} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    )
    return result


def source_files() -> list[Path]:
    """The files of the four packages in the work tree, relative to the repository (no caches, no hidden or
    backup files): each must be in the wheel."""
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*")):
            relative = path.relative_to(ROOT)
            if not path.is_file() or any(p in _NOT_SOURCES or p.startswith(".") for p in relative.parts):
                continue
            if path.suffix == ".pyc" or path.name.endswith("~"):
                continue
            found.append(relative)
    return found


def source_modules() -> set[str]:
    """The dotted names of every ``*.py`` in the four packages of the work tree."""
    modules = set()
    for relative in source_files():
        if relative.suffix == ".py":
            parts = relative.with_suffix("").parts
            modules.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return modules


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """Builds the wheel from a copy of the repository and installs it with [worker,gateway] in a fresh venv."""
    base = tmp_path_factory.mktemp("wheel")
    assert not base.resolve().is_relative_to(ROOT), base
    source, dist, venv, cwd = base / "source", base / "dist", base / "venv", base / "cwd"
    shutil.copytree(ROOT, source, ignore=_ignore, symlinks=True)
    cwd.mkdir()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}

    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", *_build_isolation(), "-w", str(dist), str(source)]
    _checked(subprocess.run(build, cwd=cwd, env=clean, capture_output=True, text=True, timeout=_TIMEOUT), "pip wheel")
    (wheel,) = dist.glob("kmsq-*.whl")
    venv_made = subprocess.run([sys.executable, "-m", "venv", str(venv)], cwd=cwd, env=clean, capture_output=True,
                               text=True, timeout=_TIMEOUT)  # fmt: skip
    _checked(venv_made, "python -m venv")
    result = Installed(wheel, venv, cwd)
    pip = ("-m", "pip", "install", "--disable-pip-version-check", "-q", f"{wheel}[{EXTRAS}]")
    _checked(result.run(result.python, *pip), "pip install the wheel")
    return result


@pytest.fixture(scope="module")
def probe(installed: Installed) -> dict[str, Any]:
    """What the fresh venv imports: each package's file, every module found by walking them, import errors."""
    result = _checked(installed.run(installed.python, "-I", "-c", _PROBE, ",".join(PACKAGES), ",".join(SCRIPTS)),
                      "the import probe")  # fmt: skip
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def test_wheel_holds_the_packages_and_their_data_and_nothing_else(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as archive:
        names = set(archive.namelist())
    dist_info = {n.split("/", 1)[0] for n in names if n.split("/", 1)[0].endswith(".dist-info")}
    assert len(dist_info) == 1, dist_info
    stray = {n for n in names if n.split("/", 1)[0] not in {*PACKAGES, *dist_info} and n != "celeryconfig.py"}
    assert not stray, f"the wheel ships files outside the packages: {sorted(stray)}"
    caches = {n for n in names if "__pycache__" in n or n.endswith((".pyc", ".pyo"))}
    assert not caches, sorted(caches)
    missing = sorted(str(p) for p in source_files() if p.as_posix() not in names)
    assert not missing, f"files of the packages missing from the wheel (pyproject.toml [tool.setuptools]): {missing}"
    # The data files modules open at run time, named here so that a change in the rules above cannot drop them.
    for data in ("worker/storage/migrations/script.py.mako", "kmsq/chaos/faulty_pkcs11.c", "kmsq/py.typed",
                 "schemas/py.typed", "tasks/py.typed", "worker/py.typed"):  # fmt: skip
        assert data in names, data


def test_the_installed_packages_are_the_fresh_venvs(installed: Installed, probe: dict[str, Any]) -> None:
    venv = installed.venv.resolve()
    assert Path(probe["prefix"]).resolve() == venv
    for package, file in probe["files"].items():
        path = Path(file).resolve()
        assert path.is_relative_to(venv), (package, path)
        assert not path.is_relative_to(ROOT), (package, path)
    editable = list(Path(probe["purelib"]).glob("__editable__*")) + list(Path(probe["purelib"]).glob("*.pth"))
    assert not [p for p in editable if "kmsq" in p.name], editable


def test_every_module_of_the_source_tree_imports_from_the_wheel(probe: dict[str, Any]) -> None:
    walked = set(probe["modules"])
    missing = sorted(source_modules() - walked)
    assert not missing, f"modules of the source tree not installed from the wheel: {missing}"
    assert not probe["errors"], "\n".join(f"{m}:\n{e}" for m, e in sorted(probe["errors"].items()))
    purelib = Path(probe["purelib"])
    for script in SCRIPTS:  # not imported, but there
        assert (purelib / (script.replace(".", "/") + ".py")).is_file(), script


def test_kmsq_help(installed: Installed) -> None:
    result = _checked(installed.run(installed.kmsq, "--help"), "kmsq --help")
    for command in ("init", "demo", "worker", "gateway", "caller", "root-key"):
        assert re.search(rf"^\s+{re.escape(command)}\s", result.stdout, re.MULTILINE), (command, result.stdout)
    as_module = _checked(installed.run(installed.python, "-m", "kmsq", "--help"), "python -m kmsq --help")
    assert as_module.stdout.replace("python -m kmsq", "kmsq", 1) == result.stdout


@pytest.fixture(scope="module")
def home(installed: Installed, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """``kmsq init`` of the fresh venv on the embedded default: a SoftHSM2 token and SQLite in KMSQ_HOME."""
    softhsm_library()
    path = tmp_path_factory.mktemp("wheel-home")
    result = _checked(installed.run(installed.kmsq, "init", "--json", home=path), "kmsq init")
    report: dict[str, Any] = json.loads(result.stdout)
    return path, report


def test_kmsq_init(home: tuple[Path, dict[str, Any]]) -> None:
    path, report = home
    assert report["token_created"] is True and report["database_migrated_from"] is None  # every migration ran
    assert report["root_key_created"]["type"] == "aes-256"
    assert (path / "hsm-user.pin").is_file()


@pytest.mark.queue
def test_kmsq_demo(installed: Installed, home: tuple[Path, dict[str, Any]]) -> None:
    """Every operation through an embedded redis-server and a worker started as ``python -m kmsq worker``."""
    if shutil.which("redis-server") is None:
        missing_service("redis-server")
    path, _ = home
    result = _checked(installed.run(installed.kmsq, "demo", "--json", home=path), "kmsq demo")
    report = json.loads(result.stdout)
    assert report["broker"].startswith("embedded") and report["worker"]["exit_code"] == 0
    steps = {step["op"]: step for step in report["steps"]}
    assert steps["decrypt_data_key"]["matches"] and steps["get_key"]["matches"]
    assert steps["generate_data_key_without_plaintext"]["fields"] == ["encryptedKey"]
    assert steps["put_key again"]["result"].startswith("conflict") and steps["put_key again"]["ok"]
    assert steps["get_key source=backup"]["result"].startswith("not_found")
    assert steps["tampered signature"]["result"].startswith("unauthenticated") and steps["tampered signature"]["ok"]
    assert all(step.get("ok", True) and step.get("matches", True) for step in report["steps"]), report["steps"]
    assert "ready." in (path / "worker.log").read_text()


def test_dockerfile_installs_the_built_wheel() -> None:
    """A text guard: the image installs the wheel built from the sources (tested above), not the source tree."""
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    instructions = re.sub(r"\\\n", " ", "\n".join(line for line in dockerfile.splitlines() if not line.startswith("#")))
    assert re.search(r"\bpip wheel\b[^\n]*--no-deps[^\n]*--wheel-dir /tmp/dist \.", instructions), instructions
    installs = re.findall(r"\bpip install\b[^\n&|;]*", instructions)
    assert installs and all("/tmp/dist/kmsq-*.whl" in i and f"[{EXTRAS}]" in i for i in installs), installs
    assert not re.search(r"""\bpip install\b[^\n]*\s["']?\.(\[|["'\s]|$)""", instructions, re.MULTILINE)
    assert re.search(r"^RUN kmsq --help\b", instructions, re.MULTILINE)  # the image's own smoke test

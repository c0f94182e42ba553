#!/usr/bin/env bash
# Prepares a fresh Debian/Ubuntu machine for kmsq and installs the project into a virtualenv. Idempotent:
# it installs only what is missing and skips pip when the virtualenv is already up to date.
#
#   KMSQ_VENV=DIR            virtualenv location (default: .venv in the repository root)
#   KMSQ_PYTHON=EXE          interpreter for a new virtualenv (default: the first python3 >= 3.11 on PATH)
#   KMSQ_SETUP_SERVICES=1    also install postgresql, rabbitmq-server and a C compiler (needed by the tests; redis-server
#                            is always installed)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${KMSQ_VENV:-.venv}"
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
STAMP="$VENV/.kmsq-installed"

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
fi

py_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; }

find_python() {
    if [ -n "${KMSQ_PYTHON:-}" ]; then
        command -v "$KMSQ_PYTHON" >/dev/null 2>&1 && printf '%s\n' "$KMSQ_PYTHON"
        return 0
    fi
    local candidate
    for candidate in python3 python3.13 python3.12 python3.11; do
        if command -v "$candidate" >/dev/null 2>&1 && py_ok "$candidate"; then
            printf '%s\n' "$candidate"
            return 0
        fi
    done
}

venv_ok() { [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c '' >/dev/null 2>&1; }

# --- OS packages -------------------------------------------------------------------------------------------
packages=()
if [ ! -e /usr/lib/softhsm/libsofthsm2.so ] && ! command -v softhsm2-util >/dev/null 2>&1; then
    packages+=(softhsm2)
fi
PYTHON=""
if ! venv_ok; then
    PYTHON="$(find_python)"
    if [ -z "$PYTHON" ]; then
        if command -v python3 >/dev/null 2>&1 || [ -n "${KMSQ_PYTHON:-}" ]; then
            die "kmsq needs Python >= 3.11; install one and set KMSQ_PYTHON to it"
        fi
        packages+=(python3 python3-venv)
    elif ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        # Debian splits ensurepip off into python3-venv (python3.X-venv for a non-default interpreter).
        case "$(basename "$PYTHON")" in
            python3) packages+=(python3-venv) ;;
            *) packages+=("$(basename "$PYTHON")-venv") ;;
        esac
    fi
fi
# redis-server is the embedded broker of the main job (a private instance on a Unix socket).
command -v redis-server >/dev/null 2>&1 || packages+=(redis-server)
if [ "${KMSQ_SETUP_SERVICES:-}" = 1 ]; then
    command -v pg_ctlcluster >/dev/null 2>&1 || packages+=(postgresql)
    # The queue tests marked "brokers" run on RabbitMQ too.
    command -v rabbitmq-server >/dev/null 2>&1 || packages+=(rabbitmq-server)
    # kmsq chaos (run by the tests) compiles a small fault-injecting PKCS#11 module.
    command -v cc >/dev/null 2>&1 || packages+=(gcc libc6-dev)
    # The PSBT interop tests drive BitGo's @bitgo/utxo-lib (tests/interop) with node.
    command -v node >/dev/null 2>&1 || packages+=(nodejs)
    command -v npm >/dev/null 2>&1 || packages+=(npm)
fi

if [ "${#packages[@]}" -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || die "missing ${packages[*]} and apt-get is not available; install them"
    if [ "$(id -u)" -ne 0 ] && [ -z "$SUDO" ]; then
        die "missing ${packages[*]}; run as root or install sudo"
    fi
    say "apt-get update"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
    say "installing ${packages[*]}"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${packages[@]}"
else
    say "OS packages present"
fi

# --- virtualenv --------------------------------------------------------------------------------------------
if venv_ok; then
    say "virtualenv $VENV exists"
else
    [ -n "$PYTHON" ] || PYTHON="$(find_python)"
    [ -n "$PYTHON" ] || die "no Python >= 3.11 found; set KMSQ_PYTHON"
    say "creating virtualenv $VENV ($("$PYTHON" -c 'import platform; print(platform.python_version())'))"
    "$PYTHON" -m venv "$VENV"
    rm -f "$STAMP"
fi

if [ -f "$STAMP" ] && [ "$STAMP" -nt "$ROOT/pyproject.toml" ] && [ -x "$VENV/bin/kmsq" ]; then
    say "kmsq already installed in $VENV"
else
    say "pip install -e .[worker,gateway,dev,bench]"
    "$VENV/bin/python" -m pip install -q -e ".[worker,gateway,dev,bench]"
    touch "$STAMP"
fi

# --- node modules of the interop tests ------------------------------------------------------------------------
if [ "${KMSQ_SETUP_SERVICES:-}" = 1 ]; then
    NODE_STAMP="$ROOT/tests/interop/node_modules/.kmsq-installed"
    if [ -f "$NODE_STAMP" ] && [ "$NODE_STAMP" -nt "$ROOT/tests/interop/package-lock.json" ]; then
        say "tests/interop node modules installed"
    else
        say "npm ci (tests/interop: @bitgo/utxo-lib)"
        (cd "$ROOT/tests/interop" && npm ci --no-audit --no-fund --loglevel=error)
        touch "$NODE_STAMP"
    fi
fi
say "done"

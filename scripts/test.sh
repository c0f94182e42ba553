#!/usr/bin/env bash
# Sets up the machine (including Postgres and Redis), then runs ruff, mypy and pytest in the virtualenv.
# Arguments go to pytest. Exits non-zero if any step fails (all three steps always run).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${KMSQ_VENV:-.venv}"
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac

KMSQ_SETUP_SERVICES=1 bash "$ROOT/scripts/setup.sh"
bash "$ROOT/scripts/services.sh"

status=0
failed=()
step() {
    local name="$1" rc=0
    shift
    printf 'test: %s\n' "$*"
    "$@" || rc=$?
    if [ "$rc" -eq 5 ] && [ "$name" = pytest ]; then
        printf 'test: pytest collected no tests\n' >&2
    fi
    if [ "$rc" -ne 0 ]; then
        failed+=("$name")
        [ "$status" -ne 0 ] || status="$rc"
    fi
}

step ruff "$VENV/bin/ruff" check .
step ruff-format "$VENV/bin/ruff" format --check .
step mypy "$VENV/bin/mypy"
step pytest "$VENV/bin/pytest" -q --durations=15 "$@"

if [ "$status" -ne 0 ]; then
    printf 'test: FAILED: %s\n' "${failed[*]}" >&2
    exit "$status"
fi
printf 'test: ok\n'

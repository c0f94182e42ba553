#!/usr/bin/env bash
# The main job: sets up the machine, then runs `kmsq init` and `kmsq demo` on the embedded default under
# KMSQ_HOME (default: var/ in the repository root): a SoftHSM2 token, a SQLite database and a private
# redis-server on a Unix socket as the broker. The demo starts a worker, registers a demo caller, sends each
# operation through the queue as a signed request, unseals the replies, and stops the worker and broker.
# With KMSQ_BROKER_URL and KMSQ_DATABASE_URL set, the same runs against that Redis and Postgres.
#
#   scripts/run.sh [--json]     --json: one JSON document on stdout, {"init": ..., "demo": ...} (the two
#                               commands' reports; setup output goes to stderr)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${KMSQ_VENV:-.venv}"
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac

JSON=""
for arg in "$@"; do
    case "$arg" in
        --json) JSON="--json" ;;
        -h|--help) sed -n '2,9s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) printf 'run: unknown argument: %s (usage: scripts/run.sh [--json])\n' "$arg" >&2; exit 2 ;;
    esac
done

# A relative KMSQ_HOME is taken relative to the caller's directory; the default is <repo>/var.
case "${KMSQ_HOME:-}" in
    "") KMSQ_HOME="$ROOT/var" ;;
    /*|"~"*) ;;
    *) KMSQ_HOME="$PWD/$KMSQ_HOME" ;;
esac
export KMSQ_HOME

if [ -n "$JSON" ]; then
    bash "$ROOT/scripts/setup.sh" >&2
else
    bash "$ROOT/scripts/setup.sh"
fi

cd "$ROOT"
printf 'run: KMSQ_HOME=%s\n' "$KMSQ_HOME" >&2
if [ -z "$JSON" ]; then
    "$VENV/bin/kmsq" init
    "$VENV/bin/kmsq" demo
    exit 0
fi

# --json: both reports in one document. A failing init prints no report (its error is on stderr) and stops
# the run; a failing demo still prints its report, and the run exits with the demo's code.
init_json="$("$VENV/bin/kmsq" init --json)"
demo_rc=0
demo_json="$("$VENV/bin/kmsq" demo --json)" || demo_rc=$?
if [ -z "$demo_json" ]; then
    exit "$demo_rc"
fi
KMSQ_RUN_INIT="$init_json" KMSQ_RUN_DEMO="$demo_json" "$VENV/bin/python" -c '
import json, os, sys
document = {"init": json.loads(os.environ["KMSQ_RUN_INIT"]), "demo": json.loads(os.environ["KMSQ_RUN_DEMO"])}
sys.stdout.write(json.dumps(document, indent=2) + "\n")
'
exit "$demo_rc"

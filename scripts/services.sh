#!/usr/bin/env bash
# Makes sure Postgres (127.0.0.1:5432), Redis (127.0.0.1:6379) and RabbitMQ (127.0.0.1:5672) are running for
# the tests. Idempotent: a server that already answers is left alone. Install them first with KMSQ_SETUP_SERVICES=1 scripts/setup.sh.
set -euo pipefail

say() { printf 'services: %s\n' "$*"; }
die() { printf 'services: error: %s\n' "$*" >&2; exit 1; }

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
fi

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 >/dev/null 2>&1; }
redis_up() { [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = "PONG" ]; }
rabbitmq_up() { $SUDO rabbitmqctl -q status >/dev/null 2>&1 && (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

# wait_for NAME CHECK [SECONDS]: polls CHECK once a second for up to SECONDS (30).
wait_for() {
    local name="$1" check="$2" i
    for i in $(seq 1 "${3:-30}"); do
        if "$check"; then
            say "$name is up"
            return 0
        fi
        sleep 1
    done
    die "$name did not answer within ${3:-30} s"
}

# --- Postgres ----------------------------------------------------------------------------------------------
command -v pg_isready >/dev/null 2>&1 || die "pg_isready not found (run: KMSQ_SETUP_SERVICES=1 scripts/setup.sh)"
if pg_up; then
    say "postgres already running on 127.0.0.1:5432"
else
    command -v pg_ctlcluster >/dev/null 2>&1 \
        || die "pg_ctlcluster not found (run: KMSQ_SETUP_SERVICES=1 scripts/setup.sh)"
    [ -d /etc/postgresql ] || die "no Postgres cluster under /etc/postgresql"
    version="$(ls /etc/postgresql | head -1)"
    [ -n "$version" ] || die "no Postgres cluster under /etc/postgresql"
    say "starting postgres $version/main"
    if ! $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main start; then
        say "pg_ctlcluster start failed (already running?); waiting for it anyway"
    fi
    wait_for postgres pg_up
fi

# --- Redis -------------------------------------------------------------------------------------------------
command -v redis-cli >/dev/null 2>&1 || die "redis-cli not found (run: KMSQ_SETUP_SERVICES=1 scripts/setup.sh)"
if redis_up; then
    say "redis already running on 127.0.0.1:6379"
else
    command -v redis-server >/dev/null 2>&1 \
        || die "redis-server not found (run: KMSQ_SETUP_SERVICES=1 scripts/setup.sh)"
    say "starting redis-server on 127.0.0.1:6379"
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no >/dev/null
    wait_for redis redis_up
fi

# --- RabbitMQ ----------------------------------------------------------------------------------------------
command -v rabbitmqctl >/dev/null 2>&1 || die "rabbitmqctl not found (run: KMSQ_SETUP_SERVICES=1 scripts/setup.sh)"
if rabbitmq_up; then
    say "rabbitmq already running on 127.0.0.1:5672"
else
    say "starting rabbitmq-server"
    $SUDO rabbitmq-server -detached >/dev/null 2>&1 || say "rabbitmq-server -detached failed (already starting?)"
    wait_for rabbitmq rabbitmq_up 90
fi

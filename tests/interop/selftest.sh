#!/bin/sh
# Self-test of utxo.js (see selftest.js). Run: sh tests/interop/selftest.sh
set -e
cd "$(dirname "$0")"
[ -d node_modules/@bitgo/utxo-lib ] || npm ci --no-audit --no-fund
exec node selftest.js

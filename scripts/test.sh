#!/usr/bin/env bash
# Runs every test against a real PostgreSQL server:
#   - TEST_DATABASE_URL when set;
#   - else the server on 127.0.0.1:5432 (user postgres, trust auth) if one answers;
#   - else a private cluster started by `flywheel postgres` (installed with apt if missing).
# Chromium (apt) and playwright-core (npm) are installed for the dashboard's
# browser tests when missing.
# The real model is pulled once into ~/.cache/flywheel/models (FLYWHEEL_MODEL_CACHE).
set -euo pipefail
cd "$(dirname "$0")/.."

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

if [ -z "${TEST_DATABASE_URL:-}" ]; then
  if port_open 127.0.0.1 5432; then
    export TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres
  else
    echo "no PostgreSQL on 127.0.0.1:5432: starting a private one"
    cargo build --quiet -p flywheel
    eval "$(FLYWHEEL_HOME="$PWD/.flywheel-test" target/debug/flywheel postgres --print-env)"
    export TEST_DATABASE_URL="$DATABASE_URL"
  fi
fi
echo "tests use PostgreSQL at $TEST_DATABASE_URL"

# Databases earlier runs' tests created (fw_*), left for inspection: drop them.
if command -v psql >/dev/null; then
  stale=$(psql "$TEST_DATABASE_URL" -Atc "select datname from pg_database where datname like 'fw\_%'")
  for db in $stale; do
    psql "$TEST_DATABASE_URL" -qc "drop database if exists \"$db\" with (force)"
  done
  [ -z "$stale" ] || echo "dropped $(echo "$stale" | wc -l) test databases left by earlier runs"
fi

# The S3 tests run against moto's S3-compatible server (a PyPI package).
if ! python3 -c "import moto.server" 2>/dev/null; then
  echo "installing moto (an S3-compatible server for the artifact store tests)"
  python3 -m pip install --quiet 'moto[server]==5.2.5'
fi
# The dashboard's browser tests: Debian's Chromium, driven by playwright-core
# (from npm, pinned in tests/browser/package-lock.json).
if ! command -v chromium >/dev/null; then
  echo "installing chromium (the dashboard's browser tests)"
  if [ "$(id -u)" = 0 ]; then apt-get install -y -q chromium >/dev/null; else sudo apt-get install -y -q chromium >/dev/null; fi
fi
if [ ! -d tests/browser/node_modules/playwright-core ]; then
  echo "installing playwright-core (drives chromium in the dashboard's tests)"
  (cd tests/browser && npm ci --no-audit --no-fund --silent)
fi
cargo test --workspace --all-targets --no-fail-fast "$@"

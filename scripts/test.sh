#!/usr/bin/env bash
# Runs every test against a real PostgreSQL server:
#   - TEST_DATABASE_URL when set;
#   - else the server on 127.0.0.1:5432 (user postgres, trust auth) if one answers;
#   - else a private cluster started by `flywheel postgres` (installed with apt if missing).
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
cargo test --workspace --all-targets "$@"

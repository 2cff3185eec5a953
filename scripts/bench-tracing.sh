#!/usr/bin/env bash
# What exporting traces costs a chat request: the same gateway binary, the
# tiny random-weight model, small non-streaming chats with wrk, with traces
# off (no OTEL_* variable) and on (OTEL_EXPORTER_OTLP_ENDPOINT naming a
# local OTLP/HTTP receiver that reads and drops what it gets), alternated
# ROUNDS times in one run so that drift on the machine hits both alike.
# One connection measures latency (p50/p99 per request); CONNECTIONS
# connections measure throughput (requests/s).
#   scripts/bench-tracing.sh [SECONDS=15] [ROUNDS=2] [CONNECTIONS=8] [BUILD=release]
# Needs wrk (apt-get install wrk) and psql; PostgreSQL as for `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-15}
rounds=${2:-2}
conns=${3:-8}
build=${4:-release}
admin=${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
if [ "$build" = release ]; then
  cargo build --release --quiet -p flywheel --bin flywheel
  cargo build --release --quiet -p flywheel-model --features testing --example tiny_model
else
  cargo build --quiet -p flywheel --bin flywheel
  cargo build --quiet -p flywheel-model --features testing --example tiny_model
fi
bin=$PWD/target/$build/flywheel
work=$(mktemp -d)
export BENCH_DIR=$work
db="fw_bench_tracing_$(date +%s)"
psql -q "$admin" -c "create database $db"
export DATABASE_URL="${admin%/*}/$db"
$bin migrate >/dev/null
tiny=$(target/$build/examples/tiny_model "$work")
$bin models import "$tiny" --name tiny >/dev/null
key=$($bin keys create --team bench | tail -1)
echo "key = \"$key\"" > "$work/ids.lua"

# The OTLP receiver: answers every POST 200 and counts the bytes it got.
cat > "$work/receiver.py" <<'EOF'
import http.server, sys
got = {"posts": 0, "bytes": 0}
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        n = int(self.headers.get("content-length", 0))
        self.rfile.read(n)
        got["posts"] += 1; got["bytes"] += n
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()
        with open(sys.argv[2], "w") as f:
            f.write("%d %d\n" % (got["posts"], got["bytes"]))
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
EOF
python3 "$work/receiver.py" 14318 "$work/received" & receiver=$!

port=18095
gw=""
trap 'kill $gw $receiver 2>/dev/null || true' EXIT
start() {
  if [ "$1" = on ]; then
    export OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:14318
  else
    unset OTEL_EXPORTER_OTLP_ENDPOINT
  fi
  FLYWHEEL_ADDR=127.0.0.1:$port FLYWHEEL_JOURNAL_DIR=$work/journal RUST_LOG=warn \
    $bin serve & gw=$!
  until curl -sf "http://127.0.0.1:$port/readyz" >/dev/null; do sleep 0.2; done
  # Warm up: the first requests pay for connections and caches.
  wrk -t1 -c1 -d2s -s bench/chat.lua "http://127.0.0.1:$port" >/dev/null
}
stop() { kill "$gw"; wait "$gw" 2>/dev/null || true; }

echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD) build $build, $(nproc) cores"
for round in $(seq "$rounds"); do
  for traces in off on; do
    start $traces
    one=$(wrk -t1 -c1 -d"${seconds}s" --latency -s bench/chat.lua "http://127.0.0.1:$port" | grep RESULT)
    many=$(wrk -t2 -c"$conns" -d"${seconds}s" --latency -s bench/chat.lua "http://127.0.0.1:$port" | grep RESULT)
    stop
    echo "round=$round traces=$traces c1: ${one#RESULT } | c$conns: ${many#RESULT }"
  done
done
sleep 1
echo "receiver got (posts bytes): $(cat "$work/received" 2>/dev/null || echo '0 0')"

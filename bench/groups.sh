#!/usr/bin/env bash
# Consumer-group benchmark: first join with default client settings, a rebalance of 10
# members over 100 partitions, offset-commit throughput from 100 concurrent groups (all with
# librdkafka or over the wire, against a durable single-node Strom), then the time to load
# 10k groups after a restart (from the broker's own log line).
#
#   bash bench/groups.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p strom >/dev/null
BIN="${CARGO_TARGET_DIR:-target}/release/strom"
WORK=$(mktemp -d)
PID=
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
GROUPS_N=${GROUPS_N:-10000}

start() {
  "$BIN" server --listen "127.0.0.1:$PORT" --data-dir "$WORK/data" 2>>"$WORK/server.log" &
  PID=$!
  until (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; do sleep 0.01; done
}

start
"$BIN" bench-groups --bootstrap "127.0.0.1:$PORT" --topic gb --members 10 --partitions 100 \
  --commit-groups 100 --commit-seconds 10
"$BIN" bench-groups --bootstrap "127.0.0.1:$PORT" --topic gb --create-groups "$GROUPS_N"
kill -TERM "$PID"; wait "$PID" || true
start
until grep -q "group coordinator loaded" "$WORK/server.log"; do sleep 0.05; done
grep "group coordinator loaded" "$WORK/server.log" | tail -1 | sed 's/.*INFO [^ ]* /load after restart: /'

#!/usr/bin/env bash
# Log cleaner benchmark: the cleaner's throughput on a compacted topic, and its effect on the
# produce latency of another topic, against the same run with the cleaner off.
#
#   bash bench/compaction.sh
# For each of (cleaner off, cleaner on): a fresh broker; a writer fills the compacted topic
# `kv` (UPDATES records of 100 B over KEYS keys, 16 MiB segments) while `strom bench` measures
# produce latency of 1 KiB records at RATE/s on topic `lat`. Cleaner throughput comes from the
# broker's own "log cleaned" lines.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p strom >/dev/null
BIN="${CARGO_TARGET_DIR:-target}/release/strom"
WORK=$(mktemp -d)
PID=
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
UPDATES=${UPDATES:-3000000}
KEYS=${KEYS:-100000}
RATE=${RATE:-20000}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

for cleaner in false true; do
  PORT=$(free_port)
  "$BIN" server --listen "127.0.0.1:$PORT" --data-dir "$WORK/d-$cleaner" \
    --set log.cleaner.enable=$cleaner --set log.cleaner.backoff.ms=500 2>"$WORK/s-$cleaner.log" &
  PID=$!
  until (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; do sleep 0.01; done
  echo "== cleaner enabled: $cleaner"
  "$BIN" bench --bootstrap "127.0.0.1:$PORT" --topic kv --record-bytes 100 --records "$UPDATES" \
    --keys "$KEYS" --label "fill kv (compacted)" --header \
    --topic-config cleanup.policy=compact --topic-config segment.bytes=16777216 \
    --topic-config min.cleanable.dirty.ratio=0.5 &
  FILL=$!
  "$BIN" bench --bootstrap "127.0.0.1:$PORT" --topic lat --record-bytes 1024 \
    --records $((RATE * 20)) --rate "$RATE" --label "latency, cleaner $cleaner"
  wait "$FILL"
  sleep 2
  grep "log cleaned" "$WORK/s-$cleaner.log" | sed 's/.*INFO [^ ]* /  /' | tail -5 || true
  kill "$PID"; wait "$PID" || true; PID=
done

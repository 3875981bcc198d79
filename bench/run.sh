#!/usr/bin/env bash
# End-to-end benchmark: Strom (durable defaults) against a null sink (a Strom broker started
# with --null-sink, which acknowledges Produce without storing anything) in the same run, with
# librdkafka as the load generator (`strom bench`). Also start-up time and idle RSS.
#
#   bash bench/run.sh            # full matrix (a few minutes on 2 cores)
#   QUICK=1 bash bench/run.sh    # smaller record counts
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p strom >/dev/null
BIN="${CARGO_TARGET_DIR:-target}/release/strom"
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start NAME EXTRA_ARGS... ; sets PORT and PID
start() {
  local name=$1; shift
  PORT=$(free_port)
  local t0 t1
  t0=$(date +%s%N)
  "$BIN" server --listen "127.0.0.1:$PORT" --data-dir "$WORK/$name" "$@" 2>"$WORK/$name.log" &
  PID=$!
  PIDS+=("$PID")
  until (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; do sleep 0.001; done
  t1=$(date +%s%N)
  echo "$name: start-up to serving $(( (t1 - t0) / 1000000 )) ms (process start to accepted TCP connection)"
  sleep 1
  echo "$name: idle RSS $(awk '/VmRSS/ {print $2, $3}' "/proc/$PID/status")"
}

start strom
STROM=$PORT
start nullsink --null-sink
NULL=$PORT

N100=${N100:-2000000}
N1K=${N1K:-500000}
NRATE=${NRATE:-500000}
if [ -n "${QUICK:-}" ]; then N100=300000; N1K=100000; NRATE=150000; fi

echo
first=--header
run() { "$BIN" bench $first "$@"; first=; }
i=0
for spec in "100 1 $N100" "100 16 $N100" "1024 1 $N1K" "1024 16 $N1K"; do
  set -- $spec
  i=$((i+1))
  run --bootstrap "127.0.0.1:$NULL" --label null-sink --topic "n$i" --record-bytes "$1" --partitions "$2" --records "$3"
  run --bootstrap "127.0.0.1:$STROM" --label strom --topic "s$i" --record-bytes "$1" --partitions "$2" --records "$3" --consume
done
for parts in 1 16; do
  i=$((i+1))
  run --bootstrap "127.0.0.1:$NULL" --label null-sink --topic "n$i" --record-bytes 1024 --partitions "$parts" --records "$NRATE" --rate 50000
  run --bootstrap "127.0.0.1:$STROM" --label strom --topic "s$i" --record-bytes 1024 --partitions "$parts" --records "$NRATE" --rate 50000
done
echo
echo "strom after the run: RSS $(awk '/VmRSS/ {print $2, $3}' "/proc/$(printf '%s' "${PIDS[0]}")/status")"

#!/usr/bin/env bash
# Replicated-cluster benchmark: a single durable node and a 3-node cluster (every node a broker
# and controller voter, on loopback) measured in the same run with `strom bench` (librdkafka,
# acks=all, 1 KiB records): maximum rate and a fixed 50k records/s, replication factor 3 with
# min.insync.replicas 2 against replication factor 1 on the single node. Then the failover
# time over repeated leader kills (`failover-bench`).
#
#   bash bench/cluster.sh            # KILLS=20 N=300000 by default
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p strom -p strom-tests --bins >/dev/null
BIN="${CARGO_TARGET_DIR:-target}/release/strom"
FAILOVER="${CARGO_TARGET_DIR:-target}/release/failover-bench"
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do sleep 0.01; done; }

N=${N:-300000}
RATE_N=${RATE_N:-300000}
KILLS=${KILLS:-20}
# The three nodes share the machine's cores: each gets its share of request threads (the single
# node keeps the default, one per core).
NODE_THREADS=${NODE_THREADS:-1}

SINGLE=$(free_port)
"$BIN" server --listen "127.0.0.1:$SINGLE" --data-dir "$WORK/single" 2>"$WORK/single.log" &
PIDS+=($!)
wait_port "$SINGLE"

C1=$(free_port); C2=$(free_port); C3=$(free_port)
QUORUM="1@127.0.0.1:$C1,2@127.0.0.1:$C2,3@127.0.0.1:$C3"
PORTS=()
for id in 1 2 3; do
  p=$(free_port); PORTS+=("$p")
  "$BIN" server --node-id "$id" --listen "127.0.0.1:$p" --data-dir "$WORK/node$id" \
    --controller-quorum "$QUORUM" --worker-threads "$NODE_THREADS" 2>"$WORK/node$id.log" &
  PIDS+=($!)
done
for p in "${PORTS[@]}"; do wait_port "$p"; done
CLUSTER="127.0.0.1:${PORTS[0]},127.0.0.1:${PORTS[1]},127.0.0.1:${PORTS[2]}"
sleep 2

first=--header
# Each run starts on a quiet disk: what the previous run wrote is flushed first, so its
# writeback does not land in the next run's latencies.
run() { sync; sleep 2; "$BIN" bench $first "$@"; first=; }
run --bootstrap "127.0.0.1:$SINGLE" --label "single RF1" --topic s1 --record-bytes 1024 --records "$N"
run --bootstrap "$CLUSTER" --label "3 nodes RF3" --topic c1 --record-bytes 1024 --records "$N" \
  --replication-factor 3 --topic-config min.insync.replicas=2
run --bootstrap "127.0.0.1:$SINGLE" --label "single RF1" --topic s2 --record-bytes 1024 --records "$RATE_N" --rate 50000
run --bootstrap "$CLUSTER" --label "3 nodes RF3" --topic c2 --record-bytes 1024 --records "$RATE_N" --rate 50000 \
  --replication-factor 3 --topic-config min.insync.replicas=2
for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
wait 2>/dev/null || true
PIDS=()
echo
STROM_BIN="$BIN" "$FAILOVER" --kills "$KILLS"
STROM_BIN="$BIN" "$FAILOVER" --kills "$KILLS" --controller

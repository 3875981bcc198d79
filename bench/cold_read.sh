#!/usr/bin/env bash
# Producers next to a consumer catching up on data that is no longer in the page cache. One
# durable node (default worker threads); a topic of COLD_RECORDS records of 1 KiB is written,
# then dropped from the page cache (posix_fadvise DONTNEED on its segment files, which are
# clean once fsynced); a producer at RATE records/s on another topic is measured with
# `strom bench`, alone and then while kcat reads the cold topic from the beginning.
#
#   bash bench/cold_read.sh           # COLD_RECORDS=3000000 RATE=20000 HOT_RECORDS=100000 ROUNDS=2
#
# STROM_BIN runs another build of strom (an A/B against an earlier binary). HOT_CONFIG adds
# topic configs to the measured producer's topics, e.g. HOT_CONFIG="flush.messages=1000000"
# (acknowledged before fsync: what is left is the broker's threads, not the disk's queue);
# WORKERS sets the node's --worker-threads (default: one per core).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p strom >/dev/null
BIN="${STROM_BIN:-${CARGO_TARGET_DIR:-target}/release/strom}"
COLD_RECORDS=${COLD_RECORDS:-3000000}
RATE=${RATE:-20000}
HOT_RECORDS=${HOT_RECORDS:-100000}
ROUNDS=${ROUNDS:-2}
HOT=()
for c in ${HOT_CONFIG:-}; do HOT+=(--topic-config "$c"); done
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
command -v kcat >/dev/null || { echo "kcat is needed (apt-get install kcat)" >&2; exit 1; }
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
W=()
[ -n "${WORKERS:-}" ] && W=(--worker-threads "$WORKERS")
"$BIN" server --listen "127.0.0.1:$PORT" --data-dir "$WORK/node" "${W[@]}" 2>"$WORK/node.log" &
PIDS+=($!)
until (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; do sleep 0.01; done
B="127.0.0.1:$PORT"

"$BIN" bench --bootstrap "$B" --topic cold --records "$COLD_RECORDS" --label "fill the cold topic" --header
evict() {
  sync
  python3 - "$WORK/node/cold-0" <<'EOF'
import os, sys
for name in os.listdir(sys.argv[1]):
    fd = os.open(os.path.join(sys.argv[1], name), os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
EOF
}
for r in $(seq "$ROUNDS"); do
  sync; sleep 1
  "$BIN" bench --bootstrap "$B" --topic "alone-$r" --records "$HOT_RECORDS" --rate "$RATE" "${HOT[@]}" --label "producer alone"
  evict; sleep 1
  t0=$(date +%s%N)
  kcat -C -b "$B" -t cold -o beginning -e -q -X fetch.wait.max.ms=100 >/dev/null &
  KCAT=$!
  sleep 0.5
  "$BIN" bench --bootstrap "$B" --topic "beside-$r" --records "$HOT_RECORDS" --rate "$RATE" "${HOT[@]}" --label "beside a cold consumer"
  wait "$KCAT"
  t1=$(date +%s%N)
  echo "    the cold consumer read $COLD_RECORDS records in $(( (t1 - t0) / 1000000 )) ms" >&2
done

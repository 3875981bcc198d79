#!/usr/bin/env bash
# Replicated-cluster benchmark: a single durable node and a 3-node cluster (every node a broker
# and controller voter, on loopback) measured in the same run with `strom bench` (librdkafka,
# acks=all, 1 KiB records): maximum rate (and RF 3 with acks=1) and a fixed 50k records/s
# (and RF 3 over three partitions, each node leading one),
# replication factor 3 with min.insync.replicas 2 against replication factor 1 on the single
# node. Then the failover time over repeated leader kills (`failover-bench`), and over leaders
# stopped with SIGSTOP.
#
#   bash bench/cluster.sh            # KILLS=20 N=1000000 RUNS=1 WARM_GB=6 by default
#
# STROM_BIN runs another build of strom (an A/B against an earlier binary). NODE_ARGS are added
# to every server's command line (e.g. NODE_ARGS="--set k=v" for an A/B of a setting on the same
# binary); KILLS=0 skips the failover part.
#
# RUNS=n repeats the five measurements n times on the same processes (fresh topics each time):
# this VM's run-to-run noise is larger than most effects, so compare medians. After each row
# the CPU the broker processes spent on it is printed (user + system clock ticks, 100 per
# second): the work a configuration costs, which varies less than its rate. So are the
# processes' read- and write-type system calls (`/proc/<pid>/io`): on the cluster, how many
# fetch round trips and writes the row took.
#
# ROWS=max runs only the single node's and RF 3's maximum-rate rows (acks=all), RUNS times:
# the quick A/B of a change to the replication path.
#
# After each round the RF 3 maximum rate is printed as a share of the single node's in that
# round (the issue's target: at least 60 %), and after the last round the median share: on this
# VM single rows vary by a third, so only a median over rounds says where the ratio stands.
#
# WARM_GB (default 6): before each maximum-rate row that many GiB are written to a file and
# deleted, so every such row starts with the same memory state. On a VM that hands freed pages
# back to the host, the first touch of a page after an idle spell costs several times more than
# right after a free, and without this a row is slowed by memory temperature rather than by what
# it measures. WARM_GB=0 skips it.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p strom -p strom-tests --bins >/dev/null
BIN="${STROM_BIN:-${CARGO_TARGET_DIR:-target}/release/strom}"
FAILOVER="${CARGO_TARGET_DIR:-target}/release/failover-bench"
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do sleep 0.01; done; }

N=${N:-1000000}
RATE_N=${RATE_N:-300000}
KILLS=${KILLS:-20}
RUNS=${RUNS:-1}
ROWS=${ROWS:-all}
WARM_GB=${WARM_GB:-6}
# The three nodes share the machine's cores: each gets its share of request threads (the single
# node keeps the default, one per core).
NODE_THREADS=${NODE_THREADS:-1}
read -r -a NODE_ARGS <<<"${NODE_ARGS:-}"

SINGLE=$(free_port)
"$BIN" server --listen "127.0.0.1:$SINGLE" --data-dir "$WORK/single" "${NODE_ARGS[@]}" 2>"$WORK/single.log" &
PIDS+=($!)
SINGLE_PID=$!
CLUSTER_PIDS=()
wait_port "$SINGLE"

C1=$(free_port); C2=$(free_port); C3=$(free_port)
QUORUM="1@127.0.0.1:$C1,2@127.0.0.1:$C2,3@127.0.0.1:$C3"
PORTS=()
for id in 1 2 3; do
  p=$(free_port); PORTS+=("$p")
  "$BIN" server --node-id "$id" --listen "127.0.0.1:$p" --data-dir "$WORK/node$id" \
    --controller-quorum "$QUORUM" --worker-threads "$NODE_THREADS" "${NODE_ARGS[@]}" 2>"$WORK/node$id.log" &
  PIDS+=($!)
  CLUSTER_PIDS+=($!)
done
for p in "${PORTS[@]}"; do wait_port "$p"; done
CLUSTER="127.0.0.1:${PORTS[0]},127.0.0.1:${PORTS[1]},127.0.0.1:${PORTS[2]}"
sleep 2

first=--header
# utime + stime of the given processes, in clock ticks.
ticks() { local s=0 p; for p in $1; do s=$((s + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo "$s"; }
# Read-type and write-type system calls of one process so far (receives, sendfile and
# direct writes count too): per row, how many round trips the work took.
calls() { awk '/^syscr/ {r = $2} /^syscw/ {w = $2} END {print r + 0, w + 0}' "/proc/$1/io"; }
# Each run starts on a quiet disk: what the previous run wrote is flushed first, so its
# writeback does not land in the next run's latencies.
# The first argument says how the memory starts (see WARM_GB): "warm" for the maximum-rate rows,
# which write gigabytes; "quiet" for the fixed-rate rows, which write little and measure the
# tail, and which must not run while the host takes freed pages back.
run() {
  local mode=$1 pids=$2; shift 2
  sync; sleep 2
  if [ "$mode" = warm ] && [ "$WARM_GB" -gt 0 ]; then
    # Last before the run: pages freed and left alone are handed back to the host a few
    # seconds later (free page reporting), so no pause between the warm-up and the run.
    dd if=/dev/zero of="$WORK/warm" bs=1M count=$((WARM_GB * 1024)) status=none
    rm -f "$WORK/warm"
  elif [ "$mode" = quiet ]; then
    # The gigabytes the maximum-rate rows left in the page cache are dropped first (as root;
    # the row writes a new topic and reads nothing old): on a VM that pages out memory left
    # cold (DAMON) they would otherwise be reclaimed, and handed to the host, during the row.
    if [ -w /proc/sys/vm/drop_caches ]; then echo 1 >/proc/sys/vm/drop_caches; fi
    # Past the hand-back of what the previous rows freed: while it runs (a few hundred ms,
    # seconds after the free) page allocations stall, and a fixed-rate row's p99 with them.
    sleep 8
  fi
  local before p each=() split="" calls_before=() io=""; before=$(ticks "$pids")
  for p in $pids; do each+=("$(ticks "$p")"); calls_before+=("$(calls "$p")"); done
  "$BIN" bench $first "$@" | tee "$WORK/row"; first=
  # records/s of the row just run (the table's sixth column).
  RATE=$(awk -F'|' 'NF > 7 && $7 ~ /^ *[0-9]+ *$/ {gsub(/ /, "", $7); r = $7} END {print r + 0}' "$WORK/row")
  # Per process too: on the cluster, which node led the partition shows as the busiest.
  local i=0 r0 w0 r1 w1; for p in $pids; do
    split+=" $(( $(ticks "$p") - each[i] ))"
    read -r r0 w0 <<<"${calls_before[i]}"; read -r r1 w1 <<<"$(calls "$p")"
    io+=" $((r1 - r0))/$((w1 - w0))"
    i=$((i + 1))
  done
  echo "    broker CPU for the row above: $(( $(ticks "$pids") - before )) ticks (per process:$split)" >&2
  echo "    system calls per process, reads/writes:$io" >&2
}
SHARES=()
for r in $(seq "$RUNS"); do
  run warm "$SINGLE_PID" --bootstrap "127.0.0.1:$SINGLE" --label "single RF1" --topic "s1-$r" --record-bytes 1024 --records "$N"
  single_rate=$RATE
  run warm "${CLUSTER_PIDS[*]}" --bootstrap "$CLUSTER" --label "3 nodes RF3" --topic "c1-$r" --record-bytes 1024 --records "$N" \
    --replication-factor 3 --topic-config min.insync.replicas=2
  if [ "$single_rate" -gt 0 ]; then
    SHARES+=($((RATE * 100 / single_rate)))
    echo "    round $r: RF 3 max rate / single node's = ${SHARES[-1]} %" >&2
  fi
  # ROWS=max: only the two rows above (a quick A/B of the maximum rate).
  [ "$ROWS" = max ] && continue
  # The same with acks=1: what waiting for the followers costs, against what the three nodes
  # sharing the machine cost.
  run warm "${CLUSTER_PIDS[*]}" --bootstrap "$CLUSTER" --label "3 nodes RF3 acks=1" --topic "c3-$r" --record-bytes 1024 --records "$N" \
    --replication-factor 3 --topic-config min.insync.replicas=2 --acks 1
  run quiet "$SINGLE_PID" --bootstrap "127.0.0.1:$SINGLE" --label "single RF1" --topic "s2-$r" --record-bytes 1024 --records "$RATE_N" --rate 50000
  run quiet "${CLUSTER_PIDS[*]}" --bootstrap "$CLUSTER" --label "3 nodes RF3" --topic "c2-$r" --record-bytes 1024 --records "$RATE_N" --rate 50000 \
    --replication-factor 3 --topic-config min.insync.replicas=2
  # Three partitions: every node leads one and follows two, so each one's writes as a follower
  # and its work as a leader share its thread and disk.
  run quiet "${CLUSTER_PIDS[*]}" --bootstrap "$CLUSTER" --label "3 nodes RF3" --topic "c4-$r" --record-bytes 1024 --records "$RATE_N" --rate 50000 \
    --partitions 3 --replication-factor 3 --topic-config min.insync.replicas=2
done
if [ "${#SHARES[@]}" -gt 0 ]; then
  sorted=$(printf '%s\n' "${SHARES[@]}" | sort -n)
  median=$(awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : int((v[NR / 2] + v[NR / 2 + 1]) / 2)}' <<<"$sorted")
  echo "RF 3 max rate / single node's over ${#SHARES[@]} rounds: $(tr '\n' ' ' <<<"$sorted")% -- median $median %" >&2
fi
# Under load a metadata quorum that misses heartbeats elects again and a broker that misses its
# session is fenced: both would show in the latencies, so count them.
elections=$(cat "$WORK"/node*.log | grep -c "this node is now the active controller" || true)
fenced=$(cat "$WORK"/node*.log | grep -c "missed its session timeout" || true)
echo "cluster during the runs: $elections controller elections (1 expected), $fenced brokers fenced" >&2
for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
wait 2>/dev/null || true
PIDS=()
[ "$KILLS" -gt 0 ] || exit 0
echo
STROM_BIN="$BIN" "$FAILOVER" --kills "$KILLS"
STROM_BIN="$BIN" "$FAILOVER" --kills "$KILLS" --controller
# Silent failures: the leader is stopped (SIGSTOP), nothing closes its connections.
STROM_BIN="$BIN" "$FAILOVER" --kills "$KILLS" --pause
STROM_BIN="$BIN" "$FAILOVER" --kills "$KILLS" --pause --controller

#!/usr/bin/env bash
# The whole test suite: unit tests, black-box tests with rdkafka and kcat against real strom
# processes, and kafka-python tests. Installs what it needs (kcat, a Python venv) if missing;
# safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

need_apt=()
command -v kcat >/dev/null 2>&1 || need_apt+=(kcat)
command -v strace >/dev/null 2>&1 || need_apt+=(strace)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== installing ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

VENV="$ROOT/.venv"
REQ="$ROOT/tests/python/requirements.txt"
if [ ! -x "$VENV/bin/python" ] || ! cmp -s "$REQ" "$VENV/.requirements"; then
  echo "== preparing the Python venv"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -r "$REQ"
  cp "$REQ" "$VENV/.requirements"
fi

echo "== building"
cargo build --release -p strom
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
export STROM_BIN="$TARGET_DIR/release/strom"

echo "== cargo tests"
cargo test --release --workspace

echo "== kafka-python tests"
"$VENV/bin/python" -m pytest -q -p no:warnings tests/python

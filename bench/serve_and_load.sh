#!/bin/bash
# Start infer_server on a fresh copy of a store, run bench/load_server.py against it (1 client, then
# 16 clients with 20% edits), record `uptime` before each run, stop the server (clean compaction).
#
#   bash bench/serve_and_load.sh OUT_DIR [CODE_DIR] [PORT] [-- extra infer_server flags]
#
# CODE_DIR: the checkout whose code serves (default: this one), e.g. an older commit unpacked with
# `git archive 173a4ff | tar -x -C /tmp/base` for a before/after pair on the same machine; the load
# client, config, checkpoint and store always come from this checkout. Summaries: OUT_DIR/c1.json,
# OUT_DIR/c16.json, OUT_DIR/stats.json; loads and exit codes in OUT_DIR/bench.log.
set -u
OUT=$1; shift; CODE=$PWD; PORT=8611  # optional CODE_DIR and PORT come before "--", the server's flags after it
if [ $# -gt 0 ] && [ "$1" != "--" ]; then CODE=$1; shift; fi
if [ $# -gt 0 ] && [ "$1" != "--" ]; then PORT=$1; shift; fi
[ "${1:-}" = "--" ] && shift
CONFIG=${CONFIG:-runs/main/config.resolved.yaml}; CKPT=${CKPT:-runs/main/kb_final.safetensors}
STORE=${STORE:-store/synth_world}; DURATION=${DURATION:-25}; TOKENS=${TOKENS:-16}
mkdir -p "$OUT" && rm -rf "$OUT/store" && cp -r "$STORE" "$OUT/store"
export KBLAMPP_SERVER_TOKEN=${KBLAMPP_SERVER_TOKEN:-$(.venv/bin/python -c "import secrets; print(secrets.token_hex(16))")}
PYTHONPATH=$CODE .venv/bin/python "$CODE/infer/infer_server.py" --config "$CONFIG" --set store_dir="$OUT/store" \
  --checkpoint "$CKPT" --port "$PORT" "$@" > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null' EXIT
for _ in $(seq 1 300); do
  curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
  kill -0 $SERVER 2>/dev/null || { echo "server exited; see $OUT/server.log" | tee -a "$OUT/bench.log"; exit 1; }
  sleep 1
done
load() {  # clients edit_fraction name
  echo "uptime before $3: $(uptime)" >> "$OUT/bench.log"
  PYTHONPATH=$PWD .venv/bin/python bench/load_server.py --url "http://127.0.0.1:$PORT" --clients "$1" \
    --duration "$DURATION" --edit_fraction "$2" --max_new_tokens "$TOKENS" --seed 0 --json "$OUT/$3.json" \
    > "$OUT/$3.out" 2>&1
  echo "$3 exit $?" >> "$OUT/bench.log"
}
load 1 0 c1
load 16 0.2 c16
curl -s "http://127.0.0.1:$PORT/v1/stats" > "$OUT/stats.json"
kill -TERM $SERVER; wait $SERVER; trap - EXIT

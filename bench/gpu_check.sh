#!/usr/bin/env bash
# One prepared GPU check for the lent machine (SPEC section 9; docs/BENCHMARKS.md "GPU check").
#
# Random-weight models with the real Llama-3.2-1B-Instruct and Qwen2.5-3B-Instruct shapes, in bf16 and
# in 4-bit NF4, patched at the plan's inject layers over a store of N = 1e6 random facts; reports prefill
# and decode tokens/s with and without the KB (ratio), GPU memory, the knowledge-branch profile, and one
# Stage A step at batch 2 x 512; before that, retrieval cost on the GPU (exact matmul vs TorchIVF).
# Finishes in well under 8 minutes on an H100 (each step has its own timeout and a total budget).
#
#   usage: bash bench/gpu_check.sh [WHEEL_DIR]        (WHEEL_DIR default .whl; may be empty or absent)
#   env:   DEVICE=cuda|cpu  SHAPES="llama1b-shape qwen3b-shape"  QUANTS="bf16 nf4"  N=1000000
#          BATCH=4 SEQ=512 GEN=32 REPEATS=3 TRAIN="2 512" RETRIEVAL="exact ivf" BUDGET_S=450
#          OUTDIR (default /tmp/kblampp_gpu_check; copied to $OUT as one .tar.gz)  DRY_RUN=1 (commands only)
#   CPU test of every step: DEVICE=cpu SHAPES=tiny-shape N=5000 SEQ=32 GEN=4 TRAIN="2 32" bash bench/gpu_check.sh
#
# Wheels (this machine has no network; torch/transformers are there, faiss and bitsandbytes are not):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl bitsandbytes==0.50.2 faiss-cpu==1.15.1
#   run tool: command "bash bench/gpu_check.sh .whl", carry [".whl"], timeout_s 540
set -uo pipefail

WHEELS=${1:-.whl}
DEVICE=${DEVICE:-cuda}
SHAPES=${SHAPES:-"llama1b-shape qwen3b-shape"}
QUANTS=${QUANTS:-"bf16 nf4"}
N=${N:-1000000}
BATCH=${BATCH:-4}
SEQ=${SEQ:-512}
GEN=${GEN:-32}
REPEATS=${REPEATS:-3}
TRAIN=${TRAIN:-"2 512"}
RETRIEVAL=${RETRIEVAL:-"exact ivf"}
BUDGET_S=${BUDGET_S:-450}
OUTDIR=${OUTDIR:-/tmp/kblampp_gpu_check}  # logs + JSON; bundled into $OUT (<= 8 files come back) at the end
PY=${PYTHON:-python3}
START=$(date +%s)
export PYTHONUNBUFFERED=1

mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu_check.log"
say() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# The plan's inject layers, K_top and d_k per backbone (configs/backbone_*.yaml).
plan_args() {
  case "$1" in
    llama1b-shape) echo "--layers 8 --k_top 8 --d_k 384" ;;
    qwen3b-shape)  echo "--layers 12,20 --k_top 16 --d_k 512" ;;
    smollm2-shape) echo "--layers 8 --k_top 8 --d_k 384" ;;
    tiny-shape)    echo "--layers 1 --k_top 8 --d_k 32" ;;
    *) echo "unknown shape $1" >&2; return 1 ;;
  esac
}

# step NAME TIMEOUT_S CMD...: run one step with its own timeout, unless the total budget is spent.
step() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET_S - ($(date +%s) - START) ))
  if [ "${DRY_RUN:-0}" = 1 ]; then say "DRY_RUN $name: $*"; return 0; fi
  if [ "$left" -le 20 ]; then say "SKIP $name: total budget of ${BUDGET_S}s spent"; return 0; fi
  [ "$limit" -gt "$left" ] && limit=$left
  say "START $name (limit ${limit}s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUTDIR/$name.log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 0 ]; then say "OK $name"; else say "FAILED $name (exit $rc; 124 = its timeout)"; fi
  return 0
}

# ---- wheels ----------------------------------------------------------------------------------------
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  say "installing wheels from $WHEELS: $(ls "$WHEELS" | tr '\n' ' ')"
  if [ "${DRY_RUN:-0}" != 1 ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/kblampp_site \
      "$WHEELS"/*.whl || say "WARNING: wheel install failed"
  fi
  export PYTHONPATH=/tmp/kblampp_site${PYTHONPATH:+:$PYTHONPATH}
else
  say "no wheels in $WHEELS (faiss / bitsandbytes must already be installed, or their steps are skipped)"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

HAVE_BNB=0; $PY -c "import bitsandbytes" 2>/dev/null && HAVE_BNB=1
HAVE_FAISS=0; $PY -c "import faiss" 2>/dev/null && HAVE_FAISS=1
[ $HAVE_BNB = 1 ] || say "bitsandbytes is not installed: the 4-bit NF4 rows are SKIPPED (carry its wheel)"
[ $HAVE_FAISS = 1 ] || say "faiss is not installed: no HNSW rows (the device rows use exact and TorchIVF)"

# ---- machine -------------------------------------------------------------------------------------
{
  date -u +"date %Y-%m-%d %H:%M UTC"
  $PY -c "import torch, transformers, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'transformers', transformers.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
  if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv; fi
} 2>&1 | tee -a "$LOG"

# ---- retrieval on the device: exact matmul vs TorchIVF ---------------------------------------------
KEY_DTYPE=float16; [ "$DEVICE" = cpu ] && KEY_DTYPE=float32
step ivf_self_check 60 $PY bench/bench_retrieval.py --self_check --device "$DEVICE"
step retrieval 90 $PY bench/bench_retrieval.py --device "$DEVICE" --sizes $(( N / 10 )) "$N" \
  --methods exact ivf_torch --torch_dtype "$KEY_DTYPE" --k 8 --queries $(( BATCH * SEQ )) --single 50 --ref_queries 256 --nprobe 8 16 32 \
  --repeats 5 --out "$OUTDIR/retrieval.json"

# ---- injection overhead and one Stage A step per backbone and precision ---------------------------
for shape in $SHAPES; do
  for quant in $QUANTS; do
    extra=""
    if [ "$quant" = nf4 ]; then
      if [ $HAVE_BNB = 0 ]; then say "SKIP $shape nf4: bitsandbytes is not installed"; continue; fi
      extra="--quant4"
    fi
    dtype=bfloat16; [ "$DEVICE" = cpu ] && dtype=float32
    # shellcheck disable=SC2046
    step "inject_${shape}_${quant}" 240 $PY bench/bench_injection.py --backbone "$shape" --device "$DEVICE" \
      --dtype $dtype $extra --sizes "$N" --retrieval $RETRIEVAL $(plan_args "$shape") --batch "$BATCH" \
      --seq "$SEQ" --gen_tokens "$GEN" --repeats "$REPEATS" --profile --train_step $TRAIN \
      --out "$OUTDIR/inject_${shape}_${quant}.json"
  done
done

say "done in $(( $(date +%s) - START )) s; results in $OUTDIR"
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then  # the device tool returns at most 8 files from $OUT
  tar czf "$OUT/gpu_check.tar.gz" -C "$(dirname "$OUTDIR")" "$(basename "$OUTDIR")" && cp "$LOG" "$OUT/"
fi
for f in "$OUTDIR"/retrieval.log "$OUTDIR"/inject_*.log; do
  [ -f "$f" ] || continue
  echo "## $(basename "$f" .log)"
  grep -E "^\||^Stage A" "$f"
done

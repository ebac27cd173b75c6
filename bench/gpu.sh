#!/usr/bin/env bash
# The GPU check (issue 13): one script, under 8 minutes on one H100 / H200, prints one JSON document.
#
#   make install-dev && bench/gpu.sh [> gpu.json]      # from a source checkout; PARTS=dir keeps the parts
#   DEVICE=cpu QUICK=1 bench/gpu.sh                     # a small dry run of the same steps, without a GPU
#
# 1. forward: ViT-L/14 SelaVPR (random weights, 224 px), latency at batch 1 and throughput at batch
#    8 / 32 / 64, per model dtype (float32, bfloat16, float16 autocast)        python -m bench.model_dtype
# 2. re-ranking: K = 100 at 61x61x128, every precision beside the authors' full-tensor matcher on the
#    same GPU: time, peak memory, count agreement; a place in the database and one missing from it; the
#    fused kernel checked against the tiles, and the 16-bit / int8 tiles timed alone  python -m bench.rerank
# 3. index build throughput over 128 references                                  python -m bench.index
# 4. /localize: `selavpr serve --device cuda` over the same 128 references, p50 / p95 and queries/s with
#    1, 8 and 32 clients, model dtype float32; then bfloat16 with 1 and 32 clients; then float32 with
#    float16 re-ranking (SELAVPR_PRECISION) with 1 and 32; CLIENTS, BF16_CLIENTS, FP16_RERANK_CLIENTS and
#    SECONDS_PER_LOAD change them                                                  python -m bench.load
# Steps 3 and 4 use CHECKPOINT, by default a random-weight ViT-L/14 SelaVPR written by bench.fixtures:
# the paper's model size at the same compute as trained weights (a lent GPU machine cannot hold the
# default weights), so its figures are speed only.
# Each step has its own time limit; a step that fails or runs out is reported as such, the rest go on.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
PARTS="${PARTS:-$(mktemp -d)}"
mkdir -p "$PARTS"
PORT="${PORT:-8765}"
SHARED="${SHARED:-../shared/data}"
DEVICE="${DEVICE:-cuda}"
if [ "${QUICK:-0}" = 1 ]; then
  VIT=vits14 BATCHES=1,2 ROUNDS=1 K=8 COPIES=1 BATCH=8
  : "${SECONDS_PER_LOAD=3}" "${CLIENTS=1 2}" "${BF16_CLIENTS=1}" "${FP16_RERANK_CLIENTS=1}"  # set, even empty, wins
else
  VIT=vitl14 BATCHES=1,8,32,64 ROUNDS=5 K=100 COPIES=4 BATCH=64
  : "${SECONDS_PER_LOAD=15}" "${CLIENTS=1 8 32}" "${BF16_CLIENTS=1 32}" "${FP16_RERANK_CLIENTS=1 32}"
fi
STEPS="${STEPS:-forward rerank index serve}"  # a subset reruns only those
log() { echo "[gpu.sh $(date +%T)] $*" >&2; }

step() {  # step NAME SECONDS COMMAND...: COMMAND's JSON goes to $PARTS/NAME.json
  local name=$1 limit=$2
  shift 2
  case " $STEPS " in *" ${name%%_*} "*) ;; *) return 0 ;; esac
  log "$name (at most ${limit}s)"
  timeout "$limit" "$@" --out "$PARTS/$name.json" >/dev/null 2>"$PARTS/$name.log"
  local rc=$?
  [ $rc -eq 0 ] || log "$name: exit $rc (see $PARTS/$name.log)"
}

if [ "$DEVICE" = cuda ]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this check needs a GPU')" || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$PARTS/gpu.txt" 2>/dev/null

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
if [ -z "${CHECKPOINT:-}" ]; then
  CHECKPOINT="$WORK/checkpoint"
  "$PY" -m bench.fixtures checkpoint --vit "$VIT" --out "$CHECKPOINT" >/dev/null 2>"$PARTS/fixtures.log" ||
    log "no random checkpoint (see $PARTS/fixtures.log)"
fi
"$PY" -m bench.fixtures references --copies "$COPIES" --shared-data "$SHARED" --out "$WORK/refs" \
  >/dev/null 2>>"$PARTS/fixtures.log" || log "no references (see $PARTS/fixtures.log)"

step forward 120 "$PY" -m bench.model_dtype --parts forward --vit "$VIT" --device "$DEVICE" \
  --dtypes float32,bfloat16,float16 --batches "$BATCHES" --rounds "$ROUNDS"
step rerank 150 "$PY" -m bench.rerank --device "$DEVICE" --k "$K" --modes local_head --scenes match,no_match \
  --precisions float32,bfloat16,float16,int8,int8+float32,default --repeats "$ROUNDS" --no-real --fused-check \
  --fused-sweep
# the same without the fused kernel: what the tiles alone give
SELAVPR_FUSED_MNN=0 step rerank_tiles 90 "$PY" -m bench.rerank --device "$DEVICE" --k "$K" --modes local_head \
  --scenes match --precisions bfloat16,float16,int8 --repeats "$ROUNDS" --no-real
step index 90 "$PY" -m bench.index --parts throughput --device "$DEVICE" --batch-size "$BATCH" --copies "$COPIES" \
  --shared-data "$SHARED" --checkpoint "$CHECKPOINT"

serve_and_load() {  # serve_and_load LABEL MODEL_DTYPE PRECISION CLIENTS...: a server over $WORK/refs, loads
  local label=$1 dtype=$2 precision=$3
  shift 3
  case " $STEPS " in *" serve "*) ;; *) return 0 ;; esac
  [ $# -gt 0 ] || return 0
  log "serve $label (building its index)"
  env ${precision:+SELAVPR_PRECISION=$precision} "$PY" -m app.cli serve --device "$DEVICE" --port "$PORT" \
    --index-dir "$WORK/index-$dtype" --references "$WORK/refs" --checkpoint "$CHECKPOINT" --model-dtype "$dtype" \
    >"$PARTS/serve_$label.log" 2>&1 &
  local server=$!
  "$PY" - "$PORT" <<'PY' || log "serve $label: not ready after 150 s (see $PARTS/serve_$label.log)"
import sys, time, urllib.request

for _ in range(150):  # the model loads, then the index is built from $WORK/refs
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/readyz", timeout=2)
        sys.exit(0)
    except OSError:
        time.sleep(1)
sys.exit(1)
PY
  for clients in "$@"; do
    STEPS="$STEPS load" step "load_${label}_$clients" $((SECONDS_PER_LOAD + 25)) "$PY" -m bench.load \
      --url "http://127.0.0.1:$PORT" --clients "$clients" --seconds "$SECONDS_PER_LOAD" \
      --images $(ls "$SHARED"/matching_triplets/p*/i2/*)
  done
  kill "$server" 2>/dev/null
  wait "$server" 2>/dev/null
}
# shellcheck disable=SC2086  # the client counts are words
serve_and_load float32 float32 "" $CLIENTS
# shellcheck disable=SC2086
serve_and_load bfloat16 bfloat16 "" $BF16_CLIENTS
# shellcheck disable=SC2086  # float32 model, re-ranking in float16 (the fused kernel on CUDA)
serve_and_load fp16rerank float32 float16 $FP16_RERANK_CLIENTS

"$PY" - "$PARTS" <<'PY'
import json, sys
from pathlib import Path

parts = Path(sys.argv[1])
report = {"gpu": (parts / "gpu.txt").read_text().strip() if (parts / "gpu.txt").exists() else None}
for path in sorted(parts.glob("*.log")):
    if path.stat().st_size and not path.stem.startswith("serve_"):
        report.setdefault("logs_tail", {})[path.stem] = path.read_text()[-600:]
names = ["forward", "rerank", "rerank_tiles", "index"] + sorted(p.stem for p in parts.glob("load_*.json"))
for name in names:
    path = parts / f"{name}.json"
    report[name] = json.loads(path.read_text()) if path.exists() else {"error": f"no result, see {parts}/{name}.log"}
    if isinstance(report[name], dict) and "rss_mib" in report[name]:
        report[name]["rss_mib"].pop("samples", None)
print(json.dumps(report, indent=2))
PY

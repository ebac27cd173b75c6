#!/usr/bin/env bash
# The GPU check (issue 13): one script, under 8 minutes on one H100 / H200, prints one JSON document.
#
#   make install-dev && bench/gpu.sh            # from a source checkout; OUT=dir keeps the parts
#   DEVICE=cpu QUICK=1 bench/gpu.sh              # a small dry run of the same steps, without a GPU
#
# 1. forward: ViT-L/14 SelaVPR (random weights, 224 px), latency at batch 1 and throughput at batch
#    8 / 32 / 64, per model dtype (float32, bfloat16, float16 autocast)        python -m bench.model_dtype
# 2. re-ranking: K = 100 at 61x61x128, every precision beside the authors' full-tensor matcher on the
#    same GPU: time, peak memory, count agreement; a place in the database and one missing from it
#                                                                                 python -m bench.rerank
# 3. index build throughput (default ViT-S weights; the model's raw rate and a full build_index)
#                                                                                  python -m bench.index
# 4. /localize: `selavpr serve --device cuda` over the 32 shared images, p50 / p95 and queries/s with
#    1 and 8 clients                                                               python -m bench.load
# Each step has its own time limit; a step that fails or runs out is reported as such, the rest go on.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
PORT="${PORT:-8765}"
SHARED="${SHARED:-../shared/data}"
DEVICE="${DEVICE:-cuda}"
if [ "${QUICK:-0}" = 1 ]; then
  VIT=vits14 BATCHES=1,2 ROUNDS=1 K=8 COPIES=1 BATCH=8 SECONDS_PER_LOAD=3
else
  VIT=vitl14 BATCHES=1,8,32,64 ROUNDS=5 K=100 COPIES=8 BATCH=64 SECONDS_PER_LOAD=20
fi
log() { echo "[gpu.sh $(date +%T)] $*" >&2; }

step() {  # step NAME SECONDS COMMAND...: COMMAND's JSON goes to $OUT/NAME.json
  local name=$1 limit=$2
  shift 2
  log "$name (at most ${limit}s)"
  timeout "$limit" "$@" --out "$OUT/$name.json" >/dev/null 2>"$OUT/$name.log"
  local rc=$?
  [ $rc -eq 0 ] || log "$name: exit $rc (see $OUT/$name.log)"
}

if [ "$DEVICE" = cuda ]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this check needs a GPU')" || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$OUT/gpu.txt" 2>/dev/null

step forward 120 "$PY" -m bench.model_dtype --parts forward --vit "$VIT" --device "$DEVICE" \
  --dtypes float32,bfloat16,float16 --batches "$BATCHES" --rounds "$ROUNDS"
step rerank 150 "$PY" -m bench.rerank --device "$DEVICE" --k "$K" --modes local_head --scenes match,no_match \
  --precisions float32,bfloat16,float16,int8,int8+float32,default --repeats "$ROUNDS" --no-real
step index 90 "$PY" -m bench.index --parts throughput --device "$DEVICE" --batch-size "$BATCH" --copies "$COPIES"

# /localize: a server over the shared images, then 1 and 8 clients for 20 s each.
WORK=$(mktemp -d)
mkdir -p "$WORK/refs"
cp -r "$SHARED/matching_triplets/." "$WORK/refs/" 2>/dev/null
log "serve (building its index)"
"$PY" -m app.cli serve --device "$DEVICE" --port "$PORT" --index-dir "$WORK/index" --references "$WORK/refs" \
  >"$OUT/serve.log" 2>&1 &
SERVER=$!
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break
  sleep 1
done
for clients in 1 8; do
  step "load_$clients" 40 "$PY" -m bench.load --url "http://127.0.0.1:$PORT" --clients "$clients" --seconds "$SECONDS_PER_LOAD" \
    --images $(ls "$WORK"/refs/p*/i2/*)
done
kill "$SERVER" 2>/dev/null
wait "$SERVER" 2>/dev/null
rm -rf "$WORK"

"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
report = {"gpu": (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else None}
for name in ("forward", "rerank", "index", "load_1", "load_8"):
    path = out / f"{name}.json"
    report[name] = json.loads(path.read_text()) if path.exists() else {"error": f"no result, see {out}/{name}.log"}
for name in ("load_1", "load_8"):
    part = report[name]
    if "rss_mib" in part:
        part["rss_mib"].pop("samples", None)
print(json.dumps(report, indent=2))
PY

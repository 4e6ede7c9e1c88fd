#!/usr/bin/env bash
# Train the toy world from scratch on a GPU machine with the DEFAULT config, export the weights and
# print the evaluation (judge accuracy on held-out renders, judged accuracy of generations, watermark
# rate).  Run in the repository root:
#
#     bash toyworld/gpu_train.sh OUTDIR [extra `toyworld train` args]
#
# Writes OUTDIR/weights (diffusers folder + judges + MANIFEST.json, what gets committed as
# toyworld/weights, ~56 MB), OUTDIR/train.log and OUTDIR/samples.png.  Checkpoints (large) stay in
# $RUN_DIR (default /tmp/toyworld-run); rerunning with `--resume` continues from there.  Needs python3 with torch,
# transformers, safetensors, tqdm, numpy, pillow; diffusers is taken from .whl/diffusers-*.whl
# (installed with --target /tmp/site) when it is not importable.
set -euo pipefail
OUT="${1:?usage: bash toyworld/gpu_train.sh OUTDIR [extra train args]}"
shift
PY="${PYTHON:-python3}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SITE=/tmp/site
RUN="${RUN_DIR:-/tmp/toyworld-run}"
mkdir -p "$SITE" /tmp/cg_pkg "$OUT" "$RUN"
OUT="$(cd "$OUT" && pwd)"
# the checkout is the package `conceptgate`: expose it under that name
ln -sfn "$ROOT" /tmp/cg_pkg/conceptgate
export PYTHONPATH="/tmp/cg_pkg:$SITE:${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
# progress bars in the log too (redrawn every 30 s without a terminal)
export CONCEPTGATE_PROGRESS="${CONCEPTGATE_PROGRESS:-1}"
echo "[$(date +%H:%M:%S)] gpu_train.sh: root $ROOT, out $OUT"

source "$ROOT/toyworld/gpu_env.sh"

START=$(date +%s)
"$PY" -u -m conceptgate.toyworld.train train --device "${DEVICE:-cuda}" --workers 16 \
  --out "$RUN" --weights "$OUT/weights" \
  --deadline-min "${DEADLINE_MIN:-6.5}" --set eval_prompts=258 --set eval_seeds=2 "$@" 2>&1 | tee "$OUT/train.log"
cp "$RUN/samples.png" "$OUT/" 2>/dev/null || true
echo "[$(date +%H:%M:%S)] gpu_train.sh: done in $(( $(date +%s) - START )) s; weights in $OUT/weights"
du -sh "$OUT/weights" || true

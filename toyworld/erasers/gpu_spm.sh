#!/usr/bin/env bash
# Train SPM membrane variants for the toy world in parallel on one GPU, then evaluate each with the quick
# SPM tier (bench_spm.py) on the same GPU. Run in the repository root:
#
#     bash toyworld/erasers/gpu_spm.sh OUTDIR [TRAIN_MINUTES] [EVAL_SECONDS]
#
# Writes OUTDIR/spm_variants.tgz (membranes + one JSON per evaluated config) and OUTDIR/log.txt.
# Variants: the reference recipe (bare concept, lr 1e-4, la_strength 1000) and the non-official
# templated recipe (--templates toy) at lr 1e-4 / 1e-3 and la_strength 1000 / 100, for one object and one style.
set -uo pipefail
OUT="${1:?usage: bash toyworld/erasers/gpu_spm.sh OUTDIR [TRAIN_MINUTES] [EVAL_SECONDS]}"
MIN="${2:-3.7}"
EVAL_S="${3:-140}"
PY="${PYTHON:-python3}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SITE=/tmp/site
W=/tmp/spmwork
mkdir -p "$SITE" /tmp/cg_pkg "$OUT" "$W/eval"
ln -sfn "$ROOT" /tmp/cg_pkg/conceptgate
export PYTHONPATH="/tmp/cg_pkg:$SITE:${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
source "$ROOT/toyworld/gpu_env.sh"
log() { echo "[$(date +%H:%M:%S)] $*"; }

declare -A ARGS=(
  [ref]="--lr 1e-4"
  [tpl]="--templates toy --lr 1e-4"
  [tpl_lr3]="--templates toy --lr 1e-3"
  [tpl_lr3_la100]="--templates toy --lr 1e-3 --la-strength 100"
)
pids=()
for concept in triangle striped; do
  for v in "${!ARGS[@]}"; do
    name="${concept}_${v}"
    # shellcheck disable=SC2086
    "$PY" -m conceptgate train spm --model toy --concept "$concept" --iterations 3000 ${ARGS[$v]} \
      --device "${DEVICE:-cuda}" --threads 1 --save-every 0 --no-progress --deadline-min "$MIN" \
      --out "$W/$name.safetensors" > "$W/$name.log" 2>&1 &
    pids+=($!)
  done
done
log "training ${#pids[@]} membranes for at most $MIN min"
wait "${pids[@]}"
for f in "$W"/*.log; do echo "== $(basename "$f")"; grep -v "^\s*$" "$f" | tail -n 3; done

pids=()
files=()
for f in "$W"/*.safetensors; do files+=(--file "$(basename "$f" .safetensors)=$f"); done
timeout "$EVAL_S" "$PY" -m conceptgate.toyworld.erasers.bench_spm run base --device "${DEVICE:-cuda}" --out-dir "$W/eval" > "$W/eval_base.log" 2>&1 &
pids+=($!)
for f in "$W"/*.safetensors; do
  key="$(basename "$f" .safetensors)"
  timeout "$EVAL_S" "$PY" -m conceptgate.toyworld.erasers.bench_spm run "$key-always" "$key-ft" "${files[@]}" \
    --device "${DEVICE:-cuda}" --out-dir "$W/eval" > "$W/eval_$key.log" 2>&1 &
  pids+=($!)
done
log "evaluating (at most $EVAL_S s)"
wait "${pids[@]}"
tail -n 2 "$W"/eval_*.log
"$PY" -m conceptgate.toyworld.erasers.summarise_spm "$W/eval"
tar czf "$OUT/spm_variants.tgz" -C "$W" .
log "done"

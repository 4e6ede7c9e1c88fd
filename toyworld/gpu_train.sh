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
echo "[$(date +%H:%M:%S)] gpu_train.sh: root $ROOT, out $OUT"

if ! "$PY" -c "import requests" 2>/dev/null; then
  # diffusers imports `requests` at module level but never touches the network for local folders
  echo "[$(date +%H:%M:%S)] requests missing: writing an offline stand-in to $SITE/requests"
  mkdir -p "$SITE/requests"
  cat > "$SITE/requests/__init__.py" <<'PYEOF'
"""Offline stand-in for `requests`, written by conceptgate/toyworld/gpu_train.sh."""
class RequestException(Exception):
    pass
class ConnectionError(RequestException):
    pass
class HTTPError(RequestException):
    pass
class Timeout(RequestException):
    pass
class _Exceptions:
    RequestException = RequestException
    ConnectionError = ConnectionError
    HTTPError = HTTPError
    Timeout = Timeout
exceptions = _Exceptions()
def _offline(*a, **k):
    raise ConnectionError("offline stand-in: no network")
get = post = head = put = request = _offline
class Session:
    def __init__(self, *a, **k):
        pass
    request = get = post = head = staticmethod(_offline)
class Response:
    pass
__version__ = "0.0.0-offline-stand-in"
PYEOF
fi
if ! "$PY" -c "import diffusers" 2>/dev/null; then
  WHL="$(ls "$ROOT"/.whl/diffusers-*.whl 2>/dev/null | head -n1 || true)"
  [ -n "$WHL" ] || { echo "diffusers is not importable and no .whl/diffusers-*.whl found" >&2; exit 2; }
  echo "[$(date +%H:%M:%S)] installing $WHL into $SITE"
  "$PY" -m pip install --quiet --no-deps --no-index --target "$SITE" "$WHL"
fi
"$PY" -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-', '| diffusers', diffusers.__version__, '| transformers', transformers.__version__)"

START=$(date +%s)
"$PY" -u -m conceptgate.toyworld.train train --device "${DEVICE:-cuda}" --workers 16 \
  --out "$RUN" --weights "$OUT/weights" \
  --deadline-min "${DEADLINE_MIN:-6.5}" --set eval_prompts=258 --set eval_seeds=2 "$@" 2>&1 | tee "$OUT/train.log"
cp "$RUN/samples.png" "$OUT/" 2>/dev/null || true
echo "[$(date +%H:%M:%S)] gpu_train.sh: done in $(( $(date +%s) - START )) s; weights in $OUT/weights"
du -sh "$OUT/weights" || true

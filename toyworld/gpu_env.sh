# Sourced by the toyworld/*gpu*.sh scripts: make torch + diffusers + transformers importable on a bare GPU
# machine without network. Expects $PY, $ROOT and $SITE; diffusers comes from .whl/diffusers-*.whl when missing.
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


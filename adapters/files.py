"""Eraser files: ``.safetensors`` with kohya LoRA keys plus ``conceptgate.*`` metadata.

Layout of a weight eraser (loads in stock ComfyUI / A1111 LoRA loaders at a fixed strength)::

    lora_unet_<diffusers path with _>.lora_down.weight   (r, in[, 1, 1])
    lora_unet_<...>.lora_up.weight                       (out, r[, 1, 1])
    lora_unet_<...>.alpha                                scalar
    lora_unet_<...>.diff                                 full delta (instead of up/down)

Conditioning erasers store their learned vectors under ``conceptgate.tensor.<name>``.
Metadata keys (all strings, JSON where structured): ``conceptgate.format``, ``.kind``,
``.method``, ``.name``, ``.concepts``, ``.base_family``, ``.base_fingerprint``,
``.text_fingerprint``, ``.settings``, ``.hyperparameters``, ``.gate``, ``.version``.
Official SPM files (``prompts``, ``rank``, ``alpha`` metadata only) load unchanged.

Every problem raises :class:`EraserFileError` naming the file and the problem. Pickles are
refused: only ``python -m conceptgate convert`` reads them, with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from collections import defaultdict

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import EraserFileError, UnsupportedEraser
from .eraser import KINDS, Eraser
from .limits import clean_name
from .lowrank import ModuleDelta
from .naming import KOHYA_UNET_PREFIX, from_kohya, guess_family, to_kohya
from .registry import check_eraser

FORMAT_VERSION = "1"
META = "conceptgate."
TENSOR_PREFIX = "conceptgate.tensor."
GATE_PREFIX = "conceptgate.gate."  # the calibrated context gate's tensors; its metadata is META + "gate"
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")
_MODULE_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha", "diff")


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit (safetensors refuses larger headers)
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
               "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _no_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_entry(path, key: str, info) -> tuple[int, int]:
    """One tensor's header entry -> its (begin, end) offsets; anything malformed names the tensor."""
    where = f"corrupt safetensors header at {key!r}"
    if not isinstance(info, dict):
        raise EraserFileError(path, f"{where}: not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise EraserFileError(path, f"{where}: unknown dtype {str(dtype)[:40]!r}")
    if not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(s) and 0 <= s < 2 ** 40 for s in shape):
        raise EraserFileError(path, f"{where}: shape must be a list of at most 8 non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise EraserFileError(path, f"{where}: data_offsets must be two integers [begin, end] with begin <= end")
    numel = 1
    for s in shape:
        numel *= s
    if offsets[1] - offsets[0] != numel * DTYPE_BYTES[dtype]:
        raise EraserFileError(path, f"{where}: {offsets[1] - offsets[0]} bytes for shape {shape} of {dtype}")
    return offsets[0], offsets[1]


def read_header(path) -> dict:
    """The validated safetensors header of ``path`` (tensor entries and ``__metadata__``), read without
    loading any tensor. The header's size is checked before it is read."""
    return _check_container(str(path))


def _check_container(path: str) -> dict:
    """Validate the safetensors container itself; returns the parsed header."""
    if not os.path.exists(path):
        raise EraserFileError(path, "file not found")
    if os.path.isdir(path):
        raise EraserFileError(path, "this is a folder, not an eraser file")
    lower = path.lower()
    try:
        size = os.path.getsize(path)
        f = open(path, "rb")
    except OSError as e:
        raise EraserFileError(path, f"cannot be read ({e.strerror or e})") from None
    with f:
        head = f.read(9)
        looks_pickled = head[:2] == b"PK" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))
        n = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else None
        if lower.endswith(PICKLE_SUFFIXES) or (looks_pickled and (n is None or n > size - 8)):
            raise EraserFileError(
                path,
                "this is a pickle (torch .pt/.ckpt), which can run code when loaded; ConceptGate only "
                "loads .safetensors. Convert it explicitly: python -m conceptgate convert "
                f"{os.path.basename(path)} --out NAME.safetensors",
            )
        if n is None:
            raise EraserFileError(path, f"truncated file: {size} bytes, not even a safetensors header")
        if n < 2 or (len(head) == 9 and head[8:9] not in (b"{", b"[")):  # "[": a JSON list, named below
            # the format's header is a JSON object right after its 8-byte length
            raise EraserFileError(path, "not a safetensors file (it does not start with a safetensors header; "
                                        "a text file, an image or another format?)")
        if n > MAX_HEADER_BYTES:
            raise EraserFileError(path, f"not a usable safetensors file: its header claims {n} bytes, more than "
                                        f"the format's limit of {MAX_HEADER_BYTES} (refused without reading it)")
        if n > size - 8:
            raise EraserFileError(path, f"truncated file: header claims {n} bytes, file has {size}")
        f.seek(8)  # the header starts after its 8-byte length
        try:
            header = json.loads(f.read(n).decode("utf-8"), parse_constant=_no_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise EraserFileError(path, f"not a safetensors file (unreadable header: {str(e)[:200]})") from None
    if not isinstance(header, dict):
        raise EraserFileError(path, f"not a safetensors file (its header is a JSON {type(header).__name__}, "
                                    "not an object)")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise EraserFileError(path, "corrupt safetensors header: __metadata__ must map names to strings")
    end = 0
    for key, info in header.items():
        if key != "__metadata__":
            end = max(end, _check_entry(path, key, info)[1])
    if 8 + n + end > size:
        raise EraserFileError(
            path, f"truncated file: tensors need {8 + n + end} bytes, file has {size} (incomplete download?)"
        )
    return header


def read_safetensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = str(path)
    _check_container(path)
    tensors = {}
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except EraserFileError:
        raise
    except Exception as e:  # safetensors raises its own error types
        raise EraserFileError(path, f"cannot read safetensors: {e}") from None
    return tensors, meta


def _json_meta(meta: dict, key: str, default=None, path=None):
    raw = meta.get(META + key)
    if raw is None:
        return default
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise EraserFileError(path, f"metadata {META + key} is not valid JSON") from None


def _check_finite(path, tensors: dict[str, torch.Tensor]):
    for k, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = "NaN" if torch.isnan(t).any() else "Inf"
            raise EraserFileError(path, f"tensor {k} contains {bad} values (a broken training run or export)")


def modules_from_kohya(path, tensors: dict[str, torch.Tensor], known: dict[str, str] | None = None) -> dict[str, ModuleDelta]:
    """Group kohya tensors into {module name: ModuleDelta}; unknown or incomplete keys are errors."""
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    unknown = []
    for key, t in tensors.items():
        if key.startswith(TENSOR_PREFIX):
            continue
        prefix, _, suffix = key.partition(".")
        if not prefix.startswith(KOHYA_UNET_PREFIX) or suffix not in _MODULE_SUFFIXES:
            unknown.append(key)
            continue
        groups[prefix][suffix] = t
    if unknown:
        hint = ""
        if any(k.endswith(".weight") and not k.startswith("lora") for k in unknown):
            hint = (" (full UNet weights, e.g. a UCE/RECE checkpoint: convert it against its base model with "
                    "python -m conceptgate convert)")
        elif any(k.startswith("lora_te") for k in unknown):
            hint = " (text-encoder LoRA keys: ConceptGate erasers act on the UNet only)"
        raise EraserFileError(path, f"{len(unknown)} unknown key(s), e.g. {unknown[0]!r}{hint}")
    modules = {}
    for prefix, parts in groups.items():
        try:
            name = from_kohya(prefix, known)
        except KeyError as e:
            raise EraserFileError(path, f"cannot map key {prefix!r} to a UNet module: {e}") from None
        if "diff" in parts:
            if parts["diff"].dim() not in (2, 4) or not parts["diff"].is_floating_point():
                raise EraserFileError(path, f"{prefix}.diff: a {parts['diff'].dim()}-D {parts['diff'].dtype} tensor; "
                                            "a full delta is a 2-D or 4-D floating-point tensor")
            modules[name] = ModuleDelta(diff=parts["diff"])
            continue
        missing = [s for s in ("lora_down.weight", "lora_up.weight") if s not in parts]
        if missing:
            raise EraserFileError(path, f"missing key {prefix}.{missing[0]} (its partner is present)")
        up, down = parts["lora_up.weight"], parts["lora_down.weight"]
        for what, t in (("lora_up.weight", up), ("lora_down.weight", down)):
            if t.dim() not in (2, 4) or not t.is_floating_point():
                raise EraserFileError(path, f"{prefix}.{what}: a {t.dim()}-D {t.dtype} tensor; a LoRA factor is a "
                                            "2-D (linear) or 4-D (conv) floating-point tensor")
        if up.dim() != down.dim() or up.shape[1] != down.shape[0]:
            raise EraserFileError(path, f"{prefix}: up {tuple(up.shape)} and down {tuple(down.shape)} ranks differ")
        alpha = parts.get("alpha")
        if alpha is not None and alpha.numel() != 1:
            raise EraserFileError(path, f"{prefix}.alpha: {alpha.numel()} values, a LoRA alpha is one number")
        modules[name] = ModuleDelta(up=up, down=down, alpha=float(alpha) if alpha is not None else None)
    return modules


PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
PEFT_METADATA = "lora_adapter_metadata"  # diffusers' save_lora_weights: the LoraConfig, keys "unet.<field>"


def is_peft_layout(tensors) -> bool:
    return any(k.endswith(PEFT_SUFFIXES) for k in tensors)


def _peft_pattern(patterns: dict, module: str):
    """peft's rule for ``rank_pattern`` / ``alpha_pattern``: a key matches a module name that ends with it
    (as a regular expression, after a dot or at the start); the first match wins."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return None


def peft_to_kohya(path, tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
    """A LoRA in peft's layout (``<module>.lora_A.weight`` / ``lora_B``: what peft's
    ``get_peft_model_state_dict`` and diffusers' ``save_lora_weights`` write) as kohya tensors, keys converted
    by diffusers' own ``convert_state_dict_to_kohya``. The scale peft applies, ``lora_alpha / r`` (``/ sqrt(r)``
    with rsLoRA; ``alpha_pattern`` per module), comes from the LoraConfig diffusers stores in the metadata and
    is written as each module's kohya ``alpha``; without that metadata the scale is 1 (alpha = r), as diffusers
    loads such files. Text-encoder and DoRA weights are refused, naming the file."""
    try:
        from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    except ImportError as e:
        raise EraserFileError(path, "a peft-layout LoRA: reading it needs the 'diffusers' package") from e
    lora, other = {}, []
    for key, t in tensors.items():
        if key.startswith(TENSOR_PREFIX):
            continue
        k = key.removeprefix("base_model.model.")
        if k.startswith(("text_encoder.", "text_encoder_2.")):
            raise EraserFileError(path, f"text-encoder LoRA key {key!r}: ConceptGate erasers act on the UNet only")
        if not k.endswith(PEFT_SUFFIXES):
            other.append(key)
            continue
        lora[k if k.startswith("unet.") else "unet." + k] = t
    if other:
        hint = " (DoRA: not supported)" if any("lora_magnitude_vector" in k for k in other) else ""
        raise EraserFileError(path, f"{len(other)} key(s) of a peft LoRA that are not lora_A/lora_B factors, "
                                    f"e.g. {other[0]!r}{hint}")
    config = {}
    if meta.get(PEFT_METADATA):
        try:
            raw = json.loads(meta[PEFT_METADATA])
        except ValueError:
            raise EraserFileError(path, f"metadata {PEFT_METADATA!r} is not JSON") from None
        if not isinstance(raw, dict):
            raise EraserFileError(path, f"metadata {PEFT_METADATA!r} is not a JSON object")
        config = {k.removeprefix("unet."): v for k, v in raw.items() if not k.startswith("text_encoder")}
    if config.get("use_dora"):
        raise EraserFileError(path, "a DoRA adapter (use_dora): not supported")
    kohya = convert_state_dict_to_kohya(lora)
    if config.get("lora_alpha") is not None:
        # kohya names flatten the dots, so the patterns are matched on the peft keys' module paths
        modules = [k[len("unet."):-len(".lora_A.weight")] for k in lora if k.endswith(".lora_A.weight")]
        paths = {KOHYA_UNET_PREFIX + m.replace(".", "_"): m for m in modules}
        for key in [k for k in kohya if k.endswith(".alpha")]:
            prefix = key[: -len(".alpha")]
            r = int(kohya[prefix + ".lora_down.weight"].shape[0])
            alpha = _peft_pattern(config.get("alpha_pattern"), paths.get(prefix, prefix))
            alpha = float(config["lora_alpha"] if alpha is None else alpha)
            scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
            kohya[key] = torch.tensor(scale * r, dtype=torch.float32)
    return kohya


def family_from_modules(modules: dict[str, ModuleDelta]) -> str | None:
    """Guess the base family from the cross-attention context width (768/1024/2048)."""
    for name, d in modules.items():
        if name.endswith("attn2.to_k"):
            return guess_family({"context_dim": d.in_features, "model_channels": 320})
    return None


def load_eraser(path, concepts: list[str] | None = None, known: dict[str, str] | None = None,
                kind: str | None = None) -> Eraser:
    """Load and validate an eraser file (ConceptGate or official SPM format); every problem is an
    :class:`EraserFileError` (or :class:`IncompatibleModelError`) naming the file. See :func:`_load_eraser`."""
    try:
        return _load_eraser(path, concepts, known, kind)
    except (EraserFileError, UnsupportedEraser):
        raise
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError, RecursionError,
            OverflowError) as e:  # a malformed file that slipped past the checks: never a traceback
        raise EraserFileError(path, f"malformed eraser file ({type(e).__name__}: {str(e)[:200]})") from e


def _load_eraser(path, concepts: list[str] | None = None, known: dict[str, str] | None = None,
                 kind: str | None = None) -> Eraser:
    """Load and validate an eraser file (ConceptGate or official SPM format).

    ``concepts`` overrides or supplies the concept list (official files without ``prompts``).
    ``known`` is an exact {kohya prefix: module name} map for the target model, if available.
    ``kind``: the kind the caller can use (``weight`` / ``conditioning`` / ``guidance``); a file of
    another kind is refused with a message naming the file and what it is.
    """
    path, kind_expected = str(path), kind
    tensors, meta = read_safetensors(path)
    if not tensors and meta.get(META + "kind") != "guidance":
        raise EraserFileError(path, "the file holds no tensors")
    _check_finite(path, tensors)
    tensors, gate = _split_gate(path, tensors, meta)
    ours = (META + "format") in meta
    name = os.path.splitext(os.path.basename(path))[0]
    if ours:
        fmt = meta[META + "format"]
        if fmt != FORMAT_VERSION:
            raise EraserFileError(path, f"ConceptGate format {fmt} is newer than this version reads ({FORMAT_VERSION})")
        kind = meta.get(META + "kind", "weight")
        if kind not in KINDS:
            raise EraserFileError(path, f"unknown eraser kind {kind!r} in metadata (known: {', '.join(KINDS)})")
        file_concepts = _json_meta(meta, "concepts", [], path)
        if not isinstance(file_concepts, list) or not all(isinstance(c, str) for c in file_concepts):
            raise EraserFileError(path, f"metadata {META}concepts must be a JSON list of strings")
        method = meta.get(META + "method", "lora")
        name = clean_name(meta.get(META + "name", name)) or name  # shown in reports, node text, infotext
    else:
        kind, method = "weight", "spm" if "prompts" in meta else "lora"
        file_concepts = [c.strip() for c in meta.get("prompts", "").split(",") if c.strip()]
        if is_peft_layout(tensors):  # a peft / diffusers LoRA: the same factors under other names
            tensors = peft_to_kohya(path, tensors, meta)
    if kind_expected is not None and kind != kind_expected:
        raise EraserFileError(path, _wrong_kind(kind, method, kind_expected))
    concepts = list(concepts) if concepts else file_concepts
    settings = _json_meta(meta, "settings", {}, path)
    if not isinstance(settings, dict):
        raise EraserFileError(path, f"metadata {META}settings must be a JSON object")
    if not concepts:
        raise EraserFileError(
            path, "no concept list: the file has no 'prompts' metadata; enter the erased concept(s) by hand"
        )
    modules = modules_from_kohya(path, tensors, known) if kind == "weight" else {}
    if kind == "weight" and not modules:
        raise EraserFileError(path, "a weight eraser without any module keys")
    extra = {k[len(TENSOR_PREFIX):]: t for k, t in tensors.items() if k.startswith(TENSOR_PREFIX)}
    if kind == "conditioning" and not extra:
        raise EraserFileError(path, f"a conditioning eraser needs {TENSOR_PREFIX}* tensors")
    if kind == "guidance" and (tensors or extra):
        raise EraserFileError(path, f"a guidance eraser carries no tensors; this file has {len(tensors)} "
                                    f"(e.g. {next(iter(tensors))!r})")
    if not ours and "alpha" in meta and "rank" in meta:
        # official SPM: per-module alpha tensors are authoritative; metadata must agree with them
        try:
            float(meta["alpha"]), int(meta["rank"])
        except ValueError:
            raise EraserFileError(path, "metadata 'alpha'/'rank' are not numbers") from None
    eraser = Eraser(
        name=name,
        kind=kind,
        concepts=concepts,
        method=method,
        modules=modules,
        tensors=extra,
        settings=settings,
        base_family=meta.get(META + "base_family") or (family_from_modules(modules) if modules else None),
        base_fingerprint=meta.get(META + "base_fingerprint"),
        text_fingerprint=meta.get(META + "text_fingerprint"),
        metadata=dict(meta),
        source=path,
        sha256=sha256_file(path),
        official_format=not ours,
        gate=gate,
    )
    if eraser.base_family == "custom":
        eraser.base_family = None
    check_eraser(eraser, path)  # the mechanism's own checks (registry)
    return eraser


def _split_gate(path, tensors: dict, meta: dict):
    """(the other tensors, the stored :class:`~.gate.context.ContextDetector` or None)."""
    from .gate.context import ContextDetector

    parts = {k[len(GATE_PREFIX):]: t for k, t in tensors.items() if k.startswith(GATE_PREFIX)}
    rest = {k: t for k, t in tensors.items() if not k.startswith(GATE_PREFIX)}
    if not parts and META + "gate" not in meta:
        return rest, None
    try:
        return rest, ContextDetector.from_parts(parts, _json_meta(meta, "gate", {}, path))
    except ValueError as e:
        raise EraserFileError(path, f"stored gate calibration unusable: {e}") from None


def _wrong_kind(kind: str, method: str, expected: str) -> str:
    what = {"weight": "weight eraser (UNet deltas)", "conditioning": "conditioning eraser (learned vectors)",
            "guidance": "guidance eraser (a sampling-time rule, no weights)"}
    hint = {"guidance": " Use it with the All-but-One guidance path (diffusers AboGuidedPipeline, ComfyUI "
                        "'All-but-One Guider' / 'All-but-One Guidance (KSampler)').",
            "weight": " Use it in an eraser stack (Apply Eraser Stack / GatedPipeline) or a LoRA loader."}
    return (f"this is a {what.get(kind, kind)} of method {method!r}, but a {expected} eraser was expected."
            + hint.get(kind, ""))


def kohya_tensors(modules: dict[str, ModuleDelta]) -> dict[str, torch.Tensor]:
    """Module deltas as kohya LoRA tensors: the file layout, and what hosts' LoRA loaders take."""
    tensors = {}
    for name, d in modules.items():
        prefix = to_kohya(name)
        if d.is_low_rank:
            tensors[f"{prefix}.lora_up.weight"] = d.up
            tensors[f"{prefix}.lora_down.weight"] = d.down
            tensors[f"{prefix}.alpha"] = torch.tensor(float(d.alpha if d.alpha is not None else d.rank))
        else:
            tensors[f"{prefix}.diff"] = d.diff
    return tensors


def save_eraser(eraser: Eraser, path, hyperparameters: dict | None = None, dtype=None) -> str:
    """Write ``eraser`` as a ConceptGate file; returns its sha256. SPM files keep the official keys."""
    from .. import __version__

    tensors = kohya_tensors(eraser.modules)
    for k, t in eraser.tensors.items():
        tensors[TENSOR_PREFIX + k] = t
    if eraser.gate is not None:
        tensors.update({GATE_PREFIX + k: t.float() for k, t in eraser.gate.to_tensors().items()})
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() and v.dim() else v)
               .detach().contiguous().cpu() for k, v in tensors.items()}
    _check_finite(path, tensors)
    # keys of other tools (kohya's ss_*, official SPM's) travel along; ours are written anew below
    meta = {k: v for k, v in (eraser.metadata or {}).items() if not k.startswith(META) and isinstance(v, str)}
    meta.update({
        META + "format": FORMAT_VERSION,
        META + "kind": eraser.kind,
        META + "method": eraser.method,
        META + "name": eraser.name,
        META + "concepts": json.dumps(eraser.concepts),
        META + "settings": json.dumps(eraser.settings),
        META + "hyperparameters": json.dumps(hyperparameters or {}),
        META + "version": __version__,
    })
    if eraser.gate is not None:
        meta[META + "gate"] = json.dumps(eraser.gate.to_metadata())
    for key in ("base_family", "base_fingerprint", "text_fingerprint"):
        if getattr(eraser, key):
            meta[META + key] = str(getattr(eraser, key))
    if eraser.method == "spm" and eraser.modules:
        # the official SPM readers split this on commas
        meta["prompts"] = ",".join(eraser.concepts)
        meta["rank"] = str(eraser.rank)
        first = next(iter(eraser.modules.values()))
        meta["alpha"] = str(float(first.alpha if first.alpha is not None else first.rank))
    tmp = str(path) + ".tmp"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)
    return sha256_file(path)


def describe(path) -> tuple[dict, list[str]]:
    """What ``inspect`` prints: a summary and every validation problem found (never raises)."""
    info: dict = {"file": str(path)}
    problems: list[str] = []
    try:
        info["size_bytes"] = os.path.getsize(path)
    except OSError:
        pass
    try:
        e = load_eraser(path)
    except EraserFileError as err:
        if "no concept list" in err.problem:
            problems.append(err.problem)
            try:
                e = load_eraser(path, concepts=["?"])
                e.concepts = []
            except EraserFileError as err2:
                problems.append(err2.problem)
                return info, problems
        else:
            problems.append(err.problem)
            return info, problems
    info.update(
        name=e.name, kind=e.kind, method=e.method, concepts=e.concepts,
        format="official SPM / kohya LoRA" if e.official_format else f"ConceptGate v{FORMAT_VERSION}",
        base_family=e.base_family or "unknown", modules=len(e.modules), rank=e.rank,
        parameters=e.num_parameters(), sha256=e.sha256,
    )
    if e.tensors:
        info["vectors"] = {k: list(t.shape) for k, t in e.tensors.items()}
    if e.method == "geom":  # how hosts use the tokens (the paper's negative prompt or ConceptGate's regional rule)
        mode = (e.settings or {}).get("negation", "prompt")
        info["negation"] = ("the paper's negative prompt" if mode == "prompt" else
                            f"regional x{float(e.settings.get('negation_strength', 2.0)):g} (ConceptGate's rule)"
                            if mode == "regional" else f"unknown ({str(mode)[:40]!r})")
    info["gate"] = (f"context, calibrated (threshold {e.gate.calibration.threshold:.3g}, names "
                    f"{', '.join(e.gate.names)}; fired on {e.gate.rates.get('negatives_fired', '?')} of neutral prompts, "
                    f"its probe half on {e.gate.rates.get('probe_positives_fired', '?')} of concept prompts)"
                    if e.gate is not None else "not calibrated (calibrated on first use; see 'calibrate')")
    if e.modules:
        from .naming import reference_layout

        fam = e.base_family
        if fam in ("sd1", "sd2", "sdxl"):
            problems += e.check_against(reference_layout(fam))
    return info, problems

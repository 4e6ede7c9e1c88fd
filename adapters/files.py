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
import os
import struct
from collections import defaultdict

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import EraserFileError
from .eraser import KINDS, Eraser
from .lowrank import ModuleDelta
from .naming import KOHYA_UNET_PREFIX, from_kohya, guess_family, to_kohya
from .registry import check_eraser

FORMAT_VERSION = "1"
META = "conceptgate."
TENSOR_PREFIX = "conceptgate.tensor."
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")
_MODULE_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha", "diff")


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_container(path: str) -> dict:
    """Validate the safetensors container itself; returns the parsed header."""
    if not os.path.exists(path):
        raise EraserFileError(path, "file not found")
    lower = path.lower()
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        looks_pickled = head[:2] == b"PK" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if lower.endswith(PICKLE_SUFFIXES) or (looks_pickled and (n is None or n > size - 8)):
            raise EraserFileError(
                path,
                "this is a pickle (torch .pt/.ckpt), which can run code when loaded; ConceptGate only "
                "loads .safetensors. Convert it explicitly: python -m conceptgate convert "
                f"{os.path.basename(path)} --out NAME.safetensors",
            )
        if n is None:
            raise EraserFileError(path, f"truncated file: {size} bytes, not even a safetensors header")
        if n > size - 8:
            raise EraserFileError(path, f"truncated file: header claims {n} bytes, file has {size}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise EraserFileError(path, f"not a safetensors file (unreadable header: {e})") from None
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise EraserFileError(path, f"corrupt safetensors header at {key!r}") from None
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
        return json.loads(raw)
    except json.JSONDecodeError:
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
            modules[name] = ModuleDelta(diff=parts["diff"])
            continue
        missing = [s for s in ("lora_down.weight", "lora_up.weight") if s not in parts]
        if missing:
            raise EraserFileError(path, f"missing key {prefix}.{missing[0]} (its partner is present)")
        up, down = parts["lora_up.weight"], parts["lora_down.weight"]
        if up.shape[1] != down.shape[0]:
            raise EraserFileError(path, f"{prefix}: up {tuple(up.shape)} and down {tuple(down.shape)} ranks differ")
        alpha = parts.get("alpha")
        modules[name] = ModuleDelta(up=up, down=down, alpha=float(alpha) if alpha is not None else None)
    return modules


def family_from_modules(modules: dict[str, ModuleDelta]) -> str | None:
    """Guess the base family from the cross-attention context width (768/1024/2048)."""
    for name, d in modules.items():
        if name.endswith("attn2.to_k"):
            return guess_family({"context_dim": d.in_features, "model_channels": 320})
    return None


def load_eraser(path, concepts: list[str] | None = None, known: dict[str, str] | None = None,
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
        method = meta.get(META + "method", "lora")
        name = meta.get(META + "name", name)
    else:
        kind, method = "weight", "spm" if "prompts" in meta else "lora"
        file_concepts = [c.strip() for c in meta.get("prompts", "").split(",") if c.strip()]
    if kind_expected is not None and kind != kind_expected:
        raise EraserFileError(path, _wrong_kind(kind, method, kind_expected))
    concepts = list(concepts) if concepts else file_concepts
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
        settings=_json_meta(meta, "settings", {}, path),
        base_family=meta.get(META + "base_family") or (family_from_modules(modules) if modules else None),
        base_fingerprint=meta.get(META + "base_fingerprint"),
        text_fingerprint=meta.get(META + "text_fingerprint"),
        metadata=dict(meta),
        source=path,
        sha256=sha256_file(path),
        official_format=not ours,
    )
    if eraser.base_family == "custom":
        eraser.base_family = None
    check_eraser(eraser, path)  # the mechanism's own checks (registry)
    return eraser


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
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() and v.dim() else v)
               .detach().contiguous().cpu() for k, v in tensors.items()}
    _check_finite(path, tensors)
    meta = {
        META + "format": FORMAT_VERSION,
        META + "kind": eraser.kind,
        META + "method": eraser.method,
        META + "name": eraser.name,
        META + "concepts": json.dumps(eraser.concepts),
        META + "settings": json.dumps(eraser.settings),
        META + "hyperparameters": json.dumps(hyperparameters or {}),
        META + "version": __version__,
    }
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
    if e.modules:
        from .naming import reference_layout

        fam = e.base_family
        if fam in ("sd1", "sd2", "sdxl"):
            problems += e.check_against(reference_layout(fam))
    return info, problems

"""Import of published UCE / RECE weights: the delta against the base model, factored by a float64 SVD
with the truncation error reported, written as a ConceptGate eraser file."""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from ..errors import EraserFileError
from ..eraser import Eraser
from ..files import sha256_file
from ..lowrank import ModuleDelta
from . import closed_form as cf
from ..fingerprint import weights_fingerprint
from .edit import is_cross_attention_kv
from .hosts import DiffusersEditHost, EditHost

def _normalise_keys(sd: Mapping[str, torch.Tensor]) -> dict:
    """Strip a ``unet.`` prefix (pipeline-level state dicts); other names are kept as they are."""
    return {(k[5:] if k.startswith("unet.") else k): v for k, v in sd.items()}


def read_published_weights(path) -> dict:
    """A published UCE/RECE file as ``{diffusers state-dict key: tensor}``.

    ``.safetensors`` (UCE's edited ``attn2`` weights) through safetensors; anything else (RECE's
    ``torch.save(unet.state_dict())`` ``.pt``) only with ``torch.load(weights_only=True)``, which
    refuses pickles that would construct arbitrary objects.
    """
    path = str(path)
    if not os.path.exists(path):
        raise EraserFileError(path, "file not found")
    if path.lower().endswith(".safetensors"):
        from ..files import read_safetensors

        sd, _ = read_safetensors(path)
    else:
        try:
            try:   # zip-format checkpoints are memory-mapped (a full SD UNet is 3.4 GB)
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise EraserFileError(path, f"cannot be read safely (torch.load weights_only=True refused it: "
                                        f"{str(e).splitlines()[0][:200]})") from None
        if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
            sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not sd:
        raise EraserFileError(path, "not a (non-empty) dictionary of tensors")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise EraserFileError(path, f"entry {bad[0]!r} is not a tensor")
    sd = _normalise_keys(sd)
    if any(k.startswith(("model.diffusion_model.", "diffusion_model.")) for k in sd):
        raise EraserFileError(path, "LDM/A1111 key names (model.diffusion_model.*); this converter reads the "
                                    "diffusers UNet key names that UCE and RECE publish")
    return sd


def base_cross_attention_weights(base) -> dict:
    """``{module name: W}`` of a base model's attn2 to_k/to_v.

    ``base``: a diffusers model folder (``unet/`` inside) or UNet folder (only the needed tensors are
    read from its ``.safetensors``), a ``UNet2DConditionModel``, a pipeline, an :class:`EditHost`,
    or a state dict / ``{name: W}`` mapping. ``"toy"``: the embedded toy model.
    """
    if isinstance(base, EditHost):
        return base.cross_attention_weights()
    if isinstance(base, torch.nn.Module):
        return cf.collect_cross_attention_weights(base)
    if hasattr(base, "unet") and isinstance(getattr(base, "unet"), torch.nn.Module):
        return cf.collect_cross_attention_weights(base.unet)
    if isinstance(base, Mapping):
        return cf.collect_cross_attention_weights(_normalise_keys(base))
    path = str(base)
    folder = os.path.join(path, "unet") if os.path.isdir(os.path.join(path, "unet")) else path
    if os.path.isdir(folder):
        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        if files:
            from safetensors import safe_open

            out = {}
            preferred = [f for f in files if f == "diffusion_pytorch_model.safetensors"] or files
            with safe_open(os.path.join(folder, preferred[0]), framework="pt", device="cpu") as f:
                for k in f.keys():
                    n = k[:-7] if k.endswith(".weight") else k
                    if is_cross_attention_kv(n) and k.endswith(".weight"):
                        out[n] = f.get_tensor(k)
            if out:
                return out
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet" if folder != path else None,
                                                    local_files_only=True)
        return cf.collect_cross_attention_weights(unet)
    if os.path.isfile(path):
        return cf.collect_cross_attention_weights(read_published_weights(path))
    raise FileNotFoundError(f"base model not found: {base}")


@dataclass
class ImportOutcome:
    eraser: Eraser
    report: dict
    hyperparameters: dict = field(default_factory=dict)


def _guess_concepts(path: str) -> list[str]:
    base = os.path.splitext(os.path.basename(path))[0]
    m = re.match(r"erased-(.+?)-towards_", base)
    if m:
        return [c.strip() for c in m.group(1).replace("_", " ").split(",") if c.strip()]
    m = re.match(r"([A-Za-z][A-Za-z _-]*?)_ep\d+$", base)
    if m:
        return [m.group(1).replace("_", " ")]
    return []


def _guess_method(path: str, full_unet: bool) -> str:
    """UCE's old code names files ``erased-...-method_replace...``; RECE's are ``<concept>_ep<k>.pt``;
    the new UCE code writes safetensors of the edited weights only."""
    base = os.path.basename(path)
    if base.startswith("erased-") or path.lower().endswith(".safetensors"):
        return "uce"
    if re.search(r"_ep\d+\.", base) or full_unet:
        return "rece"
    return "uce"


def _rounding_noise(*tensors: torch.Tensor) -> float:
    """Expected Frobenius norm of the round-to-nearest error of tensors stored below float32 precision
    (each element's error is uniform within +-ulp/2, i.e. ulp^2 / 12 in mean square); 0 for float32 / 64."""
    total = 0.0
    for t in tensors:
        if not t.is_floating_point() or torch.finfo(t.dtype).eps <= torch.finfo(torch.float32).eps:
            continue
        _, exp = torch.frexp(t.detach().to(torch.float64).abs())
        ulp = torch.ldexp(torch.full_like(exp, torch.finfo(t.dtype).eps, dtype=torch.float64), exp - 1)
        ulp = ulp.clamp_min(torch.finfo(t.dtype).tiny * torch.finfo(t.dtype).eps)  # zeros and subnormals
        total += float((ulp * ulp).sum()) / 12.0
    return total ** 0.5


def import_published(path, base, concepts: Sequence[str] | None = None, *, method: str | None = None,
                     name: str | None = None, rank: int | None = None, tol: float = 1e-3,
                     full: bool = False, store_dtype: torch.dtype = torch.float32,
                     check_other_keys: bool = True, log: Callable[[str], None] | None = None) -> ImportOutcome:
    """Published UCE/RECE weights -> a ConceptGate :class:`Eraser` (delta vs ``base``, factored).

    Every ``attn2.to_k`` / ``to_v`` weight in the file minus the base's; zero deltas are dropped.
    ``full=True`` stores the exact dense deltas (``.diff``); otherwise a float64 SVD truncated to
    ``rank`` or to the smallest rank with relative Frobenius error ``<= tol`` (reported per
    module and as the maximum). A full-UNet file whose *other* weights differ from the base is
    reported (``other_keys_changed``): the base is probably not the model the edit was made from.
    """
    say = log or (lambda s: None)
    path = str(path)
    t0 = time.perf_counter()
    sd = read_published_weights(path)
    edited = {k[:-7]: v for k, v in sd.items() if k.endswith(".weight") and is_cross_attention_kv(k[:-7])}
    if not edited:
        raise EraserFileError(path, "no attn2 to_k/to_v weights (diffusers key names) in this file")
    say(f"read {len(sd)} tensors ({len(edited)} attn2 to_k/to_v) from {os.path.basename(path)}")
    base_w = base_cross_attention_weights(base)
    missing = [k for k in edited if k not in base_w]
    if missing:
        raise EraserFileError(path, f"module {missing[0]!r} is not in the base model (wrong base?)")
    for k, v in edited.items():
        if tuple(v.shape) != tuple(base_w[k].shape):
            raise EraserFileError(path, f"shape mismatch at {k}: file {tuple(v.shape)}, base {tuple(base_w[k].shape)}")
    other_changed = []
    if check_other_keys and len(sd) > len(edited) and not isinstance(base, (Mapping,)):
        other_changed = _other_keys_changed(sd, base, set(edited))
    method = method or _guess_method(path, len(sd) > 2 * len(edited))
    concepts = [c for c in (concepts or _guess_concepts(path)) if c.strip()]
    if not concepts:
        raise EraserFileError(path, "no concept list: pass the erased concept(s) (--concept)")
    modules, report_mod = {}, {}
    elem = torch.empty((), dtype=store_dtype).element_size()
    nbytes = 0
    for k in sorted(edited):
        delta = edited[k].to(torch.float64) - base_w[k].to(torch.float64)
        if not bool(delta.any()):
            continue
        if full:
            modules[k] = ModuleDelta(diff=delta.to(store_dtype))
            report_mod[k] = {"rank": min(delta.shape), "rel_error": 0.0}
            nbytes += delta.numel() * elem
            continue
        # an fp16 / bf16 file (or base) carries rounding noise in every element of the delta: truncating to
        # ``tol`` below that noise floor would keep the noise as rank (a bf16 UCE file came out at rank 26-44
        # instead of 3), so the truncation tolerance never goes below twice the rounding noise
        floor = 2.0 * _rounding_noise(edited[k], base_w[k]) / max(float(torch.linalg.norm(delta)), 1e-300)
        tol_k = max(tol, floor)
        up, down, info = cf.factor_delta(delta, rank=rank, tol=None if rank is not None else tol_k, dtype=store_dtype)
        modules[k] = ModuleDelta(up=up.contiguous(), down=down.contiguous(), alpha=float(up.shape[1]))
        report_mod[k] = {"rank": info["rank"], "rel_error": info["rel_error"],
                         "singular_values": info["singular_values"][:8], "tol": None if rank is not None else tol_k}
        nbytes += (up.numel() + down.numel()) * elem
    if not modules:
        raise EraserFileError(path, "the file's attn2 weights equal the base's: nothing to import (wrong base?)")
    ranks = [m["rank"] for m in report_mod.values()]
    errs = [m["rel_error"] for m in report_mod.values()]
    shapes = {k: tuple(base_w[k].shape) for k in modules}
    not_low_rank = [k for k, m in report_mod.items() if not full and m["rank"] > 0.5 * min(shapes[k])]
    report = {"file": path, "method": method, "concepts": concepts, "modules": len(modules),
              "rank_max": max(ranks), "rank_min": min(ranks), "truncation_rel_error_max": max(errs),
              "tol": None if (full or rank is not None) else tol, "rank_requested": rank, "full": full,
              "factor_bytes": nbytes, "source_bytes": os.path.getsize(path),
              "other_keys_changed": other_changed, "not_low_rank": not_low_rank, "per_module": report_mod,
              "seconds": time.perf_counter() - t0}
    warnings = []
    if other_changed:
        warnings.append(f"{len(other_changed)} weight(s) outside attn2 to_k/to_v differ from the base "
                        f"(e.g. {other_changed[0]}): is the base the model this edit was made from?")
    if not_low_rank:
        warnings.append(f"{len(not_low_rank)} delta(s) need a rank above half their size: the base is probably "
                        f"not the model the edit was computed on")
    report["warnings"] = warnings
    settings = {"imported_from": os.path.basename(path), "source_sha256": sha256_file(path),
                "method": method, "concepts": concepts}
    label = name or os.path.splitext(os.path.basename(path))[0]
    eraser = Eraser(name=label[:80], kind="weight", concepts=concepts, method=method, modules=modules,
                    settings=settings, base_fingerprint=weights_fingerprint(base_w))
    fam = None
    try:
        from ..files import family_from_modules

        fam = family_from_modules(modules)
    except Exception:  # pragma: no cover - defensive
        pass
    eraser.base_family = None if fam in (None, "custom") else fam
    hyper = {"import": {k: v for k, v in report.items() if k not in ("per_module", "file")}}
    return ImportOutcome(eraser, report, hyper)


def _other_keys_changed(sd: Mapping[str, torch.Tensor], base, skip: set) -> list[str]:
    """Keys of a full-UNet file (other than the edited modules) that differ from the base."""
    ref = None
    if isinstance(base, torch.nn.Module):
        ref = base.state_dict()
    elif hasattr(base, "unet") and isinstance(getattr(base, "unet"), torch.nn.Module):
        ref = base.unet.state_dict()
    elif isinstance(base, DiffusersEditHost):
        ref = base.unet.state_dict()
    changed = []
    if ref is not None:
        for k, v in sd.items():
            n = k[:-7] if k.endswith(".weight") else k
            if n in skip or k not in ref:
                continue
            if tuple(ref[k].shape) != tuple(v.shape) or not torch.equal(ref[k].to(v.dtype), v):
                changed.append(k)
        return changed
    if isinstance(base, (str, os.PathLike)):
        path = str(base)
        folder = os.path.join(path, "unet") if os.path.isdir(os.path.join(path, "unet")) else path
        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")) if os.path.isdir(folder) else []
        if files:
            from safetensors import safe_open

            with safe_open(os.path.join(folder, files[0]), framework="pt", device="cpu") as f:
                keys = set(f.keys())
                for k, v in sd.items():
                    n = k[:-7] if k.endswith(".weight") else k
                    if n in skip or k not in keys:
                        continue
                    t = f.get_tensor(k)
                    if tuple(t.shape) != tuple(v.shape) or not torch.equal(t.to(v.dtype), v):
                        changed.append(k)
    return changed


def save_import(outcome: ImportOutcome, path, dtype: torch.dtype | None = None) -> str:
    from ..files import save_eraser

    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sha = save_eraser(outcome.eraser, path, hyperparameters=outcome.hyperparameters, dtype=dtype)
    outcome.eraser.source, outcome.eraser.sha256 = path, sha
    outcome.report["out"] = path
    outcome.report["out_bytes"] = os.path.getsize(path)
    return path

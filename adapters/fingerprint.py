"""Which base model an eraser, an edit cache entry or a calibration belongs to: fingerprints of weights, and
the base family an eraser's own shapes point to when its file records none."""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Mapping

import torch

#: the public families' text-encoder token width (the width of a learned conditioning vector); SDXL's two
#: encoders make it ambiguous, so it is not listed
TEXT_WIDTHS = {"sd1": 768, "sd2": 1024}

def _tensor_digest(h, name: str, w: torch.Tensor, samples: int, with_sum: bool) -> None:
    w = w.detach()
    flat = w.reshape(-1)
    step = max(1, flat.numel() // max(1, samples))
    sample = flat[::step].to(device="cpu", dtype=torch.float32).contiguous()
    h.update(name.encode())
    h.update(repr((tuple(w.shape), str(w.dtype).replace("torch.", ""))).encode())
    h.update(sample.numpy().tobytes())
    if with_sum and flat.numel() and w.is_floating_point():
        # catches sparse edits between the sampled elements; 9 significant digits are far above
        # the reduction-order noise of a float64 sum, so the value is stable across thread counts
        h.update(f"{float(torch.sum(w, dtype=torch.float64)):.9e}".encode())


def weights_fingerprint(weights: Mapping[str, torch.Tensor], samples_per_tensor: int = 4096,
                        with_sums: bool = True) -> str:
    """Cheap, stable fingerprint of a set of weights (hex, 16 chars).

    sha256 over each tensor's name, shape, dtype, a strided sample of ``samples_per_tensor``
    values (as float32) and its float64 sum printed to 9 significant digits. Independent of
    device, storage and process; any fine-tune, merge or LoRA on these weights changes it.
    SD1.5's 32 attn2 matrices take a few milliseconds.
    """
    h = hashlib.sha256()
    for name in sorted(weights):
        _tensor_digest(h, name, weights[name], samples_per_tensor, with_sums)
    return h.hexdigest()[:16]


def infer_base_family(eraser, candidates: Mapping[str, tuple] | None = None) -> tuple[list[str], str]:
    """The base families ``eraser`` fits, read from its own tensors, for files that record no family.

    ``candidates``: ``{family: (UNetLayout or None, text width or None)}``; default the public SD1.x, SD2.x
    and SDXL architectures (a caller adds its own models, e.g. the toy model). A weight eraser fits a family
    when every module it names exists there with its shape (the UNet's module set and widths, e.g. the
    cross-attention context 768 / 1024 / 2048); a conditioning eraser when its vectors have the family's
    text width. Returns (fitting families in ``candidates`` order, what was compared: ``"module set"``,
    ``"vector width"``, or ``""`` when the eraser carries nothing to compare, e.g. a guidance rule)."""
    from .naming import reference_layout

    if candidates is None:
        candidates = {f: (reference_layout(f), TEXT_WIDTHS.get(f)) for f in ("sd1", "sd2", "sdxl")}
    if eraser.modules:
        shapes_only = dataclasses.replace(eraser, base_family=None)  # compare shapes, not a recorded family
        fits = [f for f, (layout, _) in candidates.items()
                if layout is not None and not shapes_only.check_against(layout)]
        return fits, "module set"
    widths = {int(t.shape[-1]) for t in (eraser.tensors or {}).values() if t.dim()}
    if len(widths) == 1:
        (w,) = widths
        return [f for f, (_, width) in candidates.items() if width == w], "vector width"
    return [], ""


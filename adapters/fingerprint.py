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



# closed-form edits (UCE / RECE) record the fingerprint of every attn2 to_k / to_v weight they were solved on
EDIT_METHODS = ("uce", "rece")


def edit_base_mismatch(eraser, weights: Mapping[str, torch.Tensor] | None, allow_other_base: bool = False) -> str | None:
    """Why a closed-form edit should not be applied to a model whose attn2 ``to_k`` / ``to_v`` weights are
    ``weights`` ({canonical module name: W}), or None.

    A UCE / RECE edit is the exact solution only for the weights it was solved on; on other weights it
    is an approximation of unknown quality, so it is refused unless ``allow_other_base``. Trained
    erasers (SPM membranes, the All-but-One adapter) are meant to transfer to fine-tunes and are not
    checked. The fingerprint depends on the weights' dtype: a model held in another precision than the
    edit's (fp16 / bf16 against fp32) cannot be compared and is not refused (see :func:`edit_base_note`).
    """
    recorded = getattr(eraser, "base_fingerprint", None)
    if allow_other_base or not recorded or getattr(eraser, "method", None) not in EDIT_METHODS or not weights:
        return None
    if any(w.dtype != torch.float32 for w in weights.values()):
        return None
    here = weights_fingerprint(weights)
    if here == recorded:
        return None
    return (f"this {eraser.method.upper()} edit was solved on other weights (base fingerprint {recorded}, this model "
            f"{here}); a closed-form edit is exact only on its own base. Run the edit on this model, or allow "
            "other bases explicitly (ComfyUI: 'allow_other_base' on Apply Eraser Stack; diffusers: "
            "GatedPipeline(..., allow_other_base=True))")


def edit_base_note(eraser, weights: Mapping[str, torch.Tensor] | None) -> str | None:
    """A note for the report when the check could not be made (weights in another precision)."""
    if getattr(eraser, "method", None) in EDIT_METHODS and getattr(eraser, "base_fingerprint", None) and weights \
            and any(w.dtype != torch.float32 for w in weights.values()):
        return "base fingerprint not checked (model weights are not float32)"
    return None

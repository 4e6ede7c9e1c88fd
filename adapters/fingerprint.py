"""Fingerprints of weights: which base model an eraser, an edit cache entry or a calibration belongs to."""
from __future__ import annotations

import hashlib
from typing import Mapping

import torch

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

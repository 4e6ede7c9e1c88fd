"""Writes eraser files in the *official* SPM layout (as Con6924/SPM's save_weights does), and broken
variants of them, for loader tests."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from conceptgate.adapters.naming import UNetLayout, to_kohya


def official_spm_tensors(layout: UNetLayout, seed: int = 0, scale: float = 0.05) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for spec in layout.modules("spm"):
        extra = (1, 1) if spec.is_conv else ()
        prefix = to_kohya(spec.name)
        out[f"{prefix}.lora_down.weight"] = torch.randn(1, spec.in_features, *extra, generator=g) * scale
        out[f"{prefix}.lora_up.weight"] = torch.randn(spec.out_features, 1, *extra, generator=g) * scale
        out[f"{prefix}.alpha"] = torch.tensor(1.0)
    return out


def write_official_spm(path, layout: UNetLayout, prompts="snoopy", seed: int = 0, scale: float = 0.05, metadata=True):
    meta = {"prompts": prompts, "rank": "1", "alpha": "1.0"} if metadata else None
    save_file(official_spm_tensors(layout, seed, scale), str(path), metadata=meta)
    return str(path)

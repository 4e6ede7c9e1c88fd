"""Which weights closed-form edits touch: collecting ``attn2.to_k`` / ``attn2.to_v`` from a module or a
state dict, and their shapes on the reference architectures (for tests and speed measurements)."""
from __future__ import annotations

import math
from typing import Mapping

import torch

# ---------------------------------------------------------------------------
# module collection and benchmark
# ---------------------------------------------------------------------------

def collect_cross_attention_weights(source) -> dict:
    """``{module_name: W}`` of every ``attn2.to_k`` / ``attn2.to_v`` in a module or state dict.

    Accepts a ``torch.nn.Module`` (``named_modules``) or a mapping of state-dict
    keys (a trailing ``.weight`` is stripped).  Tensors are returned as-is
    (not copied); edits never write into them.
    """
    out = {}
    if isinstance(source, torch.nn.Module):
        for name, mod in source.named_modules():
            if "attn2" in name and name.endswith((".to_k", ".to_v")) and hasattr(mod, "weight"):
                out[name] = mod.weight.detach()
    elif isinstance(source, Mapping):
        for key, w in source.items():
            name = key[:-7] if key.endswith(".weight") else key
            if "attn2" in name and name.endswith((".to_k", ".to_v")):
                out[name] = w.detach() if isinstance(w, torch.Tensor) else w
    else:
        raise ValueError("source must be a torch.nn.Module or a state-dict mapping")
    return out


def cross_attention_shapes(arch: str = "sd15") -> dict:
    """``{diffusers module name: (out, ctx_dim)}`` of all attn2 to_k/to_v for the standard configs.

    ``sd15``/``sd14``/``sd1`` (16 blocks, 32 matrices, ctx 768), ``sd2`` (ctx 1024),
    ``sdxl`` (70 transformer blocks, 140 matrices, ctx 2048).
    """
    a = str(arch).lower().replace(".", "").replace("-", "").replace("_", "")
    blocks = []   # (prefix, width, n_transformer_layers)
    if a in ("sd15", "sd14", "sd1", "sd1x", "sd2", "sd21", "sd2x"):
        ctx = 1024 if a.startswith("sd2") else 768
        widths = (320, 640, 1280)
        for i, w in enumerate(widths):
            for j in range(2):
                blocks.append((f"down_blocks.{i}.attentions.{j}", w, 1))
        blocks.append(("mid_block.attentions.0", 1280, 1))
        for i, w in zip((1, 2, 3), (1280, 640, 320)):
            for j in range(3):
                blocks.append((f"up_blocks.{i}.attentions.{j}", w, 1))
    elif a == "sdxl":
        ctx = 2048
        for i, (w, n) in zip((1, 2), ((640, 2), (1280, 10))):
            for j in range(2):
                blocks.append((f"down_blocks.{i}.attentions.{j}", w, n))
        blocks.append(("mid_block.attentions.0", 1280, 10))
        for i, (w, n) in zip((0, 1), ((1280, 10), (640, 2))):
            for j in range(3):
                blocks.append((f"up_blocks.{i}.attentions.{j}", w, n))
    else:
        raise ValueError(f"unknown arch {arch!r}; use 'sd15', 'sd2' or 'sdxl'")
    shapes = {}
    for prefix, w, n in blocks:
        for t in range(n):
            for proj in ("to_k", "to_v"):
                shapes[f"{prefix}.transformer_blocks.{t}.attn2.{proj}"] = (w, ctx)
    return shapes


def random_cross_attention_weights(arch: str = "sd15", *, seed: int = 0,
                                   dtype: torch.dtype = torch.float32) -> dict:
    """Random, realistically scaled attn2 to_k/to_v weights (std ``1/sqrt(ctx_dim)``)."""
    gen = torch.Generator().manual_seed(int(seed))
    return {name: (torch.randn(o, c, generator=gen) / math.sqrt(c)).to(dtype)
            for name, (o, c) in cross_attention_shapes(arch).items()}

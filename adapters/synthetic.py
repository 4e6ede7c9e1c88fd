"""Random erasers of the right shapes, for tests and speed benchmarks (never for users' images)."""

from __future__ import annotations

import torch

from .eraser import Eraser
from .lowrank import ModuleDelta
from .naming import UNetLayout


def random_eraser(layout: UNetLayout, concepts=("concept",), rank: int = 1, which: str = "spm", seed: int = 0,
                  scale: float = 0.05, name: str = "random", method: str = "spm", full: bool = False) -> Eraser:
    """An eraser with random factors on every module of ``which`` (SPM's 192 modules on SD1.x)."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for spec in layout.modules(which):
        extra = (1, 1) if spec.is_conv else ()
        if full:
            modules[spec.name] = ModuleDelta(diff=torch.randn(spec.out_features, spec.in_features, *extra, generator=g) * scale / spec.in_features ** 0.5)
            continue
        down = torch.randn(rank, spec.in_features, *extra, generator=g) * scale
        up = torch.randn(spec.out_features, rank, *extra, generator=g) * scale
        modules[spec.name] = ModuleDelta(up=up, down=down, alpha=float(rank))
    return Eraser(name=name, kind="weight", concepts=list(concepts), method=method, modules=modules,
                  base_family=layout.family if layout.family != "custom" else None)

"""Weight-space deltas of single modules: low-rank (``up @ down``) or full (``diff``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ModuleDelta:
    """The change an eraser makes to one Linear/Conv2d weight.

    Low-rank form (kohya LoRA convention): ``delta = (alpha / rank) * up @ down`` with
    ``up`` of shape (out, r[, 1, 1]) and ``down`` of shape (r, in[, kh, kw]).
    Full form: ``delta = diff`` in the weight's own shape.
    """

    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    alpha: float | None = None
    diff: torch.Tensor | None = None

    def __post_init__(self):
        if self.diff is None and (self.up is None or self.down is None):
            raise ValueError("a ModuleDelta needs up and down, or diff")

    @property
    def is_low_rank(self) -> bool:
        return self.diff is None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0]) if self.is_low_rank else min(self.diff.shape[:2])

    @property
    def scale(self) -> float:
        """kohya's alpha / rank (1.0 without alpha)."""
        if not self.is_low_rank or self.alpha is None:
            return 1.0
        return float(self.alpha) / self.rank

    @property
    def is_conv(self) -> bool:
        t = self.down if self.is_low_rank else self.diff
        return t.dim() == 4

    @property
    def in_features(self) -> int:
        return int((self.down if self.is_low_rank else self.diff).shape[1])

    @property
    def out_features(self) -> int:
        return int((self.up if self.is_low_rank else self.diff).shape[0])

    def full(self, dtype=torch.float32) -> torch.Tensor:
        """The dense delta in the weight's shape (scale included), in ``dtype``.

        The product is formed in float32 (or float64 if asked) and rounded to ``dtype`` once: a
        half-precision ``up @ down`` would round the product and again the scaled result."""
        if not self.is_low_rank:
            return self.diff.to(dtype)
        work = torch.float64 if dtype == torch.float64 else torch.float32
        up = self.up.to(work).flatten(1)
        down = self.down.to(work)
        dense = (up @ down.flatten(1)) * self.scale
        return dense.reshape(up.shape[0], *down.shape[1:]).to(dtype)

    def weight_shape(self) -> tuple[int, ...]:
        if not self.is_low_rank:
            return tuple(self.diff.shape)
        return (int(self.up.shape[0]), *self.down.shape[1:])

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.up, self.down, self.diff) if t is not None]

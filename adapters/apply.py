"""Applying weight erasers without touching the user's weights.

Two equivalent paths:

* :func:`dense_deltas` gives the dense ``delta`` per module for one set of coefficients; hosts turn
  it into their own weight patches (ComfyUI ``add_patches``) when one gate serves the whole batch.
* :class:`RowGatedDeltas` registers forward hooks that add ``sum_i c[row, i] * U_i(D_i(x))`` to each
  target module's output, so every batch row (cond, uncond, different prompts) carries its own
  coefficients. No weight is copied or written.

Both honour the stack's combine mode (see :mod:`.stack`).
"""

from __future__ import annotations

import threading
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .lowrank import ModuleDelta
from .stack import EraserStack


def dense_deltas(stack: EraserStack, coeffs: torch.Tensor, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """{module: dense delta} for one row of coefficients ``coeffs`` [E] (strength x gate)."""
    coeffs = coeffs.flatten().float()
    out: dict[str, torch.Tensor] = {}
    entries = stack.weight_entries
    if stack.combine == "official":
        stack.check_official_combinable()
        for name in stack.modules():
            up = down = None
            scale = None
            for i, e in entries:
                d = e.eraser.modules.get(name)
                if d is None:
                    continue
                scale = d.scale if scale is None else scale  # the reference takes the first file's scale
                c = float(coeffs[i])
                up = d.up.float() * c if up is None else up + d.up.float() * c
                down = d.down.float() * c if down is None else down + d.down.float() * c
            out[name] = ModuleDelta(up=up, down=down, alpha=scale * up.shape[1]).full(dtype)
        return out
    for i, e in entries:
        c = float(coeffs[i])
        if c == 0.0:
            continue
        for name, d in e.eraser.modules.items():
            delta = d.full(dtype) * c
            out[name] = out[name] + delta if name in out else delta
    return out


class _ModuleTerms:
    """The erasers' factors on one module, concatenated along the rank axis."""

    def __init__(self, name: str, terms: list[tuple[int, ModuleDelta]], n_entries: int, official: bool):
        self.name = name
        self.official = official
        low = [(i, d) for i, d in terms if d.is_low_rank]
        self.full = [(i, d.full()) for i, d in terms if not d.is_low_rank]
        self.conv = any(d.is_conv for _, d in terms)
        if low:
            self.down = torch.cat([d.down.float() for _, d in low], 0)  # [R, in(, kh, kw)]
            self.up = torch.cat([d.up.float().flatten(1) for _, d in low], 1)  # [out, R]
            # which stack entry each rank column belongs to, and its kohya scale
            self.entry_of_rank = torch.cat([torch.full((d.rank,), i, dtype=torch.long) for i, d in low])
            self.scale_of_rank = torch.cat([torch.full((d.rank,), d.scale) for _, d in low])
            self.rank = low[0][1].rank
            self.official_scale = low[0][1].scale
        else:
            self.down = None
        self._cache: dict = {}

    def _on(self, ref: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        key = (id(t), ref.device, ref.dtype)
        hit = self._cache.get(key)
        if hit is None:
            hit = t.to(device=ref.device, dtype=ref.dtype)
            self._cache = {k: v for k, v in self._cache.items() if k[0] != id(t)}  # one copy per tensor
            self._cache[key] = hit
        return hit

    def delta_output(self, module: nn.Module, x: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor | None:
        """The eraser contribution for input ``x`` with per-row coefficients ``coeffs`` [B, E]."""
        y = None
        if self.down is not None:
            w = coeffs[:, self.entry_of_rank.to(coeffs.device)]  # [B, R]
            if not self.official:
                w = w * self.scale_of_rank.to(w)
            down = self._on(x, self.down)
            up = self._on(x, self.up)
            if self.conv:
                z = F.conv2d(x, down, None, module.stride, module.padding, module.dilation)  # [B, R, H, W]
            else:
                z = F.linear(x, down)  # [B, ..., R]
            if self.official:
                # s = sum_j c_j D_j x ; y = sum_i c_i U_i s  (rank axis grouped per entry)
                zc = _scale_rank_axis(z, w, self.conv)
                groups = zc.shape[1 if self.conv else -1] // self.rank
                if self.conv:
                    s = zc.unflatten(1, (groups, self.rank)).sum(1)  # [B, r, H, W]
                    s = s.repeat(1, groups, 1, 1)
                else:
                    s = zc.unflatten(-1, (groups, self.rank)).sum(-2)
                    s = s.repeat(*([1] * (s.dim() - 1)), groups)
                z = _scale_rank_axis(s, w * self.official_scale, self.conv)
            else:
                z = _scale_rank_axis(z, w, self.conv)
            y = torch.einsum("brhw,or->bohw", z, up) if self.conv else F.linear(z, up)
        for i, diff in self.full:
            c = coeffs[:, i]
            if not bool((c != 0).any()):
                continue
            diff = self._on(x, diff)
            if self.conv:
                part = F.conv2d(x, diff, None, module.stride, module.padding, module.dilation)
            else:
                part = F.linear(x, diff)
            part = part * c.to(part).view(-1, *([1] * (part.dim() - 1)))
            y = part if y is None else y + part
        return y


def _scale_rank_axis(z: torch.Tensor, w: torch.Tensor, conv: bool) -> torch.Tensor:
    w = w.to(z)
    if conv:
        return z * w[:, :, None, None]
    return z * w.view(w.shape[0], *([1] * (z.dim() - 2)), w.shape[1])


class RowGatedDeltas:
    """Forward hooks adding per-row gated eraser deltas to a UNet's modules.

    ``resolve(name)`` returns the host module for a canonical (diffusers) module name. Set the
    coefficients for the next UNet calls with :meth:`set_coefficients` (``[rows, E]``; ``rows`` must
    divide the batch, rows are repeated contiguously, as CFG pipelines lay out their batches), or
    use :meth:`coefficients` as a context manager. With no coefficients set, hooks do nothing.
    """

    def __init__(self, stack: EraserStack, resolve: Callable[[str], nn.Module]):
        self.stack = stack
        official = stack.combine == "official"
        if official:
            stack.check_official_combinable()
        per_module: dict[str, list] = {}
        for i, e in stack.weight_entries:
            for name, d in e.eraser.modules.items():
                per_module.setdefault(name, []).append((i, d))
        self.terms = {n: _ModuleTerms(n, t, len(stack.entries), official) for n, t in per_module.items()}
        self.resolve = resolve
        self._handles: list = []
        self._local = threading.local()
        self.default: torch.Tensor | None = None

    # coefficient state (thread-local so parallel samplers do not see each other's gates)
    def set_coefficients(self, coeffs: torch.Tensor | None):
        if coeffs is not None:
            coeffs = torch.as_tensor(coeffs, dtype=torch.float32)
            if coeffs.dim() == 1:
                coeffs = coeffs[None]
            if coeffs.shape[1] != len(self.stack.entries):
                raise ValueError(f"coefficients have {coeffs.shape[1]} columns, the stack {len(self.stack.entries)} entries")
        self._local.coeffs = coeffs

    def current(self) -> torch.Tensor | None:
        return getattr(self._local, "coeffs", self.default)

    class _Scope:
        def __init__(self, owner, coeffs):
            self.owner, self.coeffs = owner, coeffs

        def __enter__(self):
            self.prev = getattr(self.owner._local, "coeffs", None)
            self.owner.set_coefficients(self.coeffs)
            return self.owner

        def __exit__(self, *exc):
            self.owner._local.coeffs = self.prev

    def coefficients(self, coeffs):
        return self._Scope(self, coeffs)

    # hooks
    def attach(self) -> "RowGatedDeltas":
        if self._handles:
            return self
        for name, terms in self.terms.items():
            module = self.resolve(name)
            self._handles.append(module.register_forward_hook(self._make_hook(terms)))
        return self

    def detach(self):
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self.attach()

    def __exit__(self, *exc):
        self.detach()

    def _make_hook(self, terms: _ModuleTerms):
        def hook(module, args, output):
            coeffs = self.current()
            if coeffs is None or not bool((coeffs != 0).any()):
                return None
            x = args[0]
            b = x.shape[0]
            if b % coeffs.shape[0]:
                raise RuntimeError(f"{coeffs.shape[0]} coefficient rows do not divide a batch of {b}")
            rows = coeffs.to(x.device).repeat_interleave(b // coeffs.shape[0], 0)
            delta = terms.delta_output(module, x, rows)
            return output if delta is None else output + delta.to(output.dtype)

        return hook


def merged_copy_state(weights: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``W + delta`` per module, on copies (the reference the equivalence tests compare against)."""
    return {n: weights[n] + deltas[n].to(weights[n]) for n in deltas}

"""Applying weight erasers without touching the user's weights.

Two equivalent paths:

* :func:`dense_deltas` gives the dense ``delta`` per module for one set of coefficients; hosts turn
  it into their own weight patches (ComfyUI ``add_patches``) when one gate serves the whole batch.
* :class:`RowGatedDeltas` registers forward hooks that add ``sum_i c[row, i] * U_i(D_i(x))`` to each
  target module's output, so every batch row (cond, uncond, different prompts) carries its own
  coefficients. No weight is copied or written.

Both honour the stack's combine mode (see :mod:`.stack`).

Precision: the per-row hooks compute the delta in the dtype of the module's input, i.e. the weight's
dtype on fp16 / bf16 models (float32 where the host computes in float32: ComfyUI's manual cast,
inputs that autocast left in float32). The factors are kept in float32 and cast once per dtype and
device. An upcast variant (delta and sum in float32, one rounding) was measured on the tiny test
UNets and gave no accuracy gain (max error vs float32 ~2e-3 fp16 / ~1.6e-2 bf16 either way): the
half-precision model's own rounding dominates, and the hook path agrees with a model whose
``W + delta`` was rounded to the half dtype once (tests/test_half_precision.py). :func:`dense_deltas`
(weights merged by a host) sums in float32 and rounds once.
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
    """{module: dense delta} for one row of coefficients ``coeffs`` [E] (strength x gate), in ``dtype``.

    Summed in float32 and rounded to ``dtype`` once at the end (a half-precision ``dtype`` would
    otherwise round every entry's delta and every partial sum)."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
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
            delta = d.full(work) * c
            out[name] = out[name] + delta if name in out else delta
    return {name: delta.to(dtype) for name, delta in out.items()}


class _ModuleTerms:
    """The erasers' factors on one module, concatenated along the rank axis (built once)."""

    def __init__(self, name: str, terms: list[tuple[int, ModuleDelta]], official: bool):
        self.name = name
        self.official = official
        low = [(i, d) for i, d in terms if d.is_low_rank]
        self.full = [(i, d.full()) for i, d in terms if not d.is_low_rank]
        self.conv = any(d.is_conv for _, d in terms)
        self.down = None
        if low:
            self.down = torch.cat([d.down.float() for _, d in low], 0)  # [R, in(, kh, kw)]
            up = torch.cat([d.up.float().flatten(1) for _, d in low], 1)  # [out, R]
            self.up = up[:, :, None, None] if self.conv else up
            # which stack entry each rank column belongs to, and its kohya scale
            self.entry_of_rank = torch.cat([torch.full((d.rank,), i, dtype=torch.long) for i, d in low])
            self.scale_of_rank = torch.cat([torch.full((d.rank,), d.scale) for _, d in low])
            self.rank = low[0][1].rank
            self.official_scale = low[0][1].scale
            self.signature = (tuple(self.entry_of_rank.tolist()), tuple(self.scale_of_rank.tolist()))
        self._device_copies: dict = {}

    def on(self, ref: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``t`` on ``ref``'s device and dtype, converted once."""
        key = (id(t), ref.device, ref.dtype)
        hit = self._device_copies.get(key)
        if hit is None:
            hit = self._device_copies[key] = t.to(device=ref.device, dtype=ref.dtype)
        return hit

    def rank_weights(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-row, per-rank-column multipliers [B, R] (strength x gate x kohya scale)."""
        w = rows[:, self.entry_of_rank.to(rows.device)]
        return w if self.official else w * self.scale_of_rank.to(w)

    def delta_output(self, module: nn.Module, x: torch.Tensor, rows: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor | None:
        """The eraser contribution for input ``x``; ``rows`` [B, E] coefficients, ``w`` their [B, R] form."""
        y = None
        if self.down is not None:
            down, up = self.on(x, self.down), self.on(x, self.up)
            w = w.to(x.dtype)
            if self.conv:
                z = F.conv2d(x, down, None, module.stride, module.padding, module.dilation)  # [B, R, H, W]
                shape = (w.shape[0], w.shape[1], 1, 1)
            else:
                z = F.linear(x, down)  # [B, ..., R]
                shape = (w.shape[0],) + (1,) * (z.dim() - 2) + (w.shape[1],)
            z = z * w.view(shape)
            if self.official:
                # s = sum_j c_j D_j x ; y = s_kohya * sum_i c_i U_i s  (rank columns grouped per entry)
                groups = w.shape[1] // self.rank
                if self.conv:
                    s = z.unflatten(1, (groups, self.rank)).sum(1).repeat(1, groups, 1, 1)
                else:
                    s = z.unflatten(-1, (groups, self.rank)).sum(-2)
                    s = s.repeat(*([1] * (s.dim() - 1)), groups)
                z = s * (w * self.official_scale).view(shape)
            y = F.conv2d(z, up) if self.conv else F.linear(z, up)
        for i, diff in self.full:
            c = rows[:, i]
            if not bool((c != 0).any()):
                continue
            diff = self.on(x, diff)
            if self.conv:
                part = F.conv2d(x, diff, None, module.stride, module.padding, module.dilation)
            else:
                part = F.linear(x, diff)
            part = part * c.to(part).view(-1, *([1] * (part.dim() - 1)))
            y = part if y is None else y + part
        return y


class _RowState:
    """Coefficients for the current UNet call, with everything that does not depend on the module
    computed once per call instead of once per hooked module."""

    def __init__(self, coeffs: torch.Tensor | None):
        self.coeffs = coeffs
        self.active = coeffs is not None and bool((coeffs != 0).any())
        self._rows: dict = {}
        self._weights: dict = {}

    def rows(self, batch: int, device) -> torch.Tensor:
        key = (batch, device)
        hit = self._rows.get(key)
        if hit is None:
            n = self.coeffs.shape[0]
            if batch % n:
                raise RuntimeError(f"{n} coefficient rows do not divide a batch of {batch}")
            hit = self._rows[key] = self.coeffs.to(device).repeat_interleave(batch // n, 0)
        return hit

    def weights(self, terms: _ModuleTerms, rows: torch.Tensor, dtype=torch.float32) -> torch.Tensor | None:
        """[B, R] multipliers, formed in float32 and cast to the modules' compute ``dtype`` once per call
        (not once per hooked module)."""
        if terms.down is None:
            return None
        key = (terms.signature, rows.shape[0], rows.device, dtype)
        hit = self._weights.get(key)
        if hit is None:
            hit = self._weights[key] = terms.rank_weights(rows).to(dtype)
        return hit


_INACTIVE = _RowState(None)


class HookSet:
    """The one hook mechanism: a set of torch hooks that are attached together, removed together (also
    on exceptions, as a context manager) and read per-thread state, so parallel samplers never see each
    other's gates. Subclasses implement :meth:`_register` (returning the hook handles)."""

    _default_state = None

    def __init__(self):
        self._handles: list = []
        self._local = threading.local()

    def _register(self):
        """Yield the hook handles one by one (so a failure half-way can remove those already added)."""
        raise NotImplementedError

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self):
        if not self._handles:
            added = []
            try:
                for handle in self._register():
                    added.append(handle)
            except BaseException:
                for handle in added:  # never leave a partial set of hooks on the user's model
                    handle.remove()
                raise
            self._handles = added
        return self

    def detach(self):
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self.attach()

    def __exit__(self, *exc):
        self.detach()

    # per-thread state read by the hooks
    @property
    def state(self):
        return getattr(self._local, "state", self._default_state)

    @state.setter
    def state(self, value):
        self._local.state = value

    def scoped(self, value):
        """Context manager: ``state = value`` for the block, the previous state restored after it."""
        return Scoped(self, "state", value)


class Scoped:
    """Context manager setting ``owner.<attr> = value`` for a block and restoring the previous value."""

    def __init__(self, owner, attr: str, value):
        self.owner, self.attr, self.value = owner, attr, value

    def __enter__(self):
        self.prev = getattr(self.owner, self.attr)
        self._set(self.value)
        return self.owner

    def _set(self, value):
        setattr(self.owner, self.attr, value)

    def __exit__(self, *exc):
        setattr(self.owner, self.attr, self.prev)


class _CoefficientScope(Scoped):
    def _set(self, value):
        self.owner.set_coefficients(value)  # validated


class RowGatedDeltas(HookSet):
    """Forward hooks adding per-row gated eraser deltas to a UNet's modules.

    ``resolve(name)`` returns the host module for a canonical (diffusers) module name. Set the
    coefficients for the next UNet calls with :meth:`set_coefficients` (``[rows, E]``; ``rows`` must
    divide the batch, rows are repeated contiguously, as CFG pipelines lay out their batches), or
    use :meth:`coefficients` as a context manager. With no coefficients set, hooks do nothing.
    """

    _default_state = _INACTIVE

    def __init__(self, stack: EraserStack, resolve: Callable[[str], nn.Module]):
        super().__init__()
        self.stack = stack
        official = stack.combine == "official"
        if official:
            stack.check_official_combinable()
        per_module: dict[str, list] = {}
        for i, e in stack.weight_entries:
            for name, d in e.eraser.modules.items():
                per_module.setdefault(name, []).append((i, d))
        self.terms = {n: _ModuleTerms(n, t, official) for n, t in per_module.items()}
        self.resolve = resolve

    def set_coefficients(self, coeffs: torch.Tensor | None):
        if coeffs is not None:
            coeffs = torch.as_tensor(coeffs, dtype=torch.float32)
            if coeffs.dim() == 1:
                coeffs = coeffs[None]
            if coeffs.shape[1] != len(self.stack.entries):
                raise ValueError(f"coefficients have {coeffs.shape[1]} columns, the stack {len(self.stack.entries)} entries")
        self.state = _RowState(coeffs)

    def current(self) -> torch.Tensor | None:
        return self.state.coeffs

    def coefficients(self, coeffs):
        """Context manager: these coefficients for the UNet calls inside the block."""
        return _CoefficientScope(self, "state", coeffs)

    def _register(self):
        for name, terms in self.terms.items():
            yield self.resolve(name).register_forward_hook(self._make_hook(terms))

    def _make_hook(self, terms: _ModuleTerms):
        local = self._local

        def hook(module, args, output):
            state = getattr(local, "state", _INACTIVE)
            if not state.active:
                return None
            x = args[0]
            rows = state.rows(x.shape[0], x.device)
            w = state.weights(terms, rows, x.dtype)  # the delta is computed in x's dtype (see the module doc)
            if (not terms.conv and not terms.full and not terms.official and not torch.is_grad_enabled()
                    and output.is_contiguous() and output.dtype == x.dtype):
                # inference fast path: one small GEMM added into the module's own output, no delta tensor
                z = F.linear(x, terms.on(x, terms.down))
                z = z * w.view((w.shape[0],) + (1,) * (z.dim() - 2) + (w.shape[1],))
                output.view(-1, output.shape[-1]).addmm_(z.reshape(-1, z.shape[-1]), terms.on(x, terms.up).t())
                return output
            delta = terms.delta_output(module, x, rows, w)
            return output if delta is None else output + delta.to(output.dtype)

        return hook


def combined_deltas(stack: EraserStack, coeffs: torch.Tensor) -> dict[str, ModuleDelta]:
    """The whole stack at coefficients ``coeffs`` as ONE delta per module.

    additive: ``[c_1 s_1 U_1 | c_2 s_2 U_2 | ...] @ [D_1; D_2; ...]`` (rank = sum of ranks), so ComfyUI
    runs one LoRA product per weight however many erasers are stacked; official: ``s (sum c_i U_i)(sum c_i D_i)``.
    Modules that carry a full ``diff`` get the dense sum.
    """
    coeffs = coeffs.flatten().float()
    out: dict[str, ModuleDelta] = {}
    official = stack.combine == "official"
    if official:
        stack.check_official_combinable()
    for name in stack.modules():
        parts = [(float(coeffs[i]), e.eraser.modules[name]) for i, e in stack.weight_entries
                 if name in e.eraser.modules and float(coeffs[i]) != 0.0]
        if not parts:
            continue
        if any(not d.is_low_rank for _, d in parts):
            out[name] = ModuleDelta(diff=sum(c * d.full() for c, d in parts))
        elif official:
            up = sum(c * d.up.float() for c, d in parts)
            down = sum(c * d.down.float() for c, d in parts)
            out[name] = ModuleDelta(up=up, down=down, alpha=parts[0][1].scale * up.shape[1])
        else:
            up = torch.cat([c * d.scale * d.up.float() for c, d in parts], 1)
            down = torch.cat([d.down.float() for _, d in parts], 0)
            out[name] = ModuleDelta(up=up, down=down, alpha=float(up.shape[1]))  # scale 1
    return out

"""SPM membranes (Lyu et al., CVPR 2024): the rank-1 adapters on every transformer Linear/Conv2d, their
forward hooks, and the Latent Anchoring loss terms. The trainer that uses them is :mod:`.trainer`."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..eraser import Eraser
from ..lowrank import ModuleDelta
from ..hooks import Scoped
from ..naming import layout_from_diffusers_config

# ----------------------------------------------------------------------------- the membranes
# how a trainer applies its factors to the frozen UNet (Membranes.bind): peft's LoRA layers on a
# weight-sharing view of the UNet, or this module's forward hooks; the same function either way
LORA_BACKENDS = ("peft", "hooks")

def fill_template(template: str, text: str) -> str:
    """``template`` with ``{}`` replaced by ``text``, whitespace collapsed (an empty surrogate leaves no gap)."""
    return " ".join(template.replace("{}", text).split()).replace(" ,", ",")


def _key(name: str) -> str:
    return name.replace(".", "__")


class Membranes(nn.Module):
    """Trainable rank-r factors on named Linear/Conv2d modules of a UNet, applied by forward hooks.

    ``multiplier`` 0 is the original model (hooks return the output untouched); use
    ``with membranes.on():`` (multiplier 1, as the reference's ``with network:``).
    """

    def __init__(self, unet: nn.Module, names: Sequence[str], rank: int = 1, alpha: float = 1.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.names = list(names)
        self.rank = int(rank)
        self.alpha = float(alpha) if alpha else float(rank)
        self.down = nn.ParameterDict()
        self.up = nn.ParameterDict()
        self._conv: dict[str, bool] = {}
        for name in self.names:
            mod = unet.get_submodule(name)
            if isinstance(mod, nn.Conv2d):
                r = min(self.rank, mod.in_channels, mod.out_channels)
                down = torch.empty(r, mod.in_channels, *mod.kernel_size)
                up = torch.zeros(mod.out_channels, r, 1, 1)
                self._conv[name] = True
            elif isinstance(mod, nn.Linear):
                r = self.rank
                down = torch.empty(r, mod.in_features)
                up = torch.zeros(mod.out_features, r)
                self._conv[name] = False
            else:
                raise TypeError(f"{name} is a {type(mod).__name__}, not a Linear or Conv2d")
            _kaiming_uniform(down, math.sqrt(5), generator)
            self.down[_key(name)] = nn.Parameter(down)
            self.up[_key(name)] = nn.Parameter(up)
        self._peft_layers: list = []
        self.multiplier = 0.0
        self._handles: list = []

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def multiplier(self) -> float:
        return self._multiplier

    @multiplier.setter
    def multiplier(self, value: float):
        self._multiplier = float(value)
        for layer in self._peft_layers:  # the peft backend: its layers carry the scale
            layer.scaling["default"] = self._multiplier * self.scale
            layer._disable_adapters = self._multiplier == 0.0  # the frozen model's calls skip the factors

    # ---------------------------------------------------------------- applying them
    def bind(self, unet: nn.Module, backend: str = "hooks") -> nn.Module:
        """The module to call for the UNet with the membranes: ``"hooks"`` attaches forward hooks to
        ``unet`` and returns it; ``"peft"`` returns a view of ``unet`` with peft's LoRA layers in place of
        the target modules, sharing ``unet``'s weights and these factors (:mod:`..peft_view`); ``unet``
        itself is left as it was. Both compute the same function."""
        if backend == "hooks":
            self.attach(unet)
            return unet
        if backend != "peft":
            raise ValueError(f"unknown LoRA backend {backend!r} (hooks, peft)")
        from ..peft_view import inject_lora, shared_view

        view = shared_view(unet, self.names)
        self._peft_layers = inject_lora(view, {n: self.down[_key(n)] for n in self.names},
                                        {n: self.up[_key(n)] for n in self.names}, self.rank, self.alpha)
        self.multiplier = self._multiplier
        return view

    # ---------------------------------------------------------------- hooks
    def attach(self, unet: nn.Module) -> "Membranes":
        if self._handles:
            return self
        for name in self.names:
            self._handles.append(unet.get_submodule(name).register_forward_hook(self._hook(name)))
        return self

    def detach(self):
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, name: str):
        key, conv = _key(name), self._conv[name]

        def hook(module, args, output):
            if self.multiplier == 0.0:
                return None
            x = args[0]
            down, up = self.down[key], self.up[key]
            # computed in the input's dtype (the UNet's fp16 / bf16 when it runs in half precision); the
            # factors stay float32 parameters, autograd casts their gradients back. Rank-1 products add no
            # error beyond the half-precision model's own (tests/test_half_precision.py).
            if conv:
                z = F.conv2d(x, down.to(x.dtype), None, module.stride, module.padding, module.dilation)
                y = F.conv2d(z, up.to(x.dtype))
            else:
                y = F.linear(F.linear(x, down.to(x.dtype)), up.to(x.dtype))
            return output + (self.multiplier * self.scale) * y.to(output.dtype)

        return hook

    def on(self, multiplier: float = 1.0):
        """Context manager: the membranes act at ``multiplier`` inside the block."""
        return Scoped(self, "multiplier", float(multiplier))

    # ---------------------------------------------------------------- export
    def module_deltas(self) -> dict[str, ModuleDelta]:
        out = {}
        for name in self.names:
            down = self.down[_key(name)].detach().float().cpu().clone()
            up = self.up[_key(name)].detach().float().cpu().clone()
            out[name] = ModuleDelta(up=up, down=down, alpha=self.alpha)
        return out

    def to_eraser(self, concept: str, name: str | None = None, settings: dict | None = None,
                  base_family: str | None = None, base_fingerprint: str | None = None,
                  text_fingerprint: str | None = None) -> Eraser:
        return Eraser(name=name or concept, kind="weight", concepts=[concept], method="spm",
                      modules=self.module_deltas(), settings=dict(settings or {}),
                      base_family=base_family if base_family not in (None, "custom") else None,
                      base_fingerprint=base_fingerprint, text_fingerprint=text_fingerprint)


def _kaiming_uniform(t: torch.Tensor, a: float, generator: torch.Generator | None):
    """``nn.init.kaiming_uniform_(t, a)`` (fan_in, leaky_relu gain) drawn from ``generator``."""
    fan_in = t[0].numel()
    gain = math.sqrt(2.0 / (1 + a * a))
    bound = gain * math.sqrt(3.0 / fan_in)
    with torch.no_grad():
        t.copy_(torch.rand(t.shape, generator=generator) * 2 * bound - bound)


def spm_module_names(unet) -> list[str]:
    """SPM's target set on a diffusers UNet: every Linear/Conv2d of every transformer."""
    return [m.name for m in layout_from_diffusers_config(unet.config).modules("spm")]


# ----------------------------------------------------------------------------- anchors and losses
def sample_anchors(target: torch.Tensor, n: int, generator: torch.Generator | None = None,
                   low: float = 0.8, high: float = 1.2) -> torch.Tensor:
    """``n`` random anchors shaped like ``target`` [1, L, D] (or [L, D]): isotropic directions, accepted
    with probability ``1 - cos(vec(target), z)``, scaled to ``u * ||target||_F``, ``u ~ U[low, high]``.
    Returns [n, L, D] on the CPU (float32)."""
    tgt = target.detach().float().cpu().reshape(-1, *target.shape[-2:])[0]
    norm = tgt.norm()
    flat = tgt.flatten() / norm.clamp_min(1e-12)
    out = []
    while len(out) < n:
        z = torch.randn(tgt.shape, generator=generator)
        z = z / z.norm()
        accept = 1.0 - float(flat @ z.flatten())
        if float(torch.rand((), generator=generator)) < accept:
            u = low + (high - low) * float(torch.rand((), generator=generator))
            out.append(u * norm * z)
    return torch.stack(out)


def anchor_batch(anchors: torch.Tensor, uncond: torch.Tensor, mode: str) -> tuple[torch.Tensor, Callable]:
    """Text embeddings of the anchor UNet call and how to pick the rows that enter L_LA.

    ``fixed``: the anchors themselves, every output row used. ``official_quirk``: the reference's
    ``[u, a1, u, a2, ...]`` batch against duplicated latents; the second half of the output is used."""
    if mode == "fixed":
        return anchors, (lambda out: out)
    if mode == "official_quirk":
        u = uncond.reshape(1, *anchors.shape[1:]).to(anchors)
        rows = torch.cat([torch.cat([u, a[None]]) for a in anchors])  # [u, a1, u, a2, ...]
        return rows, (lambda out: out.chunk(2)[1])
    raise ValueError(f"unknown anchor mode {mode!r}")


def latent_anchor_loss(predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], membranes: Membranes,
                       x_t: torch.Tensor, anchors: torch.Tensor, uncond: torch.Tensor, mode: str) -> torch.Tensor:
    """``MSE(eps_SPM(x_t, a), eps_orig(x_t, a))`` over the rows ``mode`` selects (see :func:`anchor_batch`).

    ``predict(latents, context)`` -> eps for a batch; ``x_t`` is one latent [1, C, H, W]."""
    ctx, pick = anchor_batch(anchors, uncond, mode)
    lat = x_t.expand(ctx.shape[0], *x_t.shape[1:])
    with torch.no_grad(), membranes.on(0.0):
        ref = pick(predict(lat, ctx.detach()))
    with membranes.on(1.0):
        pred = pick(predict(lat, ctx))
    return F.mse_loss(pred, ref)

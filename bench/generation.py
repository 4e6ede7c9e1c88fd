"""Generation for the benchmarks: a mixed eraser stack on a diffusers pipeline, weight erasers through
:class:`~conceptgate.adapters.diffusers_host.GatedPipeline`, conditioning and guidance erasers through the
handlers their mechanisms registered in the core (:mod:`conceptgate.adapters.registry`)."""

from __future__ import annotations

from typing import Sequence

import torch

from ..adapters.errors import UnsupportedEraser  # noqa: F401  (re-exported for the bench)
from ..adapters.registry import conditioning_handler, guidance_handler


def _latents(pipe, seeds):
    unet = pipe.unet
    shape = (4, unet.config.sample_size, unet.config.sample_size)
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    return torch.stack([torch.randn(shape, generator=g) for g in gens]).to(pipe.device, unet.dtype)


def _raw_gates(stack, encoder, prompts: Sequence[str], banks=None) -> torch.Tensor:
    """[P, E] gate values (before strength / enable), each entry with its own gate settings."""
    from ..adapters.gate import BankCache, entry_gates

    banks = banks or BankCache(encoder)
    enc = encoder(list(prompts))
    out = torch.zeros(len(prompts), len(stack.entries))
    for i, e in enumerate(stack.entries):
        out[:, i] = entry_gates(enc, e.eraser, e.gate, banks).values
    return out


def _step_callback(progress):
    def on_step_end(pipe, i, t, tensors):  # diffusers' callback_on_step_end: must hand the tensors back
        progress(1)
        return tensors
    return on_step_end


def generate_with_stack(pipe, prompts: Sequence[str], seeds: Sequence[int], stack=None, steps: int = 25,
                        cfg: float = 5.0, batch: int = 48, negative_prompt=None, log=None, progress=None):
    """Images (n,3,64,64 in [0,1]) and raw gates [n, E] (None without a stack).

    Same sampler and seeding as :func:`conceptgate.toyworld.generate` (one CPU generator per seed,
    batch independent). Every kind of eraser acts through the one wrapper users get,
    :class:`~conceptgate.adapters.diffusers_host.GatedPipeline` (weight hooks per row, conditioning and
    guidance through the handlers their mechanisms registered); an unregistered kind raises
    :class:`UnsupportedEraser` before any image is made. ``progress(1)`` (e.g. a progress bar's
    ``update``) is called after every denoising step of every batch: ``steps x ceil(len(prompts) / batch)``
    calls in all; without one the call shows its own bar (``progress=False``: none)."""
    from ..adapters.diffusers_host import GatedPipeline
    from ..adapters.stack import EraserStack

    prompts, seeds = list(prompts), list(seeds)
    assert len(prompts) == len(seeds)
    own_bar = None
    if progress is None:
        from ..adapters.progress import bar

        own_bar = bar(steps * -(-len(prompts) // batch), "sampling", unit="step", leave=False)
        progress = own_bar.update
    elif progress is False:
        progress = None
    entries = [e for e in (stack.entries if stack is not None else ()) if e.enabled]
    for e in entries:  # raises UnsupportedEraser before any image is made
        if e.eraser.kind == "conditioning":
            conditioning_handler(e.eraser)
        elif e.eraser.kind == "guidance":
            guidance_handler(e.eraser)
    gated = GatedPipeline(pipe, EraserStack(tuple(entries), stack.combine)) if entries else None
    all_gates = torch.zeros(len(prompts), len(stack.entries)) if stack is not None else None
    images = []
    if gated is not None:
        gated.__enter__()
    try:
        for i in range(0, len(prompts), batch):
            ps, ss = prompts[i: i + batch], seeds[i: i + batch]
            neg = negative_prompt if not isinstance(negative_prompt, list) else negative_prompt[i: i + batch]
            if isinstance(neg, str):
                neg = [neg] * len(ps)
            if gated is not None:
                all_gates[i: i + batch] = _raw_gates(stack, gated.encoder, ps, gated.banks)
            kw = dict(negative_prompt=neg, num_inference_steps=steps, guidance_scale=cfg,
                      latents=_latents(pipe, ss), output_type="pt", height=64, width=64)
            if progress is not None:
                kw["callback_on_step_end"] = _step_callback(progress)
            out = gated(ps, **kw) if gated is not None else pipe(prompt=ps, **kw)
            images.append(out.images.float().cpu().clamp(0, 1))
            if log:
                log(f"  generated {min(i + batch, len(prompts))}/{len(prompts)}")
    finally:
        if gated is not None:
            gated.__exit__()
        if own_bar is not None:
            own_bar.close()
    return torch.cat(images), all_gates

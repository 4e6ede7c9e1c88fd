"""Generation for the benchmarks: a mixed eraser stack on a diffusers pipeline, weight erasers through
:class:`~conceptgate.adapters.diffusers_host.GatedPipeline`, conditioning and guidance erasers through the
handlers their mechanisms registered in the core (:mod:`conceptgate.adapters.registry`)."""

from __future__ import annotations

from typing import Sequence

import torch

from ..adapters.errors import UnsupportedEraser
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
    batch independent). Weight erasers act through ``GatedPipeline`` (per-row gates); conditioning
    and guidance erasers through the registered handlers; an unregistered kind raises
    :class:`UnsupportedEraser`. ``progress(1)`` (e.g. a progress bar's ``update``) is called after every
    denoising step of every batch: ``steps x ceil(len(prompts) / batch)`` calls in all; without one the call
    shows its own bar (``progress=False``: none)."""
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
    cond = [e for e in entries if e.eraser.kind == "conditioning"]
    guide = [e for e in entries if e.eraser.kind == "guidance"]
    for e in cond:
        conditioning_handler(e.eraser)  # raises UnsupportedEraser before any image is made
    for e in guide:
        guidance_handler(e.eraser)
    if len({e.eraser.method for e in guide}) > 1:
        raise UnsupportedEraser("more than one guidance method in one stack")
    wstack = EraserStack(tuple(e for e in entries if e.eraser.kind == "weight"), stack.combine) if entries else None
    gated = GatedPipeline(pipe, wstack) if wstack is not None and len(wstack) else None
    encoder = None
    if entries:
        from ..adapters.diffusers_host import DiffusersTextEncoder
        from ..adapters.gate import BankCache

        encoder = gated.encoder if gated is not None else DiffusersTextEncoder(pipe.tokenizer, pipe.text_encoder)
        banks = gated.banks if gated is not None else BankCache(encoder)
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
            g = None
            if entries:
                g = _raw_gates(stack, encoder, ps, banks)
                all_gates[i: i + batch] = g
            extra = {}
            for e in cond:
                idx = [j for j, x in enumerate(stack.entries) if x is e]
                extra.update(conditioning_handler(e.eraser)(pipe, [e], ps, g[:, idx] * e.strength))

            def sample(_ps=ps, _ss=ss, _neg=neg, **more):
                kw = dict(prompt=_ps, negative_prompt=_neg, num_inference_steps=steps, guidance_scale=cfg,
                          latents=_latents(pipe, _ss), output_type="pt", height=64, width=64)
                if "negative_prompt_embeds" in extra or "negative_prompt_embeds" in more:
                    kw.pop("negative_prompt")
                kw.update(extra)
                kw.update(more)
                if progress is not None:
                    kw["callback_on_step_end"] = _step_callback(progress)
                call = gated if gated is not None else pipe
                return call(**kw).images.float().cpu().clamp(0, 1)

            if guide:
                idx = [j for j, x in enumerate(stack.entries) if x in guide]
                out = guidance_handler(guide[0].eraser)(pipe, guide, ps, ss, g[:, idx], steps, cfg, sample)
            else:
                out = sample()
            images.append(out)
            if log:
                log(f"  generated {min(i + batch, len(prompts))}/{len(prompts)}")
    finally:
        if gated is not None:
            gated.__exit__()
        if own_bar is not None:
            own_bar.close()
    return torch.cat(images), all_gates

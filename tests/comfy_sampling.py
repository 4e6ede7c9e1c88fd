"""Shared helpers for tests that sample through ComfyUI's own sampler."""

import copy

import torch

REL_TOL = 1e-5  # fp32; sampled latents of a random model reach |x| ~ 100, so compare relative to the range


def close(a, b):
    return float((a - b).abs().max()) <= REL_TOL * float(b.abs().max()) + 1e-5


def encode(clip, text):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def sample(model, positive, negative, seed=3, steps=3, cfg=4.0):
    import comfy.sample

    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative, latent,
                               denoise=1.0, seed=seed, disable_pbar=True)


def merged_model(unet, deltas):
    """A ComfyUI model whose weights are a diffusers ``unet``'s plus ``deltas``, merged by hand."""
    from conceptgate.nodes import comfy_models

    unet = copy.deepcopy(unet)
    with torch.no_grad():
        for name, d in deltas.items():
            unet.get_submodule(name).weight += d.to(unet.get_submodule(name).weight)
    return comfy_models.unet_to_comfy(unet)

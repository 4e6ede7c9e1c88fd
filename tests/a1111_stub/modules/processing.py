"""Stand-in for modules.processing: the ``p`` fields the glue reads and process_images_inner's order.

process -> per batch: before_process_batch -> parse_extra_network_prompts -> extra_networks.activate
-> process_batch -> setup_conds -> [Forge: forge_objects reset, process_before_every_sampling] ->
sample (CFGDenoiser steps) -> [hires: is_hr_pass, hr extra networks, hr conds, sample again] ->
postprocess_batch -> infotext per image; then extra_networks.deactivate and postprocess.
"""
import torch

from modules import extra_networks, infotext_utils, shared
from modules.sd_samplers_cfg_denoiser import CFGDenoiser


def _pad_to(t, length):
    if t.shape[1] == length:
        return t
    last = t[:, -1:].expand(t.shape[0], length - t.shape[1], *t.shape[2:])
    return torch.cat([t, last], 1)


def get_multicond(sd_model, prompts):
    """(conds_list, tensor) like prompt_parser.get_multicond_learned_conditioning + reconstruct_multicond_batch."""
    import re

    conds_list, texts = [], []
    for prompt in prompts:
        parts = []
        for sub in re.split(r"\bAND\b", prompt):
            m = re.match(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$", sub)
            parts.append((len(texts), float(m.group(2)) if m.group(2) else 1.0))
            texts.append(m.group(1))
        conds_list.append(parts)
    encoded = [sd_model.get_learned_conditioning([t]) for t in texts]
    return conds_list, _stack(encoded)


def _stack(encoded):
    if isinstance(encoded[0], dict):
        length = max(e["crossattn"].shape[1] for e in encoded)
        return {"crossattn": torch.cat([_pad_to(e["crossattn"], length) for e in encoded]),
                "vector": torch.cat([e["vector"] for e in encoded])}
    length = max(e.shape[1] for e in encoded)
    return torch.cat([_pad_to(e, length) for e in encoded])


class InnerModel:
    """The k-diffusion wrapped model: calls sd_model.model.diffusion_model(x, t, context=...)."""

    def __init__(self, sd_model):
        self.sd_model = sd_model
        self.calls = []

    def __call__(self, x, sigma, cond):
        context = cond["c_crossattn"][0] if "c_crossattn" in cond else cond["crossattn"]
        out = self.sd_model.model.diffusion_model(x, timesteps=sigma, context=context)
        self.calls.append((x.clone(), sigma.clone(), context.clone(), out.clone()))
        return out


class Processed:
    def __init__(self, p, images, infotexts):
        self.images, self.infotexts, self.comments = images, infotexts, "\n".join(p.comments)


class StableDiffusionProcessing:
    def __init__(self, prompt, negative_prompt="", batch_size=1, n_iter=1, steps=2, seed=0, cfg_scale=5.0, sd_model=None,
                 scripts=None, script_args=(), enable_hr=False, hr_prompt=None, s_min_uncond=0.0,
                 init_latent=None, denoising_strength=0.75, mask=None, hr_cfg=None):
        prompts = prompt if isinstance(prompt, list) else [prompt] * (batch_size * n_iter)
        self.prompt = prompts[0]
        self.all_prompts = prompts
        self.all_negative_prompts = [negative_prompt] * len(prompts)
        self.all_hr_prompts = (hr_prompt if isinstance(hr_prompt, list) else [hr_prompt or p for p in prompts]) if enable_hr else []
        self.batch_size, self.n_iter, self.steps, self.seed, self.cfg_scale = batch_size, n_iter, steps, seed, cfg_scale
        self.sd_model = sd_model if sd_model is not None else shared.sd_model
        self.scripts, self.script_args = scripts, list(script_args)
        self.enable_hr, self.is_hr_pass, self.s_min_uncond = enable_hr, False, s_min_uncond
        self.extra_generation_params = {}
        self.comments = {}
        self.prompts = self.negative_prompts = self.hr_prompts = None
        self.denoisers = []
        self.sampled_unets = []
        # img2img: the encoded init image [1 or B, 4, 8, 8], how much of the schedule runs, an inpainting mask
        self.init_latent, self.denoising_strength, self.mask = init_latent, denoising_strength, mask
        self.is_img2img = init_latent is not None
        self.hr_cfg = hr_cfg  # Forge: the hires pass's CFG scale; at 1 it has no negative (hr_uc None)

    def comment(self, text):
        self.comments[text] = 1

    def parse_extra_network_prompts(self):
        self.prompts, self.extra_network_data = extra_networks.parse_prompts(self.prompts)
        if self.enable_hr:
            self.hr_prompts = self.all_hr_prompts[self.batch_number * self.batch_size:(self.batch_number + 1) * self.batch_size]
            self.hr_prompts, self.hr_extra_network_data = extra_networks.parse_prompts(self.hr_prompts)

    def setup_conds(self):
        self.c = get_multicond(self.sd_model, self.prompts)
        self.uc = _stack([self.sd_model.get_learned_conditioning([n]) for n in self.negative_prompts])
        if self.enable_hr:
            self.hr_c = get_multicond(self.sd_model, self.hr_prompts)

    def _sigmas(self):
        sigmas = torch.linspace(14.0, 1.0, self.steps + 1)
        if self.is_img2img:  # img2img: the last part of the schedule, from the noised init image
            t_enc = max(1, int(self.steps * self.denoising_strength))
            sigmas = sigmas[-(t_enc + 1):]
        return sigmas

    def _start(self, x, sigmas):
        if not self.is_img2img:
            return x
        return self.init_latent.expand_as(x) + x * sigmas[0]

    def _set_mask(self, denoiser):
        if self.mask is not None:
            denoiser.mask, denoiser.nmask = self.mask, 1.0 - self.mask
            denoiser.init_latent = self.init_latent

    def _sample(self, c, uc, x):
        from a1111_stub.forge_sampling import ForgeCFGDenoiser, patched

        sigmas = self._sigmas()
        x = self._start(x, sigmas)
        if hasattr(self.sd_model, "forge_objects"):  # Forge: objects reset right before sampling
            self.sd_model.forge_objects.unet = self.sd_model.forge_objects_original_unet
            self.scripts.process_before_every_sampling(self, x=x, noise=x, c=c, uc=uc)
            unet = self.sd_model.forge_objects.unet
            self.sampled_unets.append(unet)
            denoiser = ForgeCFGDenoiser(self, unet, total_steps=len(sigmas) - 1)
            self._set_mask(denoiser)
            self.denoisers.append(denoiser)
            with patched(unet), torch.no_grad():  # Forge merges the patches when the model loads
                return self._loop(denoiser, x, sigmas, c, uc)
        denoiser = CFGDenoiser(InnerModel(self.sd_model), self, total_steps=len(sigmas) - 1)
        self._set_mask(denoiser)
        self.denoisers.append(denoiser)
        return self._loop(denoiser, x, sigmas, c, uc)

    def _loop(self, denoiser, x, sigmas, c, uc):
        scale = self.hr_cfg if self.is_hr_pass and self.hr_cfg is not None else self.cfg_scale
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            sigma = torch.full((x.shape[0],), float(s))
            denoised = denoiser.forward(x, sigma, uc, c, scale, s_min_uncond=self.s_min_uncond)
            x = x + (x - denoised) / s * (s_next - s)
        return x

    def sample(self):
        g = torch.Generator().manual_seed(self.seed + self.batch_number)
        x = torch.randn(len(self.prompts), 4, 8, 8, generator=g)
        x = self._sample(self.c, self.uc, x)
        if self.enable_hr:
            self.is_hr_pass = True
            if self.hr_extra_network_data != self.extra_network_data:
                extra_networks.activate(self, self.hr_extra_network_data)
            hr_uc = None if hasattr(self.sd_model, "forge_objects") and self.hr_cfg == 1.0 else self.uc
            x = self._sample(self.hr_c, hr_uc, x)
            self.is_hr_pass = False
        return x


def process_images(p):
    p.scripts.process(p)
    images, infotexts = [], []
    for n in range(p.n_iter):
        p.batch_number = n
        p.prompts = p.all_prompts[n * p.batch_size:(n + 1) * p.batch_size]
        p.negative_prompts = p.all_negative_prompts[n * p.batch_size:(n + 1) * p.batch_size]
        p.scripts.before_process_batch(p, batch_number=n, prompts=p.prompts)
        p.parse_extra_network_prompts()
        extra_networks.activate(p, p.extra_network_data)
        p.scripts.process_batch(p, batch_number=n, prompts=p.prompts)
        p.setup_conds()
        samples = p.sample()
        p.scripts.postprocess_batch(p, samples, batch_number=n)
        for i in range(samples.shape[0]):
            images.append(samples[i])
            infotexts.append(infotext_utils.create_infotext(p, index=n * p.batch_size + i))
    extra_networks.deactivate(p, p.extra_network_data)
    processed = Processed(p, images, infotexts)
    p.scripts.postprocess(p, processed)
    return processed

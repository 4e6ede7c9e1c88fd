"""Stand-in for modules.sd_samplers_cfg_denoiser.CFGDenoiser.forward: A1111's batch layout.

cond rows (image i repeated once per AND part) first, uncond rows last; on_cfg_denoiser before the
UNet (its x / sigma / image_cond / text_cond / text_uncond are read back); skipped uncond (s_min_uncond
on odd steps, or skip_early_cond) drops the last batch_size rows of x_in and combines with scale 1;
pad_cond_uncond pads the shorter conditioning with empty chunks; batch_cond_uncond -> one call,
otherwise chunks of batch_size; cond and uncond of different lengths -> cond chunks, then the uncond
rows in one call; on_cfg_denoised with x_out (a fake uncond appended when skipped); combine_denoised
over conds_list; mask blending (img2img inpainting) before on_cfg_after_cfg, whose x is the result.
"""
import torch

from modules import script_callbacks, shared


def catenate_conds(conds):
    if not isinstance(conds[0], dict):
        return torch.cat(conds)
    return {key: torch.cat([x[key] for x in conds]) for key in conds[0].keys()}


def subscript_cond(cond, a, b):
    if not isinstance(cond, dict):
        return cond[a:b]
    return {key: vec[a:b] for key, vec in cond.items()}


def _len(cond):
    return (cond["crossattn"] if isinstance(cond, dict) else cond).shape[1]


def _pad(cond, repeats, empty):
    if isinstance(cond, dict):
        cond = dict(cond)
        cond["crossattn"] = _pad(cond["crossattn"], repeats, empty)
        return cond
    return torch.cat([cond, empty.repeat((cond.shape[0], repeats, 1))], 1)


class CFGDenoiser:
    def __init__(self, inner_model, p=None, total_steps=1):
        self.inner_model = inner_model
        self.p = p
        self.step = 0
        self.total_steps = total_steps
        self.mask = self.nmask = self.init_latent = None
        self.mask_before_denoising = False

    def combine_denoised(self, x_out, conds_list, uncond, cond_scale):
        denoised_uncond = x_out[-uncond_rows(uncond):]
        denoised = torch.clone(denoised_uncond)
        for i, conds in enumerate(conds_list):
            for cond_index, weight in conds:
                denoised[i] += (x_out[cond_index] - denoised_uncond[i]) * (weight * cond_scale)
        return denoised

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond=0.0, image_cond=None):
        conds_list, tensor = cond  # what prompt_parser.reconstruct_multicond_batch returns (a new object every step)
        tensor = dict(tensor) if isinstance(tensor, dict) else tensor
        uncond = dict(uncond) if isinstance(uncond, dict) else uncond
        batch_size = len(conds_list)
        repeats = [len(conds_list[i]) for i in range(batch_size)]
        if image_cond is None:
            image_cond = torch.zeros(x.shape[0], 5, 1, 1)
        if isinstance(uncond, dict):
            make_condition_dict = lambda c_crossattn, c_concat: {**c_crossattn, "c_concat": [c_concat]}
        else:
            make_condition_dict = lambda c_crossattn, c_concat: {"c_crossattn": [c_crossattn], "c_concat": [c_concat]}
        x_in = torch.cat([torch.stack([x[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [x])
        sigma_in = torch.cat([torch.stack([sigma[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [sigma])
        image_cond_in = torch.cat([torch.stack([image_cond[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [image_cond])

        params = script_callbacks.CFGDenoiserParams(x_in, image_cond_in, sigma_in, self.step, self.total_steps, tensor, uncond, self)
        script_callbacks.cfg_denoiser_callback(params)
        x_in, image_cond_in, sigma_in = params.x, params.image_cond, params.sigma
        tensor, uncond = params.text_cond, params.text_uncond

        skip_uncond = False
        if shared.opts.data.get("skip_early_cond", 0) and self.step / self.total_steps <= shared.opts.skip_early_cond:
            skip_uncond = True
            x_in, sigma_in = x_in[:-batch_size], sigma_in[:-batch_size]
        if self.step % 2 and s_min_uncond > 0 and sigma[0] < s_min_uncond:
            skip_uncond = True
            x_in, sigma_in = x_in[:-batch_size], sigma_in[:-batch_size]

        if shared.opts.data.get("pad_cond_uncond", False) and _len(tensor) != _len(uncond):
            empty = shared.sd_model.get_learned_conditioning([""])
            empty = empty["crossattn"] if isinstance(empty, dict) else empty
            n = (_len(tensor) - _len(uncond)) // empty.shape[1]
            if n < 0:
                tensor = _pad(tensor, -n, empty)
            elif n > 0:
                uncond = _pad(uncond, n, empty)

        if _len(tensor) == _len(uncond) or skip_uncond:
            cond_in = tensor if skip_uncond else catenate_conds([tensor, uncond])
            if shared.opts.batch_cond_uncond:
                x_out = self.inner_model(x_in, sigma_in, cond=make_condition_dict(cond_in, image_cond_in))
            else:
                x_out = torch.zeros_like(x_in)
                for a in range(0, x_out.shape[0], batch_size):
                    b = a + batch_size
                    x_out[a:b] = self.inner_model(x_in[a:b], sigma_in[a:b], cond=make_condition_dict(subscript_cond(cond_in, a, b), image_cond_in[a:b]))
        else:
            x_out = torch.zeros_like(x_in)
            bs = batch_size * 2 if shared.opts.batch_cond_uncond else batch_size
            rows = (tensor["crossattn"] if isinstance(tensor, dict) else tensor).shape[0]
            for a in range(0, rows, bs):
                b = min(a + bs, rows)
                x_out[a:b] = self.inner_model(x_in[a:b], sigma_in[a:b], cond=make_condition_dict(subscript_cond(tensor, a, b), image_cond_in[a:b]))
            if not skip_uncond:
                n = uncond_rows(uncond)
                x_out[-n:] = self.inner_model(x_in[-n:], sigma_in[-n:], cond=make_condition_dict(uncond, image_cond_in[-n:]))

        if skip_uncond:
            denoised_image_indexes = [x[0][0] for x in conds_list]
            fake_uncond = torch.cat([x_out[i:i + 1] for i in denoised_image_indexes])
            x_out = torch.cat([x_out, fake_uncond])

        script_callbacks.cfg_denoised_callback(script_callbacks.CFGDenoisedParams(x_out, self.step, self.total_steps, self.inner_model))
        denoised = self.combine_denoised(x_out, conds_list, uncond, 1.0 if skip_uncond else cond_scale)
        if self.mask is not None:
            denoised = denoised * self.nmask + self.init_latent * self.mask
        after = script_callbacks.AfterCFGCallbackParams(denoised, self.step, self.total_steps)
        script_callbacks.cfg_after_cfg_callback(after)
        self.step += 1
        return after.x


def uncond_rows(uncond):
    return (uncond["crossattn"] if isinstance(uncond, dict) else uncond).shape[0]

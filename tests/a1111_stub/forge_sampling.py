"""Stand-in for Forge's sampling path (test helper, not a host module name).

Written from the call contract of Forge HEAD ``modules/sd_samplers_cfg_denoiser.py::CFGDenoiser.forward`` ->
``backend/sampling/sampling_function.py`` (old Forge: ``modules_forge/forge_sampler.py::forge_sample`` ->
``ldm_patched/modules/samplers.py``: the same steps), per step:

* ``CFGDenoiserParams(x [B], image_cond, sigma [B], step, total, text_cond, text_uncond)`` ->
  ``on_cfg_denoiser`` (``text_uncond`` / ``text_cond`` are read back); NGMS / skip-early-CFG set the CFG
  scale to 1;
* conditionings compiled: the uncond as one entry of B rows, the cond as one entry per AND position
  (``compile_weighted_conditions``: all images must have the same number of AND parts; the entry's
  ``strength`` is the part's weight);
* ``conditioning_modifiers`` -> CFG 1 drops the uncond (unless ``disable_cfg1_optimization``) ->
  ``sampler_pre_cfg_function`` -> ``calc_cond_uncond_batch``: every entry as a chunk of B rows, batched
  into one ``apply_model`` call (chunks in reverse order, as Forge pops them; ``opts.forge_split_calls``:
  one call per chunk, as Forge does when memory is short) with ``transformer_options`` carrying
  ``cond_or_uncond``, ``sigmas``, ``cond_mark``, ``cond_indices``, ``uncond_indices``, through
  ``model_function_wrapper`` when set; cross-attention contexts of different lengths repeated to their
  least common multiple (``ConditionCrossAttn.concat``); cond predictions averaged with their strengths;
* CFG (``sampler_cfg_function`` if set, else ``uncond + (cond - uncond) * scale * edit_strength``) ->
  ``sampler_post_cfg_function`` list -> mask blend -> ``on_cfg_after_cfg``; ``on_cfg_denoised`` is never
  fired.

``apply_model`` is ComfyUI's real ``BaseModel._apply_model`` (x0 predictions from sigma). The patcher's
weight patches are merged into the model in place for the pass and restored afterwards (Forge's
``LoraLoader`` with its backup), so the model's forward hooks still fire.
"""
import math

import torch

from modules import script_callbacks, shared

COND, UNCOND = 0, 1


def compile_conditions(cond):
    if cond is None:  # Forge's hires pass at CFG 1 has no negative
        return None
    if isinstance(cond, dict):
        return [{"cross_attn": cond["crossattn"], "model_conds": {"c_crossattn": cond["crossattn"], "y": cond.get("vector")}}]
    return [{"cross_attn": cond, "model_conds": {"c_crossattn": cond}}]


def compile_weighted_conditions(cond, conds_list):
    out = []
    for position in map(list, zip(*conds_list)):
        idx = [i for i, _ in position]
        feed = {k: v[idx] for k, v in cond.items()} if isinstance(cond, dict) else cond[idx]
        entry = compile_conditions(feed)[0]
        entry["strength"] = position[-1][1]
        out.append(entry)
    return out


def _lcm(*ns):
    out = 1
    for n in ns:
        out = out * n // math.gcd(out, n)
    return out


def _marks(cou, B, sigmas):
    return {"cond_or_uncond": list(cou), "sigmas": sigmas,
            "cond_mark": torch.tensor([float(c) for c in cou for _ in range(B)]).to(sigmas),
            "cond_indices": [k * B + j for k, c in enumerate(cou) if c == COND for j in range(B)],
            "uncond_indices": [k * B + j for k, c in enumerate(cou) if c == UNCOND for j in range(B)]}


def calc_cond_uncond_batch(model, cond, uncond, x, timestep, model_options, image_cond=None):
    B = x.shape[0]
    to_run = [(c, COND) for c in cond] + ([(c, UNCOND) for c in uncond] if uncond is not None else [])
    order = list(reversed(range(len(to_run))))
    batches = [[k] for k in order] if shared.opts.data.get("forge_split_calls") else [order]
    out = {COND: torch.zeros_like(x), UNCOND: torch.zeros_like(x)}
    count = {COND: torch.full_like(x, 1e-37), UNCOND: torch.full_like(x, 1e-37)}
    adm = getattr(model, "adm_channels", 0)
    for batch in batches:
        entries = [to_run[k] for k in batch]
        length = _lcm(*(e["model_conds"]["c_crossattn"].shape[1] for e, _ in entries))
        ctx = torch.cat([e["model_conds"]["c_crossattn"].repeat(1, length // e["model_conds"]["c_crossattn"].shape[1], 1)
                         for e, _ in entries])
        c = {"c_crossattn": ctx}
        if adm and entries[0][0]["model_conds"].get("y") is not None:
            c["y"] = torch.cat([e["model_conds"]["y"] for e, _ in entries])
        if torch.is_tensor(image_cond) and image_cond.shape[0] == B and image_cond.shape[2:] == x.shape[2:]:
            c["c_concat"] = torch.cat([image_cond] * len(entries))
        cou = [kind for _, kind in entries]
        to = dict(model_options.get("transformer_options", {}))
        to.update(_marks(cou, B, timestep))
        c["transformer_options"] = to
        input_x = torch.cat([x] * len(entries))
        ts = torch.cat([timestep] * len(entries))
        # ComfyUI's own implementation (its class method may carry ComfyUI's operator lock, which Forge has not)
        apply_model = getattr(model, "_apply_model", model.apply_model)
        wrapper = model_options.get("model_function_wrapper")
        if wrapper is not None:
            output = wrapper(apply_model, {"input": input_x, "timestep": ts, "c": c, "cond_or_uncond": cou})
        else:
            output = apply_model(input_x, ts, **c)
        for (e, kind), o in zip(entries, output.chunk(len(entries))):
            mult = float(e.get("strength", 1.0))
            out[kind] += o * mult
            count[kind] += mult
    return out[COND] / count[COND], out[UNCOND] / count[UNCOND]


def sampling_function(unet, model, params, cond_scale, conds_list):
    x, timestep = params.x, params.sigma
    uncond = compile_conditions(params.text_uncond)
    cond = compile_weighted_conditions(params.text_cond, conds_list)
    model_options = unet.model_options
    seed = 0
    for modifier in model_options.get("conditioning_modifiers", []):
        model, x, timestep, uncond, cond, cond_scale, model_options, seed = modifier(model, x, timestep, uncond, cond, cond_scale,
                                                                                     model_options, seed)
    edit_strength = sum(c.get("strength", 1) for c in cond)
    uncond_ = None if math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False) else uncond
    for fn in model_options.get("sampler_pre_cfg_function", []):
        model, cond, uncond_, x, timestep, model_options = fn(model, cond, uncond_, x, timestep, model_options)
    cond_pred, uncond_pred = calc_cond_uncond_batch(model, cond, uncond_, x, timestep, model_options, params.image_cond)
    if "sampler_cfg_function" in model_options:
        args = {"cond": x - cond_pred, "uncond": x - uncond_pred, "cond_scale": cond_scale, "timestep": timestep, "input": x,
                "sigma": timestep, "cond_denoised": cond_pred, "uncond_denoised": uncond_pred, "model": model,
                "model_options": model_options}
        result = x - model_options["sampler_cfg_function"](args)
    elif not math.isclose(edit_strength, 1.0):
        result = uncond_pred + (cond_pred - uncond_pred) * cond_scale * edit_strength
    else:
        result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for fn in model_options.get("sampler_post_cfg_function", []):
        args = {"denoised": result, "cond": cond, "uncond": uncond, "model": model, "uncond_denoised": uncond_pred,
                "cond_denoised": cond_pred, "sigma": timestep, "model_options": model_options, "input": x}
        result = fn(args)
    return result


class ForgeCFGDenoiser:
    def __init__(self, p, unet, total_steps):
        self.p, self.unet, self.total_steps = p, unet, total_steps
        self.step = 0
        self.mask = self.nmask = self.init_latent = None
        self.results = []  # every step's result (tests compare with hand computations)

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond=0.0, image_cond=None):
        conds_list, tensor = cond
        if image_cond is None:
            image_cond = torch.zeros(x.shape[0], 5, 1, 1)
        params = script_callbacks.CFGDenoiserParams(x, image_cond, sigma, self.step, self.total_steps, tensor, uncond, self)
        script_callbacks.cfg_denoiser_callback(params)
        if shared.opts.data.get("skip_early_cond", 0) and self.step / self.total_steps <= shared.opts.skip_early_cond:
            cond_scale = 1.0
        elif self.step % 2 and s_min_uncond > 0 and sigma[0] < s_min_uncond:
            cond_scale = 1.0
        self.inputs = (params.x.clone(), params.sigma.clone())
        denoised = sampling_function(self.unet, self.unet.model, params, cond_scale, conds_list)
        if self.mask is not None:
            denoised = denoised * self.nmask + self.init_latent * self.mask
        after = script_callbacks.AfterCFGCallbackParams(denoised, self.step, self.total_steps)
        script_callbacks.cfg_after_cfg_callback(after)
        self.results.append((params.x.clone(), params.sigma.clone(), after.x.clone()))
        self.step += 1
        return after.x


def merged_weights(unet):
    """{parameter name: merged weight} for the patcher's patches (ComfyUI's calculate_weight, Forge's format)."""
    import comfy.lora

    per_key = {}
    if hasattr(unet, "lora_patches"):  # Forge HEAD: identifier -> {key: [[strength_patch, patch, strength_model, offset, fn]]}
        for patches in unet.lora_patches.values():
            for key, items in patches.items():
                per_key.setdefault(key, []).extend(tuple(i) for i in items)
    else:  # old Forge: key -> [(strength_patch, patch, strength_model)]
        for key, items in getattr(unet, "patches", {}).items():
            per_key.setdefault(key, []).extend(tuple(i) + (None, None) for i in items)
    out = {}
    for key, items in per_key.items():
        w = unet.model.get_parameter(key).detach()
        out[key] = comfy.lora.calculate_weight(items, w.clone().float(), key).to(w.dtype)
    return out


class patched:
    """Context: the patcher's weights merged into its model in place, restored on exit."""

    def __init__(self, unet):
        self.unet = unet
        self.backup = {}

    def __enter__(self):
        with torch.no_grad():
            for key, w in merged_weights(self.unet).items():
                param = self.unet.model.get_parameter(key)
                self.backup[key] = param.detach().clone()
                param.copy_(w)
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for key, w in self.backup.items():
                self.unet.model.get_parameter(key).copy_(w)
        return False

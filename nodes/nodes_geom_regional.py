"""Geom-Erasing regional negation in ComfyUI: ConceptGate's rule for the learned tokens (not the paper's).

Graph shape::

    Load Checkpoint (MODEL) --> Geom-Erasing Regional Negation --> KSampler (model)
    CLIP -------------------------------^       ^-- a geom eraser (models/conceptgate) or an exported embedding

The node patches the MODEL: the sampler's own negative stays the negative, and each step one extra row
(the negative followed by the learned tokens, as 'Geom-Erasing Negative' builds it) joins the batched
prediction; a post-CFG function then applies, in epsilon space,
``eps_hat = eps_cfg - k (cfg - 1) M * (eps(negative + tokens) - eps(negative))``, with ``M`` the image cells of
the location bins (see ``adapters/geom/regional.py``). ``k = 1`` with every bin is exactly the paper's
negative prompt. At CFG 1 ComfyUI predicts no negative and the node does nothing, as the paper's negative
prompt would not. A batch another patch has already extended (All-but-One guidance on the same MODEL) is
refused, not silently left unerased.
"""

from __future__ import annotations

import uuid

import torch

import comfy.samplers
from comfy_api.latest import io

from ..adapters import geom as G
from ..adapters.abo.guidance import denoised_from_eps, eps_from_denoised, region_map
from ..adapters.errors import EraserFileError, UnsupportedEraser
from . import comfy_glue
from .nodes_geom import NONE, _table, comfy_tokens, load_source, source_files
from .v3 import CATEGORY, Eraser, check_choices

KEY = "conceptgate_geom_regional"


class RegionalRuntime:
    """The tokens' conditioning, the cell map and the post-CFG rule for one patched MODEL."""

    def __init__(self, clip, eraser, strength: float):
        if getattr(clip.cond_stage_model, "clip_g", None) is not None:
            raise UnsupportedEraser(f"{eraser.source or eraser.name}: regional negation runs on one-encoder "
                                    "(SD1.x/2.x) models in this version, not SDXL")
        self.eraser = G.with_negation(G.validate(eraser), "regional", strength)
        G.check_text_encoder(self.eraser, _table(clip))
        tokens, self.plan = comfy_tokens(clip, self.eraser)
        self.tokens = clip.encode_from_tokens_scheduled(tokens)[0][0]  # [1, 77 * chunks, D]
        self.region = (int(self.eraser.settings["grid"]), tuple(self.plan.bins))
        self.strength = float(strength)
        self.pending = None
        self.calls = 0
        self._conds: dict = {}

    def extra_cond(self, template: dict, model, x_in: torch.Tensor) -> dict:
        """The negative's processed cond with the tokens appended to its context (ComfyUI's own
        ``extra_conds``, so area, mask and timestep range are the negative's)."""
        key = (id(template), tuple(x_in.shape[1:]))
        hit = self._conds.get(key)
        if hit is not None:
            return hit
        ctx = template["cross_attn"]
        joined = torch.cat((ctx, self.tokens.to(ctx.device, ctx.dtype).expand(ctx.shape[0], -1, -1)), 1)
        raw = {k: v for k, v in template.items() if k != "model_conds"}
        raw["cross_attn"], raw["model_conds"] = joined, {}
        enc = comfy.samplers.encode_model_conds(model.extra_conds, [raw], x_in, x_in.device, "negative")[0]
        new = dict(template)
        new["model_conds"] = dict(template.get("model_conds", {}), c_crossattn=enc["model_conds"]["c_crossattn"])
        new["cross_attn"], new["uuid"] = joined, uuid.uuid4()
        self._conds[key] = new
        return new

    def calc_cond_batch_wrapper(self, executor, model, conds, x_in, timestep, model_options):
        negative = conds[1] if len(conds) > 1 else None
        self.pending = None
        if negative is None:  # CFG 1: no negative branch, nothing to steer away from
            return executor(model, conds, x_in, timestep, model_options)
        if len(conds) != 2:
            raise UnsupportedEraser(f"{self.eraser.name}: Geom-Erasing regional negation found the sampler's batch "
                                    f"already extended to {len(conds)} conditionings by another patch (All-but-One "
                                    "guidance on the same MODEL?); use one of them per MODEL")
        extra = [self.extra_cond(c, model, x_in) for c in negative]
        out = executor(model, list(conds) + [extra], x_in, timestep, model_options)
        self.pending = {"x": x_in, "tokens": out[2]}
        self.calls += 1
        return out[:2]

    def post_cfg(self, args: dict) -> torch.Tensor:
        pending, self.pending = self.pending, None
        denoised, x = args["denoised"], args["input"]
        if pending is None or pending["x"] is not x:
            return denoised
        sigma, w = args["sigma"], float(args["cond_scale"])
        eps_neg = eps_from_denoised(x, args["uncond_denoised"], sigma)
        eps_tok = eps_from_denoised(x, pending["tokens"], sigma)
        mask = region_map(*self.region, x.shape[-2:]).to(x)
        eps_hat = eps_from_denoised(x, denoised, sigma) - self.strength * (w - 1.0) * mask * (eps_tok - eps_neg)
        return denoised_from_eps(x, eps_hat, sigma)


def patched_model(model, clip, eraser, strength: float = G.DEFAULT_REGIONAL_STRENGTH):
    """A clone of ``model`` sampling with ``eraser``'s tokens as a regional negation; the runtime too."""
    runtime = RegionalRuntime(clip, eraser, strength)
    return comfy_glue.attach_batch_extension(model, KEY, runtime, eraser.source or eraser.name), runtime


class GeomRegional(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptGateGeomRegional",
            display_name="Geom-Erasing Regional Negation (ConceptGate)",
            category=CATEGORY,
            description=("ConceptGate's way of using Geom-Erasing tokens (not the paper's): your negative stays the "
                         "negative, and the learned tokens push away from the concept only in the image cells their "
                         "location tokens name, so the rest of the image (the subject's colour) is left alone. Costs "
                         "one extra row per step. Use it instead of 'Geom-Erasing Negative', not with it."),
            inputs=[
                io.Model.Input("model", tooltip="The model to sample; it is cloned and patched, never changed."),
                io.Clip.Input("clip", tooltip="The CLIP of the model the tokens were trained on."),
                io.Combo.Input("source", options=source_files(), tooltip="A Geom-Erasing eraser (models/conceptgate) "
                               "or an embedding exported by ConceptGate (models/embeddings). Ignored when an eraser "
                               "is connected."),
                io.Float.Input("strength", default=G.DEFAULT_REGIONAL_STRENGTH, min=0.05, max=10.0, step=0.05,
                               tooltip="k: the push is k x (cfg - 1), the paper's negative prompt's push being "
                                       "1 x (cfg - 1) over the whole image. 2 was chosen on validation seeds of the toy "
                                       "model."),
                Eraser.Input("eraser", optional=True, tooltip="A loaded geom eraser (Load Eraser); overrides source."),
            ],
            outputs=[io.Model.Output("model_out", display_name="model", tooltip="The patched model: connect it to the "
                                     "sampler, with your own negative as the sampler's negative."),
                     io.String.Output("info", display_name="info", tooltip="The tokens and cells used.")],
        )

    @classmethod
    def validate_inputs(cls, source=None) -> bool | str:
        return check_choices(cls, source=source)

    @classmethod
    def execute(cls, model, clip, source, strength, eraser=None) -> io.NodeOutput:
        if eraser is None:
            if source == NONE:
                raise EraserFileError(source, "no Geom-Erasing tokens: pick a source file or connect an eraser")
            eraser = load_source(source)
        if eraser.kind != "conditioning" or eraser.method != G.METHOD:
            raise EraserFileError(eraser.source or eraser.name, f"not a Geom-Erasing eraser ({eraser.method}, {eraser.kind})")
        m, runtime = patched_model(model, clip, eraser, strength)
        grid, bins = runtime.region
        info = (f"{runtime.eraser.name}: regional negation x{strength:g} on {len(bins)} cell(s) of grid {grid} "
                f"({' '.join(G.token_name(b, grid) for b in bins[:8])}{' ...' if len(bins) > 8 else ''})")
        return io.NodeOutput(m, info)


NODES = [GeomRegional]

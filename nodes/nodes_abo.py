"""All-but-One guidance in ComfyUI (sampling-time reconstruction, see ``adapters/abo/guidance.py``).

Two ways to run it, same rule, same gate:

* **All-but-One Guider** (a ``GUIDER`` for ``SamplerCustomAdvanced``, subclass of
  ``comfy.samplers.CFGGuider``): positive, negative and every erase / alternative conditioning go
  through ComfyUI's own ``process_conds`` and are batched in ONE ``calc_cond_batch`` call per step.
* **All-but-One Guidance (KSampler)** (a MODEL patch for the stock ``KSampler``): a ``CALC_COND_BATCH``
  wrapper appends the erase / alternative conditionings to the ``[positive, negative]`` list ComfyUI
  is about to batch (one call), keeps their predictions, and hands ComfyUI the usual two outputs; a
  post-CFG function (``set_model_sampler_post_cfg_function``: a list, stackable) applies the rule.
  No single-slot hook (``model_function_wrapper``, ``sampler_cfg_function``,
  ``sampler_calc_cond_batch_function``) is taken.

ComfyUI's samplers work on denoised (x0) predictions ``d = x - sigma * eps``; the rule is applied in
epsilon space: ``eps = (x - d) / sigma``, ``eps_hat = eps_cfg - w * sum_j gamma_j (eps_erase_j -
eps_alt_j)``, ``d_hat = x - sigma * eps_hat``. At ``cfg == 1`` ComfyUI skips the negative branch; the
rule then runs with ``w = 1`` and an empty alternative gets its own row.

The gate ``gamma`` is computed when the sampler runs, from the positive conditioning exactly as it is
fed to the UNet (so with this CLIP, CLIP skip included) and the token ids recorded by 'CLIP Text
Encode (ConceptGate)' (with the stock text encoder, the token half of Facilitated Transport is
skipped, as in the other ConceptGate nodes). With several positive entries the largest gate wins,
and the extra conditionings copy the first entry's area / mask / ControlNet. Gate 0: nothing is
added, the output is bit-identical to the unpatched model.

In-prompt erasers (``settings["in_prompt"]``, the eraser node's ``in_prompt`` switch): 'CLIP Text Encode
(ConceptGate)' records the prompt text on its conditioning; while the entry's tensor is still exactly that
text's encoding with this CLIP, the term subtracts ``eps(prompt) - eps(prompt with the concept swapped)``
(the positive row is reused for the first, so +1 row). Otherwise (stock encoder, concatenated or combined
conditionings) the bare-word term runs.
"""

from __future__ import annotations

import logging
import math
import uuid

import torch

import comfy.patcher_extension
import comfy.samplers
import folder_paths
from comfy_api.latest import io

from ..adapters.abo.guidance import (
    Term, abo_eraser, abo_entries, alternative_of, denoised_from_eps, eps_from_denoised, guidance_terms, in_prompt_terms,
    save_abo, swap_in_prompt, uses_prompt,
)
from ..adapters.errors import EraserFileError
from ..adapters.gate import GateReport
from ..adapters.gate import BankCache
from ..adapters.stack import EraserStack
from . import comfy_glue
from .nodes_conceptgate import FOLDER
from .v3 import CATEGORY, Eraser, Stack

log = logging.getLogger("conceptgate")
KEY = "conceptgate_abo"


def _need_abo(stack: EraserStack) -> None:
    if not abo_entries(stack):
        kinds = sorted({f"{e.eraser.kind}/{e.eraser.method}" for e in stack.entries}) or ["empty"]
        raise EraserFileError(
            "<stack>", "no enabled All-but-One guidance eraser in this stack (it holds: " + ", ".join(kinds)
            + "); weight erasers go through 'Apply Eraser Stack'")


class AboRuntime:
    """Gates, extra conditionings and the post-CFG rule shared by the guider and the KSampler patch."""

    def __init__(self, stack: EraserStack, clip):
        _need_abo(stack)
        self.stack = stack
        self.clip = clip
        self.banks = BankCache(comfy_glue.ComfyTextEncoder(clip))
        for _, e in abo_entries(stack):  # encode / calibrate now, not in the middle of sampling
            self.banks.prepare(e)
        self._conditioning: dict[str, list] = {}
        self._terms: dict = {}
        self.pending = None
        self.last_report = GateReport()
        self.calls = 0        # UNet batches that carried extra rows
        self.extra_rows = 0

    # ------------------------------------------------------------- text
    def texts(self, positive: list | None = None) -> list[str]:
        """Every text a term can need: the erasers' words and, for in-prompt erasers, the prompts of
        ``positive`` (a CONDITIONING or processed conds) with their swapped forms."""
        out = []
        for _, e in abo_entries(self.stack):
            for t in list(e.eraser.concepts) + [alternative_of(e.eraser)]:
                if t not in out:
                    out.append(t)
        for c in positive or ():
            prompt = self.prompt_text(c)
            if prompt is None:
                continue
            for _, e in abo_entries(self.stack):
                swapped = swap_in_prompt(prompt, e.eraser.concepts, alternative_of(e.eraser)) if uses_prompt(e.eraser) else None
                for t in ((prompt, swapped) if swapped is not None else ()):
                    if t not in out:
                        out.append(t)
        return out

    def prompt_text(self, c) -> str | None:
        """The text 'CLIP Text Encode (ConceptGate)' recorded on a conditioning entry (a processed dict or a
        ``[tensor, dict]`` pair), when the stack has an in-prompt eraser and the entry's tensor is still exactly
        that text's encoding with this CLIP (not concatenated or combined since): else None, bare-word terms."""
        if not any(uses_prompt(e.eraser) for _, e in abo_entries(self.stack)):
            return None
        extra, ctx = (c, c.get("cross_attn")) if isinstance(c, dict) else (c[1], c[0])
        text = extra.get(comfy_glue.TEXT_KEY)
        if not isinstance(text, str) or ctx is None:
            return None
        mine = self.conditioning(text)[0][0]
        return text if ctx.shape == mine.shape and torch.equal(ctx.to(mine), mine) else None

    def conditioning(self, text: str) -> list:
        """``text`` as a CONDITIONING encoded by this CLIP (what CLIPTextEncode would give)."""
        if text not in self._conditioning:
            self._conditioning[text] = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(text))
        return self._conditioning[text]

    # ------------------------------------------------------------- gate
    def terms_for(self, positive: list[dict] | None) -> list[Term]:
        """The firing terms for a (processed) positive conditioning list: per eraser the largest gate
        over the list's entries, cached per entry uuid."""
        if not positive:
            return []
        key = tuple(c.get("uuid") for c in positive)
        hit = self._terms.get(key)
        if hit is not None:
            return hit
        best: dict[str, Term] = {}
        report = GateReport()
        for c in positive:
            ctx = c.get("cross_attn")
            if ctx is None:
                continue
            tokens = c.get(comfy_glue.TOKENS_KEY)
            enc = comfy_glue.encoded_conditioning(comfy_glue._specials(self.clip), ctx, c)
            terms = guidance_terms(self.stack, enc, self.banks, tokens_known=tokens is not None)
            prompt = self.prompt_text(c)
            if prompt is not None:  # in-prompt erasers: the prompt and its swapped form
                terms = in_prompt_terms(terms, [prompt], self.stack)
            for t in terms[0]:
                if t.eraser not in best or t.gamma > best[t.eraser].gamma:
                    best[t.eraser] = t
            _, report = self.stack.gates(enc, banks=self.banks, tokens_known=tokens is not None)
        self.last_report = report
        terms = list(best.values())
        if len(self._terms) > 256:
            self._terms.clear()
        self._terms[key] = terms
        return terms

    # ------------------------------------------------------------- extra conds (KSampler path)
    def extra_cond(self, text: str, template: dict, model, x_in: torch.Tensor) -> dict:
        """A processed cond dict for ``text``: the positive's first entry (area, mask, ControlNet,
        timestep range) with this text's model conds (ComfyUI's own ``extra_conds``)."""
        key = ("cond", text, id(template), tuple(x_in.shape[1:]))
        hit = self._terms.get(key)
        if hit is not None:
            return hit
        c = self.conditioning(text)[0]
        raw = dict(template)
        raw.pop("model_conds", None)
        raw["cross_attn"] = c[0]
        for k in ("pooled_output",):
            if k in c[1]:
                raw[k] = c[1][k]
        raw["model_conds"] = {}
        enc = comfy.samplers.encode_model_conds(model.extra_conds, [raw], x_in, x_in.device, "positive")[0]
        new = dict(template)
        mc = dict(template.get("model_conds", {}))
        for k in ("c_crossattn", "y"):
            if k in enc["model_conds"]:
                mc[k] = enc["model_conds"][k]
        new["model_conds"] = mc
        new["cross_attn"] = c[0]
        new["uuid"] = uuid.uuid4()
        new.pop(comfy_glue.TOKENS_KEY, None)
        new.pop(comfy_glue.WINDOW_IDS_KEY, None)
        new.pop(comfy_glue.TEXT_KEY, None)
        self._terms[key] = new
        return new

    # ------------------------------------------------------------- reuse of rows already in the batch
    @staticmethod
    def _single_ctx(conds):
        if conds is None or len(conds) != 1 or "area" in conds[0] or "mask" in conds[0]:
            return None
        return conds[0].get("cross_attn")

    def needed(self, terms: list[Term]) -> list[str]:
        out = []
        for t in terms:
            for text in (t.erase, t.alternative):
                if text not in out:
                    out.append(text)
        return out

    def reuse(self, text: str, positive, negative):
        """0 / 1 when ``text``'s conditioning equals the positive / negative one (its prediction is already
        in the batch), else None."""
        mine = self.conditioning(text)[0][0]
        for idx, conds in ((0, positive), (1, negative)):
            ctx = self._single_ctx(conds)
            if ctx is not None and ctx.shape == mine.shape and torch.equal(ctx.to(mine), mine):
                return idx
        return None

    # ------------------------------------------------------------- the rule (post-CFG)
    def post_cfg(self, args: dict) -> torch.Tensor:
        pending, self.pending = self.pending, None
        denoised = args["denoised"]
        x = args["input"]
        if pending is None or pending["x"] is not x:
            return denoised
        sigma = args["sigma"]
        w = float(args["cond_scale"])
        preds = pending["preds"]
        eps_hat = eps_from_denoised(x, denoised, sigma)
        for t in pending["terms"]:
            e = eps_from_denoised(x, preds[t.erase], sigma)
            a = eps_from_denoised(x, preds[t.alternative], sigma)
            eps_hat = eps_hat - w * t.gamma * (e - a)
        return denoised_from_eps(x, eps_hat, sigma)

    def batch(self, calc, model, positive, negative, x, timestep, model_options):
        """One batched prediction of ``[positive, negative]`` plus the rows the firing terms need.
        ``calc(conds)`` runs ComfyUI's calc_cond_batch. Returns the two usual outputs."""
        terms = self.terms_for(positive)
        if not terms:
            self.pending = None
            return None
        extra_texts, where = [], {}
        for text in self.needed(terms):
            idx = self.reuse(text, positive, negative)
            if idx is not None:
                where[text] = idx
            else:
                where[text] = 2 + len(extra_texts)
                extra_texts.append(text)
        extra = [[self.extra_cond(t, positive[0], model, x)] for t in extra_texts]
        out = calc([positive, negative] + extra)
        self.pending = {"x": x, "terms": terms, "preds": {t: out[i] for t, i in where.items()}}
        self.calls += 1
        self.extra_rows += len(extra_texts) * x.shape[0]
        return out[:2]

    # ------------------------------------------------------------- KSampler path
    def calc_cond_batch_wrapper(self, executor, model, conds, x_in, timestep, model_options):
        positive = conds[0] if conds else None
        negative = conds[1] if len(conds) > 1 else None
        if len(conds) != 2:  # someone else's extended batch: leave it alone
            self.pending = None
            return executor(model, conds, x_in, timestep, model_options)
        out = self.batch(lambda cs: executor(model, cs, x_in, timestep, model_options), model, positive, negative,
                         x_in, timestep, model_options)
        return out if out is not None else executor(model, conds, x_in, timestep, model_options)


def patched_model(model, stack: EraserStack, clip):
    """A clone of ``model`` running the stack's ABO guidance under the stock samplers."""
    runtime = AboRuntime(stack, clip)
    return comfy_glue.attach_batch_extension(model, KEY, runtime, "<stack>"), runtime


class AboGuider(comfy.samplers.CFGGuider):
    """CFG guider with All-but-One guidance: positive, negative, erase and alternative conditionings are
    processed by ComfyUI and predicted in one batched call per step."""

    def set_abo(self, runtime: AboRuntime):
        self.runtime = runtime
        texts = runtime.texts(self.original_conds.get("positive"))
        extra = {f"abo:{i}": runtime.conditioning(t) for i, t in enumerate(texts)}
        self._abo_keys = {t: f"abo:{i}" for i, t in enumerate(texts)}
        self.inner_set_conds(extra)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        positive = self.conds.get("positive", None)
        negative = self.conds.get("negative", None)
        if math.isclose(self.cfg, 1.0) and not model_options.get("disable_cfg1_optimization", False):
            negative = None
        terms = self.runtime.terms_for(positive)
        if not terms:
            return super().predict_noise(x, timestep, model_options, seed)
        extra_texts, where = [], {}
        for text in self.runtime.needed(terms):
            idx = self.runtime.reuse(text, positive, negative)
            if idx is None:
                where[text] = 2 + len(extra_texts)
                extra_texts.append(text)
            else:
                where[text] = idx
        conds = [positive, negative] + [self.conds[self._abo_keys[t]] for t in extra_texts]
        out = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)
        self.runtime.pending = {"x": x, "terms": terms, "preds": {t: out[i] for t, i in where.items()}}
        self.runtime.calls += 1
        self.runtime.extra_rows += len(extra_texts) * x.shape[0]
        out = out[:2]
        for fn in model_options.get("sampler_pre_cfg_function", []):
            out = fn({"conds": [positive, negative], "conds_out": out, "cond_scale": self.cfg, "timestep": timestep,
                      "input": x, "sigma": timestep, "model": self.inner_model, "model_options": model_options})
        # the rule runs first among the post-CFG functions (others see the erased prediction)
        mo = dict(model_options)
        mo["sampler_post_cfg_function"] = [self.runtime.post_cfg] + list(model_options.get("sampler_post_cfg_function", []))
        return comfy.samplers.cfg_function(self.inner_model, out[0], out[1], self.cfg, x, timestep, model_options=mo,
                                           cond=positive, uncond=negative)


# ------------------------------------------------------------------------------------------ nodes

_TEXT_TIP = "Erase this concept (comma-separated for several, e.g. a name and its synonyms; the gate uses the best match)."


class AboEraser(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptGateAboEraser",
            display_name="All-but-One Eraser (guidance)",
            category=CATEGORY,
            description=("Makes an All-but-One guidance eraser (sampling-time reconstruction of Hong et al., AAAI "
                         "2024): the erased concept's guidance is replaced by the alternative's, the unconditional "
                         "prediction is kept. No training; the file (optional) holds only the concept names."),
            inputs=[
                io.String.Input("erase", default="triangle", tooltip=_TEXT_TIP),
                io.String.Input("alternative", default="square", tooltip="What to draw instead (empty: erase to "
                                "nothing, i.e. toward the empty prompt)."),
                io.String.Input("save_name", default="", optional=True, tooltip="Also save it as "
                                "models/conceptgate/NAME.safetensors (empty: do not save)."),
                io.Boolean.Input("in_prompt", default=False, optional=True, tooltip=(
                    "ConceptGate's in-prompt form (not the paper's): where the prompt spells the concept, the "
                    "guidance difference is taken between the prompt and the prompt with the concept replaced by "
                    "the alternative, so the alternative keeps the prompt's colour and style. Needs the prompt "
                    "from 'CLIP Text Encode (ConceptGate)'; other prompts keep the bare-word rule.")),
            ],
            outputs=[
                Eraser.Output("eraser", display_name="eraser", tooltip="A guidance eraser, to add to a stack."),
                io.String.Output("info", display_name="info", tooltip="What it does."),
            ],
        )

    @classmethod
    def execute(cls, erase, alternative, save_name="", in_prompt=False) -> io.NodeOutput:
        concepts = [c.strip() for c in erase.split(",") if c.strip()]
        eraser = abo_eraser(concepts, alternative, **({"in_prompt": True} if in_prompt else {}))
        if save_name.strip():
            folder = folder_paths.get_folder_paths(FOLDER)[0]
            import os

            os.makedirs(folder, exist_ok=True)
            save_abo(eraser, os.path.join(folder, save_name.strip() + ".safetensors"))
        info = (f"{eraser.name}: erase {', '.join(eraser.concepts)} -> {alternative.strip() or 'nothing'} (guidance"
                + (", in-prompt form)" if in_prompt else ")"))
        return io.NodeOutput(eraser, info)


_STACK_TIP = "A stack holding All-but-One guidance erasers (other kinds are ignored here; use Apply Eraser Stack)."
_CLIP_TIP = ("The CLIP that encodes your prompts: the gate and the erase / alternative conditionings use it "
             "(CLIP skip included).")


class AboGuiderNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptGateAboGuider",
            display_name="All-but-One Guider",
            category=CATEGORY,
            description=("CFG guider with All-but-One guidance for SamplerCustomAdvanced: eps = CFG - cfg * gate * "
                         "[eps(erase) - eps(alternative)], all predictions batched in one call per step."),
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with (not modified)."),
                io.Clip.Input("clip", tooltip=_CLIP_TIP),
                Stack.Input("stack", tooltip=_STACK_TIP),
                io.Conditioning.Input("positive", tooltip="The positive prompt ('CLIP Text Encode (ConceptGate)' "
                                      "enables the token half of the gate)."),
                io.Conditioning.Input("negative", tooltip="The negative prompt."),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale w (the erase term is scaled by it too)."),
            ],
            outputs=[
                io.Guider.Output("guider", display_name="guider", tooltip="For SamplerCustomAdvanced."),
                io.String.Output("gate_report", display_name="gate_report",
                                 tooltip="The gate each ABO eraser takes for the positive prompt."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, stack, positive, negative, cfg) -> io.NodeOutput:
        runtime = AboRuntime(stack, clip)
        guider = AboGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        guider.set_abo(runtime)
        _, report = comfy_glue.gates_for_conditioning(stack, clip, positive, runtime.banks)
        text = report.text()
        return io.NodeOutput(guider, text, ui={"text": [text]})


class AboGuidanceNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptGateAboGuidance",
            display_name="All-but-One Guidance (KSampler)",
            category=CATEGORY,
            description=("All-but-One guidance for the stock KSampler (and any sampler using the model's CFG): a "
                         "MODEL patch. The erase / alternative predictions join ComfyUI's cond batch; a stackable "
                         "post-CFG function applies the rule."),
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The model to erase from (a patched clone is returned)."),
                io.Clip.Input("clip", tooltip=_CLIP_TIP),
                Stack.Input("stack", tooltip=_STACK_TIP),
                io.Conditioning.Input("positive", optional=True, tooltip="Only for the gate report shown on the node."),
            ],
            outputs=[
                io.Model.Output("model_out", display_name="model",
                                tooltip="MODEL with the guidance attached (a patched clone)."),
                io.String.Output("gate_report", display_name="gate_report",
                                 tooltip="The gates for 'positive' when connected (the sampler recomputes them per "
                                 "prompt)."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, stack, positive=None) -> io.NodeOutput:
        patched, runtime = patched_model(model, stack, clip)
        text = "ABO guidance attached; gates are computed per prompt at sampling time"
        if positive is not None:
            _, report = comfy_glue.gates_for_conditioning(stack, clip, positive, runtime.banks)
            text = report.text()
        return io.NodeOutput(patched, text, ui={"text": [text]})


NODES = [AboEraser, AboGuiderNode, AboGuidanceNode]

"""All-but-One guidance in the webuis (the sampling-time rule of ``adapters/abo/guidance.py``).

Per image ``i`` and firing term ``(gamma, erase, alternative)`` the webui's CFG result becomes::

    d_hat_i = d_cfg_i - w * sum gamma [d(x_i, e_erase) - d(x_i, e_alt)]

with ``d`` the webui's denoised (x0) predictions. Both hosts predict x0 from the same ``x_i`` and ``sigma_i``
for every row of an image, so this is exactly the core's epsilon-space rule
(``eps_hat = eps_cfg - w * gamma * (eps_erase - eps_alt)``, ``d = x - sigma * eps``); the correction is
formed by the core's :meth:`~conceptgate.adapters.abo.guidance.AboPlan.correction`. ``w`` is the CFG scale
the webui combined with (1 where it skipped the unconditional rows: NGMS / skip-early-CFG, and Forge at CFG 1).
An image gets the terms of its strongest AND part (per eraser); the erased concept is that part's
best-matching one.

Erasers saved with ``settings["in_prompt"]`` use ConceptGate's in-prompt form
(:func:`~conceptgate.adapters.abo.guidance.in_prompt_terms`): where the AND part spells the concept, the
term subtracts ``d(x, part) - d(x, part with the concept swapped for the alternative)``. The part's
prediction is its own conditional row (A1111 reuses it; Forge predicts it again in its extra chunks), the
swapped text is encoded with the webui's model before sampling. Parts with prompt-editing syntax
(``[a:b:N]``, ``[a|b]``: the webui schedules them per step, a plain encoding would not) and parts that do
not spell the concept (a synonym, an embedding) keep the bare-word term, so nothing is left unerased.

The erase / alternative rows join the webui's own CFG batch (one UNet call per step, as in diffusers and
ComfyUI); an image whose gate is 0 adds no rows, and a step where no image fires is not touched
(bit-identical):

* **A1111** (:class:`A1111Guidance`): ``on_cfg_denoiser`` inserts one row per needed conditioning of a
  firing image between the conditional and the unconditional rows (``x``, ``sigma``, ``image_cond`` of the
  image's conditional row, ``text_cond`` + the text's encoding; the webui keeps the unconditional rows last
  and its ``combine_denoised`` reads only the rows it made); ``on_cfg_denoised`` keeps the predictions of
  those rows; ``on_cfg_after_cfg`` subtracts the correction. A conditioning equal to the image's own prompt
  (one AND part) reuses its conditional row; the unconditional row is never reused (the webui may skip it).
* **Forge / reForge** (:class:`ForgeGuidance`, on the UNet patcher clone of ``process_before_every_sampling``;
  Forge never fires ``on_cfg_denoised``): a conditioning modifier records the step's ``x`` and CFG scale; the
  model function wrapper appends the extra rows to the first ``apply_model`` call of the step as whole
  chunks of the batch (Forge batches conditionings in chunks of ``B`` rows and tells its patches which
  chunk is which in ``cond_or_uncond``; extra chunks are marked conditional), chaining any wrapper
  already set; a post-CFG function (a list: stackable) applies the rule. Cost there: ``B`` rows per
  distinct text a firing image needs, for the whole batch (+1 chunk for an empty alternative, +2 for a named
  one). With a ControlNet in the call the extra rows are predicted in a second call without it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re

import torch

from ..adapters.abo.guidance import (AboPlan, Term, abo_entries, alternative_of, guidance_terms, in_prompt_terms,
                                     swap_in_prompt, uses_prompt)
from ..adapters.gate import EncodedText
from ..adapters.stack import EraserStack
from .text import autocast


# ------------------------------------------------------------------ shared
_SCHEDULED = re.compile(r"\[[^\]]*[:|][^\]]*\]")  # [from:to:when], [a|b]: the webui varies them per step


def swappable(text: str) -> str:
    """The AND part's text for the in-prompt form, or "" (bare-word term) when the webui schedules it."""
    return "" if _SCHEDULED.search(text or "") else (text or "")


def image_terms(stack: EraserStack, encoded: EncodedText, banks, tokens_known: bool, image_of_row: list[int],
                n_images: int, texts: list[str] | None = None) -> list[list[Term]]:
    """Per image, the firing ABO terms of its strongest AND part (per eraser, the largest |gamma|).
    ``texts``: each row's AND-part text where the host knows it (in-prompt erasers use it)."""
    best: list[dict[str, Term]] = [{} for _ in range(n_images)]
    rows = guidance_terms(stack, encoded, banks, tokens_known)
    if texts is not None and len(texts) == len(rows):
        rows = in_prompt_terms(rows, [swappable(t) for t in texts], stack)
    for r, terms in enumerate(rows):
        i = image_of_row[r]
        for t in terms:
            if t.eraser not in best[i] or abs(t.gamma) > abs(best[i][t.eraser].gamma):
                best[i][t.eraser] = t
    order = [e.eraser.name for _, e in abo_entries(stack)]
    return [sorted(b.values(), key=lambda t: order.index(t.eraser) if t.eraser in order else len(order)) for b in best]


class TextConditionings:
    """The erase / alternative texts of the stack's ABO entries, encoded once by the webui
    (``sd_model.get_learned_conditioning``, as it encodes prompts: CLIP skip included). SDXL: the
    cross-attention part and the pooled ``vector`` are kept."""

    def __init__(self, stack: EraserStack, sd_model):
        self.sd_model = sd_model
        self.texts: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        needed = []
        for _, e in abo_entries(stack):
            for t in list(e.eraser.concepts) + [alternative_of(e.eraser)]:
                if t not in needed:
                    needed.append(t)
        if needed:  # short words: one call (the webui pads a batch to its longest text)
            self._encode(needed)

    def _encode(self, texts: list[str]) -> None:
        with torch.no_grad(), autocast():
            out = self.sd_model.get_learned_conditioning(texts)
        ctx = out["crossattn"] if isinstance(out, dict) else out
        vec = out.get("vector") if isinstance(out, dict) else None
        for k, t in enumerate(texts):
            self.texts[t] = (ctx[k].detach(), vec[k].detach() if vec is not None else None)

    def add(self, texts) -> None:
        """Encode ``texts`` not held yet (prompts of in-prompt terms; called before sampling)."""
        for t in dict.fromkeys(texts):
            if t not in self.texts:  # one by one: a prompt's encoding must not be padded to a longer one's
                self._encode([t])

    def hidden(self) -> dict[str, torch.Tensor]:
        return {t: h for t, (h, _) in self.texts.items()}


def swapped_texts(stack: EraserStack, texts) -> list[str]:
    """The in-prompt alternatives the stack's erasers could need for these AND parts (encoded before
    sampling: the gate decides per step which of them fire)."""
    out = []
    for _, e in abo_entries(stack):
        if uses_prompt(e.eraser):
            for text in texts:
                s = swap_in_prompt(swappable(text), e.eraser.concepts, alternative_of(e.eraser))
                if s is not None:
                    out.append(s)
    return out


def _fit_length(t: torch.Tensor, length: int) -> torch.Tensor:
    """[..., L, D] repeated along the tokens to ``length`` (a multiple of L; attention is unchanged)."""
    n = t.shape[-2]
    if n == length:
        return t
    reps = [1] * t.dim()
    reps[-2] = length // n
    return t.repeat(*reps)


def _lcm(*ns: int) -> int:
    out = 1
    for n in ns:
        out = out * n // math.gcd(out, n)
    return out


# ------------------------------------------------------------------ A1111
class A1111Guidance:
    """Rows in A1111's CFG batch (see the module doc). One per generation; ``extend`` / ``denoised`` /
    ``after_cfg`` are called from the three CFG callbacks of every step."""

    def __init__(self, stack: EraserStack, sd_model, uncond_terms: set[str] | frozenset = frozenset()):
        self.stack = stack
        self.entries = abo_entries(stack)
        self.uncond_terms = set(uncond_terms)  # erasers whose terms act only with the unconditional branch
        self.conds = TextConditionings(stack, sd_model) if self.entries or self.uncond_terms else None
        self.step: dict | None = None
        self.last_terms: list[list[Term]] = []
        self.calls = 0
        self.extra_rows = 0

    def __bool__(self):
        return bool(self.entries) or bool(self.uncond_terms)

    def extend(self, params, terms: list[list[Term]], n_cond: int, first_row: list[int], single_part: list[bool],
               row_texts: list[str] | None = None, private: dict[str, torch.Tensor] | None = None):
        """Add the rows the firing terms need to this step's CFG batch (``params``: CFGDenoiserParams).
        ``row_texts``: each conditional row's AND-part text (in-prompt terms erase with the row itself).
        ``private``: conditionings made this step under keys no prompt has (Geom regional negation).
        Returns the images the extra rows belong to (for the per-row weight coefficients)."""
        self.step = None
        self.last_terms = terms
        if not any(terms):
            return []
        cond = params.text_cond
        ctx = cond["crossattn"] if isinstance(cond, dict) else cond
        vectors = cond.get("vector") if isinstance(cond, dict) else None
        held = dict(self.conds.texts)
        held.update({k: (v, None) for k, v in (private or {}).items()})
        for r, text in enumerate(row_texts or []):  # the part as the UNet sees it this step
            if text not in held:
                held[text] = (ctx[r], vectors[r] if vectors is not None else None)
        needed = list(dict.fromkeys(t for row in terms for term in row for t in (term.erase, term.alternative)))
        missing = [t for t in needed if t not in held]
        if missing:  # not encoded before sampling (prompts changed by another extension): encode now
            self.conds.add(missing)
            held.update({t: self.conds.texts[t] for t in missing})
        texts = {t: held[t][0] for t in needed}
        own = [ctx[first_row[i]].float() if single_part[i] else torch.empty(0) for i in range(len(terms))]
        length = _lcm(ctx.shape[1], *(h.shape[0] for h in texts.values()))
        hidden = {t: _fit_length(h.float(), length) for t, h in texts.items()}
        plan = AboPlan.build(terms, hidden, [_fit_length(o, length) if o.numel() else o for o in own], None)
        k = plan.extra_rows
        if k:
            src = torch.tensor([first_row[i] for i in plan.sources], device=params.x.device)
            params.x = _insert(params.x, n_cond, params.x[src])
            params.sigma = _insert(params.sigma, n_cond, params.sigma[src])
            if torch.is_tensor(params.image_cond) and params.image_cond.shape[0] == params.x.shape[0] - k:
                params.image_cond = _insert(params.image_cond, n_cond, params.image_cond[src])
            extra = plan.hidden.to(ctx.device, ctx.dtype)
            main = _fit_length(ctx, length) if ctx.shape[1] != length else ctx
            new_ctx = torch.cat([main, extra])
            if isinstance(cond, dict):
                new = copy.copy(cond)  # the webui's own dict type (DictWithShape), not changed in place
                new["crossattn"] = new_ctx
                vec = cond.get("vector")
                if vec is not None:
                    own_vec = [held[t][1] for t in plan.texts]
                    new["vector"] = torch.cat([vec, torch.stack(own_vec).to(vec)])
                if getattr(new, "_shape", None) is not None:
                    new._shape = new_ctx.shape
                params.text_cond = new
            else:
                params.text_cond = new_ctx
        self.step = {"plan": plan, "n_cond": n_cond, "k": k, "first_row": first_row, "denoiser": params.denoiser,
                     "x_out": None}
        self.calls += 1
        self.extra_rows += k
        return list(plan.sources)

    def denoised(self, x_out: torch.Tensor, uncond_computed: bool, cfg_scale: float):
        """``on_cfg_denoised``: keep the predictions the correction needs."""
        step = self.step
        if step is None:
            return
        n, k = step["n_cond"], step["k"]
        step["cond"] = x_out[torch.tensor(step["first_row"], device=x_out.device)].clone()
        step["extra"] = x_out[n:n + k].clone() if k else None
        step["w"] = float(cfg_scale) if uncond_computed else 1.0
        step["x_out"] = True

    def after_cfg(self, denoised: torch.Tensor) -> torch.Tensor:
        """``on_cfg_after_cfg``: the webui's result with the ABO correction subtracted."""
        step, self.step = self.step, None
        if step is None or step["x_out"] is None:
            return denoised
        plan = at_cfg_scale(step["plan"], self.uncond_terms, step["w"])
        corr = plan.correction(step["cond"], None, step["extra"]) * step["w"]
        d = step["denoiser"]
        mask = getattr(d, "mask", None)
        if mask is not None and not getattr(d, "mask_before_denoising", False):
            corr = corr * d.nmask  # the webui blended in the original latents already: leave those areas
        return denoised - corr.to(denoised)


def at_cfg_scale(plan: AboPlan, erasers: set[str], w: float) -> AboPlan:
    """``plan`` with the terms of ``erasers`` (Geom regional negation, whose ``gamma`` is its strength ``k``)
    weighted ``k (w - 1) / w`` for this step's CFG scale ``w``: the caller multiplies by ``w``, giving the
    rule's ``k (w - 1)``; 0 where the webui skipped the unconditional branch (``w`` = 1), as the paper's
    negative would do nothing there."""
    if not erasers:
        return plan
    scale = (w - 1.0) / w if w > 1.0 else 0.0
    return dataclasses.replace(plan, terms=[[dataclasses.replace(t, gamma=t.gamma * scale) if t.eraser in erasers else t
                                              for t in row] for row in plan.terms])


def _insert(t: torch.Tensor, at: int, rows: torch.Tensor) -> torch.Tensor:
    return torch.cat([t[:at], rows.to(t), t[at:]])


# ------------------------------------------------------------------ Forge
COND = 0  # Forge's chunk marks in transformer_options["cond_or_uncond"]


class ForgeGuidance:
    """The rule on a Forge UNet patcher (a clone made in ``process_before_every_sampling``)."""

    def __init__(self, stack: EraserStack, sd_model, uncond_terms: set[str] | frozenset = frozenset()):
        self.stack = stack
        self.entries = abo_entries(stack)
        self.uncond_terms = set(uncond_terms)  # erasers whose terms act only with the unconditional branch
        self.conds = TextConditionings(stack, sd_model) if self.entries or self.uncond_terms else None
        self.terms: list[list[Term]] = []
        self.private: dict[str, torch.Tensor] = {}  # this step's conditionings under private keys (Geom regional)
        self.step: dict | None = None
        self.calls = 0
        self.extra_rows = 0

    def __bool__(self):
        return bool(self.entries) or bool(self.uncond_terms)

    def _texts(self) -> dict:
        return {**self.conds.texts, **{k: (v, None) for k, v in self.private.items()}}

    def _terms_now(self, w: float) -> list[list[Term]]:
        """This step's terms: those of ``uncond_terms`` erasers only with an unconditional branch (``w`` > 1)
        and their conditionings made this step (none when the pass has no negative)."""
        if not self.uncond_terms:
            return self.terms
        return [[t for t in row if t.eraser not in self.uncond_terms or (w > 1.0 and t.erase in self.private)]
                for row in self.terms]

    def install(self, unet, terms: list[list[Term]]):
        """Attach to ``unet`` (a clone the glue owns) for one sampling pass with these per-image terms."""
        self.terms = terms
        self.step = None
        if not any(terms):
            return unet
        prev = unet.model_options.get("model_function_wrapper")
        me = self

        # plain closures: the patcher deep-copies model_options on clone(), which copies a bound method's object
        def modifier(model, x, timestep, uncond, cond, cond_scale, model_options, seed):
            me.step = {"x": x, "sigma": timestep, "w": float(cond_scale), "out": None}
            return model, x, timestep, uncond, cond, cond_scale, model_options, seed

        def wrapper(apply_model, args):
            return me.wrap(prev, apply_model, args)

        def post_cfg(args):
            return me.post_cfg(args)

        unet.add_conditioning_modifier(modifier)
        unet.set_model_unet_function_wrapper(wrapper)
        unet.set_model_sampler_post_cfg_function(post_cfg)
        return unet

    # ------------------------------------------------------------- rows
    def _layout(self, B: int, terms: list[list[Term]]) -> tuple[list[list[str]], AboPlan]:
        """Chunks of B rows (chunk s, row i: the s-th text image i needs) and the lookup into them."""
        needed = []
        for row in terms:
            n = []
            for t in row:
                for text in (t.erase, t.alternative):
                    if text not in n:
                        n.append(text)
            needed.append(n)
        slots = max(len(n) for n in needed)
        filler = next(n[0] for n in needed if n)
        chunks = [[n[s] if s < len(n) else filler for n in needed] for s in range(slots)]
        plan = AboPlan(terms)
        for i, n in enumerate(needed):
            for s, text in enumerate(n):
                plan.lookup[(i, text)] = ("extra", s * B + i)
        return chunks, plan

    def _extra_conditioning(self, chunks, B, like: dict, length: int) -> dict:
        texts = self._texts()
        ctx = torch.cat([torch.stack([_fit_length(texts[t][0], length) for t in chunk]) for chunk in chunks])
        c = {"c_crossattn": ctx.to(like["c_crossattn"])}
        y = like.get("y")
        if y is not None:
            c["y"] = torch.cat([torch.stack([texts[t][1] for t in chunk]) for chunk in chunks]).to(y)
        concat = like.get("c_concat")
        if torch.is_tensor(concat):  # inpainting models: the image's own concat rows
            c["c_concat"] = concat[:B].repeat(len(chunks), *([1] * (concat.dim() - 1)))
        return c

    def wrap(self, prev, apply_model, args):
        call = prev if prev is not None else (lambda fn, a: fn(a["input"], a["timestep"], **a["c"]))
        step = self.step
        x_in, c, cou = args["input"], args["c"], list(args.get("cond_or_uncond") or [])
        if step is None or step["out"] is not None or not cou or "c_crossattn" not in c:
            return call(apply_model, args)
        B = step["x"].shape[0]
        rows = x_in.shape[0]
        if rows != len(cou) * B or x_in.shape[1:] != step["x"].shape[1:]:
            return call(apply_model, args)  # not the step's batch (area conds, another extension's pass)
        terms = self._terms_now(step["w"])
        if not any(terms):
            return call(apply_model, args)
        chunks, plan = self._layout(B, terms)
        texts = self._texts()
        texts_len = [texts[t][0].shape[0] for ch in chunks for t in ch]
        main_len = c["c_crossattn"].shape[1]
        length = _lcm(main_len, *texts_len)
        extra_c = self._extra_conditioning(chunks, B, c, length)
        n = len(chunks)
        extra_x = step["x"].repeat(n, *([1] * (x_in.dim() - 1))).to(x_in)
        extra_t = step["sigma"].repeat(n).to(args["timestep"])
        if "control" in c or "control_model" in c:  # ControlNet hints are sized for the host's rows: own call
            to = dict(c.get("transformer_options") or {})
            to.update(_marks([COND] * n, B, extra_t))
            extra_c["transformer_options"] = to
            extra = call(apply_model, {"input": extra_x, "timestep": extra_t, "c": extra_c, "cond_or_uncond": [COND] * n})
            out = call(apply_model, args)
        else:
            new_c = dict(c)
            new_c["c_crossattn"] = torch.cat([_fit_length(c["c_crossattn"], length), extra_c["c_crossattn"]])
            for key in ("y", "c_concat"):
                if key in extra_c and torch.is_tensor(c.get(key)):
                    new_c[key] = torch.cat([c[key], extra_c[key]])
            marks = cou + [COND] * n
            to = dict(c.get("transformer_options") or {})
            if to:
                to.update(_marks(marks, B, step["sigma"]))
                to["cond_or_uncond"] = marks
            new_c["transformer_options"] = to
            both = call(apply_model, {"input": torch.cat([x_in, extra_x]), "timestep": torch.cat([args["timestep"], extra_t]),
                                      "c": new_c, "cond_or_uncond": marks})
            out, extra = both[:rows], both[rows:]
        step["out"] = extra
        step["plan"] = plan
        self.calls += 1
        self.extra_rows += extra.shape[0]
        return out

    def post_cfg(self, args):
        step, self.step = self.step, None
        denoised = args["denoised"]
        if step is None:
            return denoised
        if step["out"] is None:
            if any(self._terms_now(step["w"])):  # terms fire, but no UNet call of the step took their rows
                raise RuntimeError("ConceptGate: no UNet call of this step had the batch layout the All-but-One / "
                                   "Geom regional rows join (area conditionings or another extension's pass?); the "
                                   "generation is stopped rather than made without those erasers")
            return denoised
        corr = at_cfg_scale(step["plan"], self.uncond_terms, step["w"]).correction(denoised, None, step["out"])
        return denoised - (step["w"] * corr).to(denoised)


def _marks(cond_or_uncond: list[int], B: int, sigmas: torch.Tensor) -> dict:
    """Forge's per-row marks for a chunk list (``cond_mark``, ``cond_indices``, ``uncond_indices``)."""
    mark = torch.tensor([float(c) for c in cond_or_uncond for _ in range(B)]).to(sigmas)
    cond_idx = [k * B + j for k, c in enumerate(cond_or_uncond) if c == COND for j in range(B)]
    uncond_idx = [k * B + j for k, c in enumerate(cond_or_uncond) if c != COND for j in range(B)]
    return {"cond_mark": mark, "cond_indices": cond_idx, "uncond_indices": uncond_idx}


def abo_only(terms: list[list[Term]], other: set[str]) -> list[list[Term]]:
    """Per image, the All-but-One terms (for the infotext): those of ``other`` erasers (Geom regional
    negation, reported with the Geom key) left out."""
    return [[t for t in row if t.eraser not in other] for row in terms]

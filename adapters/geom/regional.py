"""Regional negation: ConceptGate's way of using Geom-Erasing tokens (a deviation from the paper, selectable).

The paper puts the concept + location tokens into the **negative prompt**. With CFG scale ``w``, the
user's negative ``e_n`` (usually empty) and ``d(c) = eps(x, c) - eps(x, e_n)``, the sampler then follows::

    eps_hat = eps(x, e_n) + w d(e_p) - (w - 1) d(e_n + tokens)             (paper: tokens as the negative)

over the whole image. On the toy model this push away from the tokens also washes out the object's
colour (-7.8 colour points for -41% watermarks; every stronger variant of the tokens, lower alpha or more
guidance, removes more and loses more colour). The location tokens already say *where* the concept
sits, so regional negation keeps the user's negative as the negative and adds the tokens as a separate
negation term (composable diffusion's NOT) confined to the image cells of the bins the tokens name::

    eps_hat = eps(x, e_n) + w d(e_p) - k (w - 1) M * d(e_n + tokens)           (regional, strength k)

``M`` is 1 on the cells of the location tokens in the negative (the eraser's token set, e.g. the bins
observed in training), 0 elsewhere (:func:`~conceptgate.adapters.abo.guidance.region_map`). With ``k = 1``
and ``M = 1`` everywhere the rule is the paper's exactly (tested). Outside ``M`` the image is sampled as
without the eraser, so a concept that appears where no training box was is not erased there: the paper's
negative prompt acts everywhere. ``k`` (default 2) was chosen on validation seeds (toyworld/erasers/README.md).

Cost: one extra UNet row per firing prompt (the tokens' prediction; the plain negative's is the batch's own
unconditional row), batched into the same UNet call by All-but-One's extra-row hooks
(:class:`~conceptgate.adapters.abo.pipeline.AboUNetHooks`), whose fold this rule is an instance of (a term
``gamma M [eps(e_n + tokens) - eps(e_n)]`` with ``gamma = k (w - 1) / w``).

Where it runs: :func:`regional_generate` on plain diffusers SD1.x pipelines, :class:`GatedPipeline` stacks
(the registry's row terms, :func:`regional_stack_terms`, folded by All-but-One's session), ComfyUI's *Geom-Erasing Regional
Negation* node (``nodes/nodes_geom_regional.py``) and the webui extension for a file set to ``regional``
(``extension/geom.py``; ``python -m conceptgate geom-negation`` writes such a copy). The
negative-prompt paths (ComfyUI's Geom node, the registry's conditioning handler) apply the paper's negative
prompt and refuse an eraser set to ``regional`` (:func:`require_prompt_negation`) rather than apply a different rule than the file asks for.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from ..eraser import Eraser
from ..errors import UnsupportedEraser
from .negative import encode_negative, plan_negative
from .tokens import encode_segments, validate

NEGATIONS = ("prompt", "regional")
DEFAULT_REGIONAL_STRENGTH = 2.0


def negation_of(eraser: Eraser) -> str:
    """``prompt`` (the paper's negative prompt, the default) or ``regional``."""
    mode = (eraser.settings or {}).get("negation", "prompt")
    if mode not in NEGATIONS:
        raise ValueError(f"{eraser.source or eraser.name}: unknown Geom negation {mode!r} ({', '.join(NEGATIONS)})")
    return mode


def regional_strength(eraser: Eraser) -> float:
    return float((eraser.settings or {}).get("negation_strength", DEFAULT_REGIONAL_STRENGTH))


def with_negation(eraser: Eraser, mode: str, strength: float | None = None) -> Eraser:
    """A copy of ``eraser`` set to ``mode`` (and regional ``strength``); the tensors are shared, not copied."""
    if mode not in NEGATIONS:
        raise ValueError(f"unknown Geom negation {mode!r} ({', '.join(NEGATIONS)})")
    settings = dict(eraser.settings or {}, negation=mode)
    if strength is not None:
        if not strength > 0:
            raise ValueError(f"regional negation strength must be > 0, got {strength}")
        settings["negation_strength"] = float(strength)
    return dataclasses.replace(eraser, settings=settings)


def require_prompt_negation(eraser: Eraser, where: str) -> None:
    """Raise :class:`UnsupportedEraser` when ``eraser`` asks for regional negation on a path that only
    applies negative prompts (fail closed: the file's rule or nothing)."""
    if negation_of(eraser) != "prompt":
        raise UnsupportedEraser(f"{eraser.source or eraser.name}: this Geom-Erasing eraser is set to regional negation, "
                                f"which {where} does not apply (it uses the tokens as a negative prompt); use "
                                "conceptgate.adapters.geom.regional_generate on diffusers, ComfyUI's 'Geom-Erasing "
                                "Regional Negation' node or the webui extension, or a copy set back with "
                                "'python -m conceptgate geom-negation FILE --out COPY --prompt'")


def regional_rule(eps_neg: torch.Tensor, eps_pos: torch.Tensor, eps_tokens: torch.Tensor, mask: torch.Tensor,
                  w: float, strength: float) -> torch.Tensor:
    """The formula on tensors (reference for the hooked path): ``eps_n + w (eps_p - eps_n) - k (w - 1) M (eps_t - eps_n)``."""
    return eps_neg + w * (eps_pos - eps_neg) - strength * (w - 1) * mask * (eps_tokens - eps_neg)


def region_of(eraser: Eraser, tokenizer, negative: str = "") -> tuple[int, tuple[int, ...]]:
    """``(grid, bins)``: the bins whose location tokens the negative carries (after the 75-token policy)."""
    plan = plan_negative(eraser, tokenizer, negative)
    return int(eraser.settings["grid"]), tuple(plan.bins)


def regional_terms(eraser: Eraser, tokenizer, text_encoder, negatives: Sequence[str], on: Sequence[bool], w: float,
                   clip_skip: int | None = None):
    """(terms, hidden): one :class:`~conceptgate.adapters.abo.guidance.Term` per firing row and the encodings
    ``{key: [77, D]}`` the extra-row hooks look up (the tokens' negative under a private key, the plain
    negative under its text, which the hooks find as the batch's own unconditional row)."""
    from ..abo.guidance import NEGATIVE_ROW, Term

    validate(eraser)
    k = regional_strength(eraser)
    gamma = k * (w - 1.0) / w if w > 1.0 else 0.0  # no unconditional branch at w <= 1: the paper's negative does nothing either
    terms, hidden = [], {}
    for neg, fires in zip(negatives, on):
        if not fires or gamma == 0.0:
            terms.append([])
            continue
        key = f"{NEGATIVE_ROW}geom:{eraser.name}:{neg}"  # cannot collide with a prompt text; a negative's row
        if key not in hidden:
            hidden[key] = encode_negative(eraser, tokenizer, text_encoder, [neg], clip_skip=clip_skip)[0]
            hidden[neg] = encode_segments(tokenizer, text_encoder, [[neg]], clip_skip=clip_skip)[0]
        terms.append([Term(gamma, key, neg, eraser.name, words=(eraser.settings.get("concept_name", "geom"), "regional"),
                           region=region_of(eraser, tokenizer, neg))])
    return terms, hidden


def uses_regional_rows(eraser: Eraser) -> bool:
    """Whether ``eraser`` acts through extra CFG rows (regional negation) rather than the negative prompt."""
    return eraser.method == "geom" and negation_of(eraser) == "regional"


def regional_stack_terms(gated, entries, prompts: Sequence[str], gates: torch.Tensor, negatives, guidance_scale: float):
    """The registry's row terms for :class:`~conceptgate.adapters.diffusers_host.GatedPipeline`: per prompt,
    the regional terms of ``entries`` whose coefficient (gate x strength, ``gates[:, k]``) is >= 0.5 (on / off,
    as the negative-prompt handler), and their encodings. SD1.x/2.x only."""
    pipe = gated.pipe
    if getattr(pipe, "text_encoder_2", None) is not None:
        names = ", ".join(e.eraser.source or e.eraser.name for e in entries)
        raise UnsupportedEraser(f"{names}: regional negation runs on one-encoder (SD1.x/2.x) pipelines in this "
                                "version, not SDXL")
    geoms = [e for e in gated.stack.entries if e.enabled and e.eraser.method == "geom"]
    if len(geoms) > 1:  # the negative-prompt handler's limit too: the two would need each other's negative
        raise ValueError("Geom-Erasing: one token set per stack on the diffusers path "
                         f"({', '.join(e.eraser.name for e in geoms)} given)")
    negs = ["" if n is None else n for n in (negatives or [""] * len(prompts))]
    terms: list[list] = [[] for _ in prompts]
    hidden: dict[str, torch.Tensor] = {}
    clip_skip = getattr(gated.encoder, "clip_skip", None)
    for k, entry in enumerate(entries):
        on = (torch.as_tensor(gates).reshape(len(prompts), -1)[:, k] >= 0.5).tolist()
        t, h = regional_terms(entry.eraser, pipe.tokenizer, pipe.text_encoder, negs, on, guidance_scale, clip_skip)
        for i, row in enumerate(t):
            terms[i].extend(row)
        hidden.update(h)
    return terms, hidden


def regional_generate(pipe, eraser: Eraser, prompts: Sequence[str], guidance_scale: float = 7.5, negative_prompt=None,
                      on: Sequence[bool] | None = None, **kwargs):
    """One call of a diffusers SD1.x ``pipe`` with ``eraser``'s tokens as a regional negation (rows where
    ``on``, default all); ``negative_prompt`` stays the pipeline's negative. Returns the pipeline output."""
    from ..abo.pipeline import AboUNetHooks

    if getattr(pipe, "text_encoder_2", None) is not None:
        raise UnsupportedEraser(f"{eraser.source or eraser.name}: regional negation runs on one-encoder (SD1.x/2.x) "
                                "pipelines in this version, not SDXL")
    prompts = list(prompts)
    negs = ([negative_prompt] * len(prompts) if isinstance(negative_prompt, str) or negative_prompt is None
            else list(negative_prompt))
    negs = ["" if n is None else n for n in negs]
    on = [True] * len(prompts) if on is None else list(on)
    terms, hidden = regional_terms(eraser, pipe.tokenizer, pipe.text_encoder, negs, on, guidance_scale)
    hooks = AboUNetHooks(pipe.unet).attach()
    try:
        with hooks.active(terms, hidden, with_uncond=guidance_scale > 1.0):
            return pipe(prompt=prompts, negative_prompt=negs, guidance_scale=guidance_scale, **kwargs)
    finally:
        hooks.detach()


__all__ = ["DEFAULT_REGIONAL_STRENGTH", "NEGATIONS", "negation_of", "region_of", "regional_generate", "regional_rule",
           "regional_stack_terms", "regional_strength", "regional_terms", "require_prompt_negation", "uses_regional_rows",
           "with_negation"]

"""Quality benchmark on the toy world (issue 3): what an eraser stack erases and what it keeps.

``python -m conceptgate bench quality [--full] [--stack MANIFEST ...] [--json PATH]`` evaluates the
base model, UCE / RECE erasers computed on the fly (one object, one style) and any stack manifests,
and writes the ``quality`` section of ``BENCHMARKS.md`` (plus JSON).

Metrics (UnlearnCanvas' definitions, adapted to the toy world; the learned judges decide):

* for a target concept ``X`` of kind ``K`` (object or style; colour and the implicit ``watermark``
  are supported too), over generations of prompts of one *prompt set*:

  - **UA** (unlearning accuracy): among images whose prompt names ``X``, the share the ``K`` judge
    assigns to a *real* class other than ``X``. "none" (garbage) is **not** a success;
  - **garbage rate**: among those images, the share the ``K`` judge calls "none";
  - **IRA** (in-domain retain): among images whose prompt names another concept of kind ``K``,
    the share judged as the named concept;
  - **CRA** (cross-domain retain): among images whose prompt does not name ``X``, the accuracy of the
    *other* kinds (e.g. style and colour for an object target), averaged over those kinds;
  - **mean** = (UA + IRA + CRA) / 3 (the "AA" of later papers);
  - **retain on target prompts**: the other kinds' accuracy on the images whose prompt names ``X``
    (erasing "triangle" from "a red triangle in striped style" should keep red and striped);
  - **replacement accuracy**: when the eraser names an alternative of the same kind
    (``settings["alternative"]``, else UCE/RECE's ``settings["guide"]``, resolved through the toy
    vocabulary; the anchor "plain" is the flat style), the share of target images judged as it.

* prompt sets: ``keyword`` (training template, keyword names), ``synonym`` (same template, the
  synonyms seen in training), ``heldout`` (the three paraphrase templates never seen in training);
* per set: judged object/style/colour accuracy, garbage rate, **watermark rate** (no prompt
  mentions it), **Fréchet distance** in judge features vs renders of the same labels (and the
  render-vs-render floor at the same n: the distance is biased upward at small n);
* **gates**: for each eraser, its gate on text-only prompt sets -- target (keyword), synonym,
  neighbour (same kind, other concept) and unrelated (naming nothing of that kind) -- as the mean
  gate and the fire rate ``gate > GATE_THRESHOLD`` (0.5);
* every rate has a 95% percentile bootstrap interval, resampling prompts (all seeds of a prompt
  move together; target and non-target prompts are resampled separately).

Fixed seeds (the same seeds for every prompt and every stack, so stacks are compared on identical
starting noise). Generation goes through :class:`~conceptgate.adapters.diffusers_host.GatedPipeline`
for weight erasers; conditioning and guidance erasers plug in with :func:`register_conditioning` /
:func:`register_guidance` (or a whole ``generate_fn``), see :func:`evaluate_stack`.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

GATE_THRESHOLD = 0.5
KINDS = ("object", "style", "colour")
COMMAND = "python -m conceptgate bench quality"

#: Tier settings. ``keyword`` / ``synonym`` / ``heldout``: number of base prompts per set (a balanced
#: spread over object x style pairs); ``per_target``: extra prompts naming each target, per set.
TIERS = {
    "quick": dict(keyword=8, synonym=4, heldout=4, per_target=3, seeds=4, steps=25, cfg=5.0,
                  gate_prompts=24, judge_renders=1000, agreement_renders=300, boot=1000, batch=48),
    "full": dict(keyword=96, synonym=48, heldout=48, per_target=12, seeds=4, steps=25, cfg=5.0,
                 gate_prompts=96, judge_renders=2000, agreement_renders=1000, boot=2000, batch=64),
}
SEED_BASE = 1000  # prompt p, seed k -> SEED_BASE + k (identical seeds for every prompt and stack)
BARS = {"object": 0.90, "style": 0.90, "colour": 0.90, "watermark_rate": 0.15}


# ------------------------------------------------------------------------------------ vocabulary


def _vocab():
    from ..toyworld import captions as C

    return C


def kind_names(kind: str) -> dict[int, list[str]]:
    C = _vocab()
    return {"object": C.OBJECT_NAMES, "style": C.STYLE_NAMES, "colour": C.COLOUR_NAMES}[kind]


@dataclass(frozen=True)
class Target:
    """One erased concept resolved to the toy vocabulary: ``kind`` in object/style/colour/watermark,
    ``index`` its class (None for the watermark)."""

    concept: str
    kind: str
    index: int | None

    @property
    def keyword(self) -> str:
        return "watermark" if self.kind == "watermark" else kind_names(self.kind)[self.index][0]


def resolve_concept(text: str) -> Target | None:
    """Map a concept string (keyword, synonym, anchor, or a phrase containing one) to a target.

    Longest name first, so "plus sign" wins over shorter matches; returns None when nothing in the
    toy vocabulary is named (then the eraser is only gate-profiled, not scored)."""
    C = _vocab()
    t = " " + re.sub(r"[^a-z\- ]+", " ", str(text).lower()) + " "
    if "watermark" in t:
        return Target(text, "watermark", None)
    cands = []
    for kind in KINDS:
        for idx, names in kind_names(kind).items():
            for n in names:
                cands.append((len(n), n, kind, idx))
    cands.append((len(C.ANCHOR_STYLE), C.ANCHOR_STYLE, "style", C.ANCHOR_STYLE_INDEX))
    for _, n, kind, idx in sorted(cands, reverse=True):
        if re.search(r"(?<![a-z\-])" + re.escape(n) + r"(?![a-z\-])", t):
            return Target(text, kind, idx)
    return None


def eraser_targets(eraser) -> list[Target]:
    out = []
    for c in eraser.concepts:
        t = resolve_concept(c)
        if t is not None and t not in out:
            out.append(t)
    return out


def eraser_alternative(eraser, target: Target) -> int | None:
    """The class an eraser says it replaces ``target`` with, if it names one of the same kind."""
    s = eraser.settings or {}
    alt = s.get("alternative") or s.get("anchor") or s.get("guide")
    if not alt or not str(alt).strip():
        return None
    t = resolve_concept(str(alt))
    if t is None or t.kind != target.kind or t.index == target.index:
        return None
    return t.index


# -------------------------------------------------------------------------------------- prompts


def _combos(exclude_heldout: bool = True):
    from ..toyworld import render as R

    held = set(_vocab().HELDOUT_PAIRS) if exclude_heldout else set()
    return [(o, s, c) for o in range(len(R.OBJECTS)) for s in range(len(R.STYLES)) for c in range(len(R.COLOURS))
            if (o, s) not in held]


def _balanced(n: int, rng: np.random.Generator, fixed: tuple[str, int] | None = None) -> list[tuple]:
    """``n`` (o, s, c) label triples spread over object x style pairs (colour cycled), optionally
    all with one attribute fixed."""
    combos = _combos()
    if fixed is not None:
        k = KINDS.index(fixed[0])
        combos = [t for t in combos if t[k] == fixed[1]]
    pairs: dict = {}
    for t in combos:
        pairs.setdefault((t[0], t[1]), []).append(t)
    keys = list(pairs)
    rng.shuffle(keys)
    out = []
    i = 0
    while len(out) < n and keys:
        key = keys[i % len(keys)]
        opts = pairs[key]
        out.append(opts[int(rng.integers(0, len(opts)))])
        i += 1
        if i >= 4 * n + len(keys):
            break
    return out


def _text(template: str, o: int, s: int, c: int, syn: bool) -> str:
    C = _vocab()
    ni = 1 if syn else 0
    on, sn = C.OBJECT_NAMES[o], C.STYLE_NAMES[s]
    return template.format(o=on[min(ni, len(on) - 1)], s=sn[min(ni, len(sn) - 1)], c=C.COLOUR_NAMES[c][0])


def build_prompt_sets(tier: dict, targets: Sequence[Target] = (), seed: int = 0) -> dict:
    """``{set name: [(prompt, (o, s, c)), ...]}`` for the keyword / synonym / held-out sets.

    Each set is a balanced spread plus ``per_target`` prompts naming each scored target (so a target
    always has images to score). Deterministic for a given tier, targets and seed."""
    C = _vocab()
    out = {}
    for si, (name, template_list, syn) in enumerate([
        ("keyword", [C.TRAIN_TEMPLATES[0]], False),
        ("synonym", [C.TRAIN_TEMPLATES[0]], True),
        ("heldout", list(C.HELDOUT_TEMPLATES), False),
    ]):
        n = int(tier.get(name, 0))
        if n <= 0:
            continue
        rng = np.random.default_rng(seed * 100 + si)
        triples = _balanced(n, rng)
        for t in targets:
            if t.kind in KINDS:
                triples += _balanced(int(tier.get("per_target", 0)), rng, fixed=(t.kind, t.index))
        seen, items = set(), []
        for j, (o, s, c) in enumerate(triples):
            p = _text(template_list[j % len(template_list)], o, s, c, syn)
            if p not in seen:
                seen.add(p)
                items.append((p, (int(o), int(s), int(c))))
        out[name] = items
    return out


def gate_prompt_sets(target: Target, n: int, seed: int = 0) -> dict:
    """Text-only prompts for an eraser's gate profile: target / synonym / neighbour / unrelated."""
    C = _vocab()
    rng = np.random.default_rng(seed)
    templates = C.TRAIN_TEMPLATES[:7] + C.HELDOUT_TEMPLATES  # the ones naming an object (and most a style)
    combos = _combos()

    def fill(pred, syn, kinds_needed, count):
        pool = [t for t in combos if pred(t)]
        res, tries = [], 0
        while len(res) < count and tries < 50 * count:
            tries += 1
            o, s, c = pool[int(rng.integers(0, len(pool)))]
            tpl = templates[int(rng.integers(0, len(templates)))]
            if not kinds_needed <= C.template_fields(tpl):
                continue
            p = _text(tpl, o, s, c, syn)
            if p not in res:
                res.append(p)
        return res

    if target.kind == "watermark":
        unrelated = fill(lambda t: True, False, set(), n)
        return {"target": ["watermark", "a watermark", "a shape with a watermark", "a red circle with a watermark"],
                "synonym": ["a logo", "a stamp in the corner"], "neighbour": [], "unrelated": unrelated}
    k = KINDS.index(target.kind)
    field = {"object": "o", "style": "s", "colour": "c"}[target.kind]
    has_syn = len(kind_names(target.kind)[target.index]) > 1
    sets = {
        "target": fill(lambda t: t[k] == target.index, False, {field}, n),
        "synonym": fill(lambda t: t[k] == target.index, True, {field}, n) if has_syn else [],
        "neighbour": fill(lambda t: t[k] != target.index, False, {field}, n // 2)
        + (fill(lambda t: t[k] != target.index, True, {field}, n - n // 2) if has_syn else []),
    }
    # unrelated: templates that do not name this kind, the anchors, and out-of-domain text
    free = [t for t in C.TRAIN_TEMPLATES + C.HELDOUT_TEMPLATES if field not in C.template_fields(t)]
    unrelated = []
    for j in range(4 * n):
        if len(unrelated) >= n - 4:
            break
        o, s, c = combos[int(rng.integers(0, len(combos)))]
        tpl = free[j % len(free)] if free else "a {c} shape"
        p = _text(tpl, o, s, c, False)
        if p not in unrelated:
            unrelated.append(p)
    unrelated += ["a photo of a dog", "a landscape painting", "a shape", "plain"][: max(0, n - len(unrelated))]
    sets["unrelated"] = unrelated
    return sets


# -------------------------------------------------------------------------------------- metrics


def cluster_bootstrap(num, den, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05):
    """Ratio ``sum(num) / sum(den)`` over clusters (prompts) and its percentile bootstrap interval.

    Returns ``(point, lo, hi, replicates)``; clusters with ``den == 0`` are dropped; with no cluster
    left everything is NaN. Same seed and cluster count -> the same resampling (joint intervals)."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    keep = den > 0
    num, den = num[keep], den[keep]
    if len(den) == 0:
        nan = float("nan")
        return nan, nan, nan, np.full(n_boot, np.nan)
    point = float(num.sum() / den.sum())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(den), (n_boot, len(den)))
    reps = num[idx].sum(1) / den[idx].sum(1)
    lo, hi = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
    return point, float(lo), float(hi), reps


def _stat(num, den, n_boot, seed):
    p, lo, hi, reps = cluster_bootstrap(num, den, n_boot, seed)
    return {"value": p, "lo": lo, "hi": hi, "n": int(np.asarray(den).sum())}, reps


def _per_prompt(prompt_ids: np.ndarray, values: np.ndarray, mask: np.ndarray, n_prompts: int):
    """Per-prompt sums of ``values`` over images where ``mask`` (num) and image counts (den)."""
    num = np.bincount(prompt_ids[mask], weights=values[mask].astype(np.float64), minlength=n_prompts)
    den = np.bincount(prompt_ids[mask], minlength=n_prompts).astype(np.float64)
    return num, den


def target_metrics(pred: dict, labels: np.ndarray, prompt_ids: np.ndarray, target: Target,
                   alternative: int | None = None, n_boot: int = 1000, seed: int = 0) -> dict:
    """UA / IRA / CRA / mean, garbage and replacement for one target on one set of judged images.

    ``pred``: judge outputs (``classify``), ``labels``: (n, 3) named (object, style, colour) per image,
    ``prompt_ids``: the prompt (bootstrap cluster) of each image."""
    from ..toyworld.judges import NONE

    labels = np.asarray(labels)
    prompt_ids = np.asarray(prompt_ids)
    n_p = int(prompt_ids.max()) + 1 if len(prompt_ids) else 0
    res = {}
    if target.kind == "watermark":
        p = np.asarray(pred["watermark"])
        is_t = np.ones(len(p), bool)
        ua = (p == 0).astype(float)                       # judged absent (not "none")
        garbage = (p == NONE["watermark"]).astype(float)
        other = KINDS
        cra_v = np.mean([np.asarray(pred[k]) == labels[:, i] for i, k in enumerate(KINDS)], 0)
        ira_mask = np.zeros(len(p), bool)
        ira_v = np.zeros(len(p))
        cra_mask = is_t
        rep_v = None
    else:
        k = KINDS.index(target.kind)
        p = np.asarray(pred[target.kind])
        is_t = labels[:, k] == target.index
        ua = ((p != target.index) & (p != NONE[target.kind])).astype(float)
        garbage = (p == NONE[target.kind]).astype(float)
        ira_v = (p == labels[:, k]).astype(float)
        ira_mask = ~is_t
        other = [kk for kk in KINDS if kk != target.kind]
        cra_v = np.mean([np.asarray(pred[kk]) == labels[:, KINDS.index(kk)] for kk in other], 0)
        cra_mask = ~is_t
        rep_v = (p == alternative).astype(float) if alternative is not None else None
    ua_s, ua_r = _stat(*_per_prompt(prompt_ids, ua, is_t, n_p), n_boot, seed)
    res["ua"] = ua_s
    res["garbage_rate"] = _stat(*_per_prompt(prompt_ids, garbage, is_t, n_p), n_boot, seed)[0]
    ira_s, ira_r = _stat(*_per_prompt(prompt_ids, ira_v, ira_mask, n_p), n_boot, seed + 1)
    cra_s, cra_r = _stat(*_per_prompt(prompt_ids, cra_v, cra_mask, n_p), n_boot, seed + 1)
    res["ira"], res["cra"] = ira_s, cra_s
    parts = [(ua_s, ua_r), (ira_s, ira_r), (cra_s, cra_r)]
    parts = [(s, r) for s, r in parts if not math.isnan(s["value"])]
    if parts:
        reps = np.mean([r for _, r in parts], 0)
        lo, hi = np.quantile(reps, [0.025, 0.975])
        res["mean"] = {"value": float(np.mean([s["value"] for s, _ in parts])), "lo": float(lo), "hi": float(hi),
                       "of": len(parts)}
    if target.kind != "watermark":
        res["retain_on_target"] = _stat(*_per_prompt(prompt_ids, cra_v, is_t, n_p), n_boot, seed)[0]
        res["retain_kinds"] = other
    if rep_v is not None:
        res["replacement_accuracy"] = _stat(*_per_prompt(prompt_ids, rep_v, is_t, n_p), n_boot, seed)[0]
        res["alternative"] = kind_names(target.kind)[alternative][0]
    res["n_target_images"] = int(is_t.sum())
    res["n_other_images"] = int((~is_t).sum())
    return res


def set_metrics(pred: dict, labels: np.ndarray, prompt_ids: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """Judged accuracy per kind (and all three), garbage (object "none") and watermark rates."""
    from ..toyworld.judges import NONE

    labels = np.asarray(labels)
    prompt_ids = np.asarray(prompt_ids)
    n_p = int(prompt_ids.max()) + 1 if len(prompt_ids) else 0
    allm = np.ones(len(labels), bool)
    out = {}
    hits = []
    for i, k in enumerate(KINDS):
        v = (np.asarray(pred[k]) == labels[:, i]).astype(float)
        hits.append(v)
        out[k] = _stat(*_per_prompt(prompt_ids, v, allm, n_p), n_boot, seed)[0]
    out["all_three"] = _stat(*_per_prompt(prompt_ids, np.prod(hits, 0), allm, n_p), n_boot, seed)[0]
    out["garbage_rate"] = _stat(*_per_prompt(prompt_ids, (np.asarray(pred["object"]) == NONE["object"]).astype(float),
                                             allm, n_p), n_boot, seed)[0]
    out["watermark_rate"] = _stat(*_per_prompt(prompt_ids, (np.asarray(pred["watermark"]) == 1).astype(float),
                                               allm, n_p), n_boot, seed)[0]
    out["n_images"] = int(len(labels))
    out["n_prompts"] = n_p
    return out


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature rows ``a`` and ``b``: the same quantity as
    :func:`conceptgate.toyworld.judges.frechet_distance`, computed exactly through the samples' cross
    Gram matrix when there are fewer samples than feature dimensions (the benchmark's case: 768-d judge
    features, tens of images per set), which avoids two 768 x 768 eigendecompositions.

    ``tr sqrt(S1 S2)`` = nuclear norm of ``A B^T / sqrt((n-1)(m-1))`` for centred rows ``A``, ``B``
    (the non-zero eigenvalues of ``A^T A B^T B`` are those of ``(A B^T)(A B^T)^T``)."""
    from ..toyworld.judges import frechet_distance

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n, m, d = len(a), len(b), a.shape[1]
    if min(n, m) > d:
        return frechet_distance(a, b)
    mu1, mu2 = a.mean(0), b.mean(0)
    A, B = a - mu1, b - mu2
    tr1, tr2 = float((A * A).sum() / (n - 1)), float((B * B).sum() / (m - 1))
    tr_sqrt = float(np.linalg.svd(A @ B.T, compute_uv=False).sum() / math.sqrt((n - 1) * (m - 1)))
    return float(((mu1 - mu2) ** 2).sum() + tr1 + tr2 - 2 * tr_sqrt)


def fire_rates(gates, threshold: float = GATE_THRESHOLD) -> dict:
    """Fire rate (``gate > threshold``), mean gate and its range for one prompt category."""
    g = np.asarray(gates, np.float64)
    if len(g) == 0:
        return {"n": 0, "fire_rate": float("nan"), "mean_gate": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"n": int(len(g)), "fire_rate": float((g > threshold).mean()), "mean_gate": float(g.mean()),
            "min": float(g.min()), "max": float(g.max())}


# ---------------------------------------------------------------------------- generation plumbing

#: ``method -> fn(pipe, entries, prompts, gates) -> dict`` of extra pipeline kwargs for conditioning
#: erasers (e.g. ``negative_prompt_embeds`` built from Geom-Erasing's learned tokens, per row).
CONDITIONING_HANDLERS: dict[str, Callable] = {}
#: ``method -> fn(pipe, entries, prompts, seeds, gates, steps, cfg, sample) -> images`` for guidance
#: erasers: replaces the sampling call; ``sample(**extra_pipe_kwargs)`` runs the default sampler
#: (weight erasers hooked, conditioning kwargs applied) if the handler only wraps it.
GUIDANCE_HANDLERS: dict[str, Callable] = {}


def register_conditioning(method: str, fn: Callable) -> None:
    """Plug in how conditioning erasers of ``method`` enter generation (see CONDITIONING_HANDLERS)."""
    CONDITIONING_HANDLERS[method] = fn


def register_guidance(method: str, fn: Callable) -> None:
    """Plug in a guidance eraser's sampler for ``method`` (see GUIDANCE_HANDLERS)."""
    GUIDANCE_HANDLERS[method] = fn


class UnsupportedEraser(NotImplementedError):
    pass


def _latents(pipe, seeds):
    unet = pipe.unet
    shape = (4, unet.config.sample_size, unet.config.sample_size)
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    return torch.stack([torch.randn(shape, generator=g) for g in gens]).to(pipe.device, unet.dtype)


def _raw_gates(stack, encoder, prompts: Sequence[str], banks=None) -> torch.Tensor:
    """[P, E] gate values (before strength / enable), each entry with its own gate settings."""
    from ..adapters.gate import facilitated_transport
    from ..adapters.stack import BankCache

    banks = banks or BankCache(encoder)
    enc = encoder(list(prompts))
    out = torch.zeros(len(prompts), len(stack.entries))
    for i, e in enumerate(stack.entries):
        out[:, i], _ = facilitated_transport(enc, banks.get(e.eraser), e.gate)
    return out


def generate_with_stack(pipe, prompts: Sequence[str], seeds: Sequence[int], stack=None, steps: int = 25,
                        cfg: float = 5.0, batch: int = 48, negative_prompt=None, log=None):
    """Images (n,3,64,64 in [0,1]) and raw gates [n, E] (None without a stack).

    Same sampler and seeding as :func:`conceptgate.toyworld.generate` (one CPU generator per seed,
    batch independent). Weight erasers act through ``GatedPipeline`` (per-row gates); conditioning
    and guidance erasers through the registered handlers; an unregistered kind raises
    :class:`UnsupportedEraser`."""
    from ..adapters.diffusers_host import GatedPipeline
    from ..adapters.stack import EraserStack

    prompts, seeds = list(prompts), list(seeds)
    assert len(prompts) == len(seeds)
    entries = [e for e in (stack.entries if stack is not None else ()) if e.enabled]
    cond = [e for e in entries if e.eraser.kind == "conditioning"]
    guide = [e for e in entries if e.eraser.kind == "guidance"]
    if any(e.eraser.method == "geom" for e in cond) and "geom" not in CONDITIONING_HANDLERS:
        from ..adapters.geom import register_bench as register_geom

        register_geom()  # Geom-Erasing's negative-prompt tokens ship with the core
    for e in cond:
        if e.eraser.method not in CONDITIONING_HANDLERS:
            raise UnsupportedEraser(f"{e.eraser.name}: no conditioning handler for method {e.eraser.method!r} "
                                    "(register_conditioning)")
    if any(e.eraser.method == "abo" for e in guide) and "abo" not in GUIDANCE_HANDLERS:
        from ..adapters.abo_diffusers import register_bench

        register_bench()  # All-but-One guidance ships with the core
    for e in guide:
        if e.eraser.method not in GUIDANCE_HANDLERS:
            raise UnsupportedEraser(f"{e.eraser.name}: no guidance handler for method {e.eraser.method!r} "
                                    "(register_guidance)")
    if len({e.eraser.method for e in guide}) > 1:
        raise UnsupportedEraser("more than one guidance method in one stack")
    wstack = EraserStack(tuple(e for e in entries if e.eraser.kind == "weight"), stack.combine) if entries else None
    gated = GatedPipeline(pipe, wstack) if wstack is not None and len(wstack) else None
    encoder = None
    if entries:
        from ..adapters.diffusers_host import DiffusersTextEncoder
        from ..adapters.stack import BankCache

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
                extra.update(CONDITIONING_HANDLERS[e.eraser.method](pipe, [e], ps, g[:, idx] * e.strength))

            def sample(_ps=ps, _ss=ss, _neg=neg, **more):
                kw = dict(prompt=_ps, negative_prompt=_neg, num_inference_steps=steps, guidance_scale=cfg,
                          latents=_latents(pipe, _ss), output_type="pt", height=64, width=64)
                if "negative_prompt_embeds" in extra or "negative_prompt_embeds" in more:
                    kw.pop("negative_prompt")
                kw.update(extra)
                kw.update(more)
                call = gated if gated is not None else pipe
                return call(**kw).images.float().cpu().clamp(0, 1)

            if guide:
                idx = [j for j, x in enumerate(stack.entries) if x in guide]
                out = GUIDANCE_HANDLERS[guide[0].eraser.method](pipe, guide, ps, ss, g[:, idx], steps, cfg, sample)
            else:
                out = sample()
            images.append(out)
            if log:
                log(f"  generated {min(i + batch, len(prompts))}/{len(prompts)}")
    finally:
        if gated is not None:
            gated.__exit__()
    return torch.cat(images), all_gates


# ---------------------------------------------------------------------------------- evaluations


def evaluate_judges(judges, n_renders: int = 1000, n_agreement: int = 300, generated=None, checker=None) -> dict:
    """The judges' own accuracy on held-out renders (seed 987654, watermark on half), their "none"
    rate on garbage made from renders, and the hand-crafted checks' agreement (renders, and
    ``generated`` images when given)."""
    from ..toyworld import judges as J
    from ..toyworld import render as R

    imgs, lab = R.render_batch(n_renders, 987654, watermark_rate=0.5)
    pred = J.classify(judges, imgs)
    out = {"n_renders": n_renders, "accuracy_heldout_renders": J.accuracy_on_labels(pred, lab)}
    g = J.make_garbage(R.to_tensor(imgs[: min(400, n_renders)]), torch.Generator().manual_seed(1))
    pg = J.classify(judges, g)
    out["none_rate_on_garbage"] = {k: float((pg[k] == J.NONE[k]).mean()) for k in J.NONE}
    checker = checker or J.HandcraftedChecker()
    out["agreement_renders"] = J.agreement(judges, imgs[:n_agreement], checker)
    if generated is not None and len(generated):
        out["agreement_generated"] = J.agreement(judges, generated, checker)
    return out


def _set_renders(labels: np.ndarray, seed: int) -> np.ndarray:
    from ..toyworld import render as R

    lab = R.sample_labels(len(labels), seed, objects=labels[:, 0], styles=labels[:, 1], colours=labels[:, 2])
    return R.render_labels(lab)


def evaluate_stack(pipe, judges, stack=None, targets=None, tier: str | dict = "quick", *, prompt_sets=None,
                   generate_fn: Callable | None = None, gate_threshold: float = GATE_THRESHOLD,
                   alternatives: dict | None = None, seed: int = 0, log: Callable[[str], None] | None = None) -> dict:
    """Evaluate ``stack`` (an :class:`~conceptgate.adapters.stack.EraserStack`, or None for the base
    model) on the toy world and return a JSON-able dict of the metrics described in this module.

    ``targets``: concepts to score (strings such as ``"triangle"``, ``"zebra-lined"``, ``"watermark"``,
    or :class:`Target`); default: every concept of the stack's erasers (none for the base model:
    then only per-set accuracy / watermark / Fréchet). Pass the same targets for the base model to
    get its baseline UA/IRA/CRA. ``tier``: ``"quick"`` / ``"full"`` or a dict overriding
    :data:`TIERS` keys (``keyword``, ``synonym``, ``heldout``, ``per_target``, ``seeds``, ``steps``,
    ``cfg``, ``gate_prompts``, ``boot``, ``batch``). ``prompt_sets``: ``{name: [(prompt, (o,s,c))]}``
    to replace the built sets.

    Eraser kinds: weight erasers run through ``GatedPipeline``; conditioning / guidance erasers
    need :func:`register_conditioning` / :func:`register_guidance`, or pass
    ``generate_fn(prompts, seeds) -> images`` (or ``(images, gates[n, E])``) to replace generation
    entirely (e.g. a mechanism with its own sampler). ``alternatives``: ``{target concept: name}``
    overrides the replacement class read from eraser settings."""
    from ..toyworld.judges import classify, judge_features

    say = log or (lambda s: None)
    cfg = dict(TIERS[tier]) if isinstance(tier, str) else {**TIERS["quick"], **tier}
    t_start = time.time()
    # ---- targets and which eraser claims them
    resolved: list[Target] = []
    owners: dict = {}
    if targets is None and stack is not None:
        for e in stack.entries:
            for t in eraser_targets(e.eraser):
                if t not in resolved:
                    resolved.append(t)
    for t in targets or ():
        t = t if isinstance(t, Target) else resolve_concept(t)
        if t is not None and t not in resolved:
            resolved.append(t)
    alt_of: dict = {}
    if stack is not None:
        for e in stack.entries:
            for t in eraser_targets(e.eraser):
                key = (t.kind, t.index)
                owners.setdefault(key, []).append(e.eraser.name)
                a = eraser_alternative(e.eraser, t)
                if a is not None:
                    alt_of.setdefault(key, a)
    for concept, name in (alternatives or {}).items():
        t, a = resolve_concept(concept), resolve_concept(name)
        if t is not None and a is not None and a.kind == t.kind:
            alt_of[(t.kind, t.index)] = a.index
    sets = prompt_sets or build_prompt_sets(cfg, resolved, seed)
    n_seeds = int(cfg["seeds"])
    seeds = [SEED_BASE + k for k in range(n_seeds)]
    out = {
        "tier": tier if isinstance(tier, str) else "custom",
        "settings": {"sampler": f"DDIM {cfg['steps']} steps, CFG {cfg['cfg']}", "seeds": seeds,
                     "gate_threshold": gate_threshold, "bootstrap": f"{cfg['boot']} prompt-cluster resamples, 95% percentile",
                     "prompts_per_set": {k: len(v) for k, v in sets.items()}},
        "stack": None if stack is None else [
            {"name": e.eraser.name, "kind": e.eraser.kind, "method": e.eraser.method, "concepts": list(e.eraser.concepts),
             "enabled": e.enabled, "strength": e.strength, "gate": e.gate.to_dict()} for e in stack.entries],
        "sets": {}, "targets": [], "gates": {},
    }
    # ---- generation, judged per set
    per_set = {}
    for si, (name, items) in enumerate(sets.items()):
        prompts = [p for p, _ in items for _ in seeds]
        labels = np.array([lab for _, lab in items for _ in seeds], np.int64).reshape(-1, 3)
        pids = np.repeat(np.arange(len(items)), n_seeds)
        img_seeds = [s for _ in items for s in seeds]
        t0 = time.time()
        say(f"{name}: {len(items)} prompts x {n_seeds} seeds")
        if generate_fn is not None:
            res = generate_fn(prompts, img_seeds)
            imgs, gates = res if isinstance(res, tuple) else (res, None)
        else:
            imgs, gates = generate_with_stack(pipe, prompts, img_seeds, stack, steps=int(cfg["steps"]),
                                              cfg=float(cfg["cfg"]), batch=int(cfg["batch"]), log=say)
        dt = time.time() - t0
        pred = classify(judges, imgs)
        m = set_metrics(pred, labels, pids, int(cfg["boot"]), seed)
        fa = judge_features(judges, imgs)
        fr = judge_features(judges, _set_renders(labels, 4242 + si))
        fr2 = judge_features(judges, _set_renders(labels, 5353 + si))
        m["frechet"] = frechet(fa, fr)
        m["frechet_floor_renders"] = frechet(fr2, fr)
        m["seconds"] = dt
        if gates is not None and stack is not None:
            m["mean_gate_per_eraser"] = {e.eraser.name: float(gates[:, j].mean()) for j, e in enumerate(stack.entries)}
        out["sets"][name] = m
        per_set[name] = (pred, labels, pids, imgs)
    # ---- per-target erasure metrics
    for t in resolved:
        key = (t.kind, t.index)
        row = {"concept": t.concept, "keyword": t.keyword, "kind": t.kind, "index": t.index,
               "erasers": owners.get(key, []), "sets": {}}
        alt = alt_of.get(key)
        for name, (pred, labels, pids, _) in per_set.items():
            row["sets"][name] = target_metrics(pred, labels, pids, t, alt, int(cfg["boot"]), seed)
        out["targets"].append(row)
    # ---- gate profiles (text only)
    if stack is not None and len(stack.entries):
        from ..adapters.diffusers_host import DiffusersTextEncoder
        from ..adapters.stack import BankCache

        enc = DiffusersTextEncoder(pipe.tokenizer, pipe.text_encoder)
        banks = BankCache(enc)
        for j, e in enumerate(stack.entries):
            from ..adapters.stack import EraserStack

            one = EraserStack((e,))
            prof = {}
            for t in eraser_targets(e.eraser) or [None]:
                if t is None:
                    continue
                cats = gate_prompt_sets(t, int(cfg["gate_prompts"]), seed)
                for cat, ps in cats.items():
                    g = _raw_gates(one, enc, ps, banks)[:, 0] if ps else torch.zeros(0)
                    prof.setdefault(cat, []).extend(g.tolist())
            out["gates"][e.eraser.name] = {
                "threshold": gate_threshold, "rule": e.gate.rule,
                **{cat: fire_rates(v, gate_threshold) for cat, v in prof.items()}}
    out["seconds"] = time.time() - t_start
    out["_images"] = {name: v[3] for name, v in per_set.items()}  # dropped before JSON
    return out


def base_bars(base: dict) -> dict:
    """The issue's base-model bars, measured on the keyword set (prompts naming object, style and
    colour, never the watermark): ``{kind or "watermark_rate": {value, lo, hi, n, bar, met}}``."""
    kw = base["sets"].get("keyword")
    if kw is None:
        return {}
    res = {}
    for k in KINDS + ("watermark_rate",):
        v = kw[k]
        res[k] = {**v, "bar": BARS[k], "met": v["value"] >= BARS[k]}
    return res


# ---------------------------------------------------------------------------------- UCE / RECE

#: The on-the-fly erasers of the benchmark and the demo: an object with UCE, a style with RECE,
#: each guided to the toy world's neutral anchor and preserving the other names of its kind.
DEFAULT_EDITS = (
    dict(method="uce", concept="triangle", guide="shape", concept_type="object"),
    dict(method="rece", concept="striped", guide="plain", concept_type="style"),
)


def make_edit_erasers(pipe, edits=DEFAULT_EDITS, out_dir: str | None = None, log=None) -> list:
    """UCE / RECE edits on ``pipe``'s current weights, as gated ConceptGate erasers (and files in
    ``out_dir`` when given). Preserve set: the other keywords of the same kind."""
    from ..adapters.uce_rece import DiffusersEditHost, compute_edit, save_edit

    host = DiffusersEditHost.from_pipeline(pipe)
    erasers = []
    for ed in edits:
        t = resolve_concept(ed["concept"])
        preserve = tuple(v[0] for i, v in kind_names(t.kind).items() if i != t.index) if t and t.kind in KINDS else ()
        t0 = time.time()
        o = compute_edit(host, method=ed["method"], concepts=(ed["concept"],), guide=ed.get("guide"),
                         preserve=preserve, concept_type=ed.get("concept_type", "object"), cache=None,
                         name=f"{ed['method']}-{ed['concept']}")
        if out_dir:
            save_edit(o, os.path.join(out_dir, f"{o.eraser.name}.safetensors"))
        if log:
            log(f"{o.eraser.name}: {ed['method'].upper()} {ed['concept']!r} -> {ed.get('guide')!r}, rank {o.report['rank']}, "
                f"{time.time() - t0:.2f} s")
        erasers.append(o.eraser)
    return erasers


# ------------------------------------------------------------------------------------ the report


def _f(s, pct=True):
    if s is None:
        return "–"
    v = s["value"] if isinstance(s, dict) else s
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if not pct:
        return f"{v:.1f}"
    if isinstance(s, dict) and "lo" in s and not math.isnan(s["lo"]):
        return f"{100 * v:.0f} [{100 * s['lo']:.0f}, {100 * s['hi']:.0f}]"
    return f"{100 * v:.0f}"


def render_markdown(result: dict) -> str:
    from .report import table

    lines = []
    j = result.get("judges")
    cfg = result["tier_settings"]
    base = result["configs"][0]["result"]
    lines.append(f"Tier **{result['tier']}**: DDIM {cfg['steps']} steps, CFG {cfg['cfg']} (the toy model's default "
                 f"sampler), seeds {SEED_BASE}..{SEED_BASE + cfg['seeds'] - 1} for every prompt, 64x64; "
                 f"prompts per set {base['settings']['prompts_per_set']}; 95% intervals: {base['settings']['bootstrap']}. "
                 f"Total {result['seconds']:.0f} s. Percentages; intervals in brackets.")
    if j:
        a = j["accuracy_heldout_renders"]
        lines.append("")
        lines.append(f"**Judges** on {j['n_renders']} held-out renders: object {100 * a['object']:.1f}%, style "
                     f"{100 * a['style']:.1f}%, colour {100 * a['colour']:.1f}%, watermark {100 * a['watermark']:.1f}%; "
                     f"'none' on garbage: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in j["none_rate_on_garbage"].items())
                     + f". Hand-crafted checks vs learned judges: object {100 * j['agreement_renders']['object_agreement']:.1f}%, "
                     f"watermark {100 * j['agreement_renders']['watermark_agreement']:.1f}% on "
                     f"{j['agreement_renders']['n']} renders" +
                     (f"; object {100 * j['agreement_generated']['object_agreement']:.1f}%, watermark "
                      f"{100 * j['agreement_generated']['watermark_agreement']:.1f}% on {j['agreement_generated']['n']} "
                      "base-model generations (keyword set)." if "agreement_generated" in j else "."))
    bars = result.get("bars") or {}
    if bars:
        lines.append("")
        lines.append("**Base-model bars** (issue 3; base model, keyword prompts naming object, style and colour, "
                     "none mentions the watermark):")
        lines.append("")
        rows = []
        for k in ("object", "style", "colour", "watermark_rate"):
            b = bars[k]
            rows.append({"what": k.replace("_", " ") + (" accuracy" if k in KINDS else ""), "bar": f">= {100 * b['bar']:.0f}%",
                         "measured": _f(b), "n": b["n"], "status": "met" if b["met"] else "**missed**"})
        lines.append(table(rows, [("what", "what"), ("bar", "bar"), ("measured", "measured"), ("n", "images"),
                                  ("status", "status")]))
    # per-set generation table
    lines.append("")
    lines.append("**Generation** (judged accuracy of what each prompt names; garbage = object judge says 'none'; "
                 "FD = Fréchet distance in judge features vs renders of the same labels, with the render-vs-render "
                 "floor at the same n):")
    lines.append("")
    rows = []
    for c in result["configs"]:
        for sname, m in c["result"]["sets"].items():
            rows.append({"config": c["name"], "set": sname, "n": m["n_images"], "object": _f(m["object"]),
                         "style": _f(m["style"]), "colour": _f(m["colour"]), "all": _f(m["all_three"]),
                         "garbage": _f(m["garbage_rate"]), "wm": _f(m["watermark_rate"]),
                         "fd": f"{m['frechet']:.1f} ({m['frechet_floor_renders']:.1f})", "s": f"{m['seconds']:.0f}"})
    lines.append(table(rows, [("config", "config"), ("set", "prompts"), ("n", "images"), ("object", "object"),
                              ("style", "style"), ("colour", "colour"), ("all", "all three"), ("garbage", "garbage"),
                              ("wm", "watermark"), ("fd", "FD (floor)"), ("s", "gen s")]))
    # erasure table
    rows = []
    for ci, c in enumerate(result["configs"]):
        for t in c["result"]["targets"]:
            if ci > 0 and not t["erasers"]:
                continue  # an eraser config is listed on its own targets (all are in the JSON)
            for sname, m in t["sets"].items():
                rows.append({"config": c["name"], "target": f"{t['keyword']} ({t['kind']})", "set": sname,
                             "ua": _f(m["ua"]), "ira": _f(m.get("ira")), "cra": _f(m.get("cra")), "mean": _f(m.get("mean")),
                             "garbage": _f(m["garbage_rate"]), "keep": _f(m.get("retain_on_target")),
                             "repl": (_f(m["replacement_accuracy"]) + f" ({m['alternative']})") if "replacement_accuracy" in m else "–",
                             "n": m["n_target_images"]})
    if rows:
        lines.append("**Erasure** (UnlearnCanvas metrics per target and prompt set. UA: target-prompt images judged as "
                     "another *real* class of the target's kind ('none' is not a success; garbage reported apart); "
                     "IRA: same-kind accuracy on prompts naming other concepts; CRA: the other kinds' accuracy on "
                     "prompts not naming the target; mean = (UA+IRA+CRA)/3; keep: the other kinds' accuracy on the "
                     "target prompts; replacement: target images judged as the eraser's named alternative. The base "
                     "model's rows are the no-erasure baseline; each eraser is listed on its own target, its effect "
                     "on the other target is in the JSON):")
        lines.append("")
        lines.append(table(rows, [("config", "config"), ("target", "target"), ("set", "prompts"), ("n", "target imgs"),
                                  ("ua", "UA"), ("ira", "IRA"), ("cra", "CRA"), ("mean", "mean"),
                                  ("garbage", "garbage"), ("keep", "keep"), ("repl", "replacement")]))
    rows = []
    for c in result["configs"]:
        for name, g in c["result"]["gates"].items():
            r = {"config": c["name"], "eraser": name}
            for cat in ("target", "synonym", "neighbour", "unrelated"):
                v = g.get(cat)
                r[cat] = "–" if not v or not v["n"] else f"{100 * v['fire_rate']:.0f}% ({v['mean_gate']:.2f})"
            rows.append(r)
    if rows:
        th = result["configs"][-1]["result"]["settings"]["gate_threshold"]
        lines.append(f"**Gates** (text only; fire rate = share of prompts with gate > {th}, mean gate in brackets; "
                     "target/synonym should fire, neighbour/unrelated should not):")
        lines.append("")
        lines.append(table(rows, [("config", "config"), ("eraser", "eraser"), ("target", "target"),
                                  ("synonym", "synonym"), ("neighbour", "neighbour"), ("unrelated", "unrelated")]))
    if result.get("notes"):
        lines.append("")
        lines.extend(f"- {n}" for n in result["notes"])
    return "\n".join(lines)


def _strip_images(d):
    if isinstance(d, dict):
        return {k: _strip_images(v) for k, v in d.items() if k != "_images"}
    if isinstance(d, list):
        return [_strip_images(v) for v in d]
    return d


def _manifest_note() -> str:
    """What the committed weights' own evaluation says (toyworld/weights/MANIFEST.json), for the bars note."""
    import json

    from ..toyworld import WEIGHTS_DIR

    try:
        with open(os.path.join(WEIGHTS_DIR, "MANIFEST.json")) as f:
            m = json.load(f)
        acc = m["evaluation"]["generation"]["judged_accuracy"]
        steps, run = [], m
        while run:
            steps.append(run.get("stage_stats", {}).get("unet", {}).get("steps_run"))
            run = run.get("continued_from")
    except (OSError, KeyError, ValueError):
        return "toyworld/weights/MANIFEST.json has no evaluation to compare with."
    return (f"The committed weights' own evaluation (toyworld/weights/MANIFEST.json, all 258 captions x 2 seeds, UNet "
            f"steps per training run {' + '.join(str(s) for s in reversed(steps))}): object {100 * acc['object']:.1f}%, "
            f"style {100 * acc['style']:.1f}%, colour {100 * acc['colour']:.1f}%.")


def _notes(result: dict) -> list[str]:
    bars, notes = result.get("bars") or {}, []
    missed = [k for k, v in bars.items() if not v["met"]]
    if missed:
        notes.append("Base-model bars missed: " + ", ".join(
            f"{k.replace('_', ' ')} {100 * bars[k]['value']:.1f}% (95% interval {100 * bars[k]['lo']:.0f}-"
            f"{100 * bars[k]['hi']:.0f}%) < {100 * bars[k]['bar']:.0f}%" for k in missed)
            + ". " + _manifest_note())
    else:
        notes.append("All base-model bars met on this tier's prompts.")
    j = result.get("judges") or {}
    ag = j.get("agreement_generated")
    if ag:
        notes.append(f"The hand-crafted checks (fitted on clean renders) agree with the learned judges on "
                     f"{100 * j['agreement_renders']['object_agreement']:.0f}% / "
                     f"{100 * j['agreement_renders']['watermark_agreement']:.0f}% (object / watermark) of renders but "
                     f"only {100 * ag['object_agreement']:.0f}% / {100 * ag['watermark_agreement']:.0f}% of base-model "
                     "generations: generated silhouettes and glyphs are softer than renders, so the hand-crafted "
                     "checks are a sanity check on renders, not a second judge of generations.")
    notes.append("UCE/RECE erasers are computed on the fly on the committed model (guide = the neutral anchor of their "
                 "kind, preserve = the other keywords of that kind) and applied through GatedPipeline with the "
                 "official Facilitated-Transport gate (no threshold): the gate's cosine half is high for short "
                 "in-domain prompts, hence the high unrelated fire rates at 0.5.")
    if result.get("tier") == "quick":
        notes.append("Quick tier: few prompts per set; intervals are wide. `--full` for release numbers.")
    rt = result.get("runtime")
    if rt:
        notes.append(f"Runtime: {rt['images']} images in {rt['generation_seconds']:.0f} s of generation "
                     f"({rt['seconds_per_image']:.2f} s/image, {rt['torch_threads']} torch thread(s)), "
                     f"{result['seconds']:.0f} s in all; 1-minute load average {rt['load_average_start']:.1f} at the "
                     f"start and {rt['load_average_end']:.1f} at the end (other jobs shared these 2 cores).")
    return notes


def run_quality(args) -> int:
    from ..adapters.stack import EraserStack
    from ..toyworld import load_judges, load_pipeline
    from .report import ROOT, write_section

    if getattr(args, "from_json", None):
        return _rewrite_from_json(args.from_json)
    t0 = time.time()
    tier = "full" if args.full else "quick"
    cfg = dict(TIERS[tier])
    if getattr(args, "seeds", None):
        cfg["seeds"] = int(args.seeds)
    if getattr(args, "steps", None):
        cfg["steps"] = int(args.steps)
    if getattr(args, "threads", None):
        torch.set_num_threads(int(args.threads))
    load_start = os.getloadavg()[0]
    torch.manual_seed(0)
    say = print
    pipe, judges = load_pipeline(), load_judges()
    configs = [("base", None)]
    if not args.no_edits:
        erasers = make_edit_erasers(pipe, log=say)
        for e in erasers:
            configs.append((e.name, EraserStack().with_eraser(e)))
        if args.full and len(erasers) > 1:
            st = EraserStack()
            for e in erasers:
                st = st.with_eraser(e)
            configs.append(("+".join(e.name for e in erasers), st))
    for m in args.stack or []:
        configs.append((os.path.basename(m), EraserStack.from_manifest(m)))
    targets = []
    for _, st in configs:
        for e in (st.entries if st is not None else ()):
            for t in eraser_targets(e.eraser):
                if t not in targets:
                    targets.append(t)
    results = []
    for name, st in configs:
        say(f"== {name}")
        r = evaluate_stack(pipe, judges, st, targets=targets, tier=cfg, log=say)
        r["tier"] = tier
        results.append({"name": name, "result": r})
    base = results[0]["result"]
    say("== judges")
    judges_res = evaluate_judges(judges, cfg["judge_renders"], cfg["agreement_renders"],
                                 generated=base["_images"].get("keyword"))
    bars = base_bars(base)
    n_img = sum(m["n_images"] for r in results for m in r["result"]["sets"].values())
    gen_s = sum(m["seconds"] for r in results for m in r["result"]["sets"].values())
    result = {"tier": tier, "tier_settings": cfg, "judges": judges_res, "bars": bars,
              "configs": _strip_images(results), "seconds": time.time() - t0,
              "runtime": {"images": n_img, "generation_seconds": gen_s, "seconds_per_image": gen_s / max(n_img, 1),
                          "torch_threads": torch.get_num_threads(), "load_average_start": load_start,
                          "load_average_end": os.getloadavg()[0]}}
    result["notes"] = _notes(result)
    body = render_markdown(result)
    json_path = args.json or os.path.join(ROOT, "benchmarks.json")
    cmd = COMMAND + (" --full" if args.full else "") + "".join(f" --stack {s}" for s in args.stack or [])
    cmd += "".join(f" --{k} {getattr(args, k)}" for k in ("seeds", "steps", "threads") if getattr(args, k, None))
    result["command"] = cmd
    write_section("quality" if tier == "quick" else "quality-full",
                  f"Quality on the toy world ({tier} tier)", body, cmd, data=result, json_path=json_path)
    print(body)
    print(f"\nquality benchmark: {time.time() - t0:.0f} s")
    return 0


def _rewrite_from_json(path: str) -> int:
    """Re-render the BENCHMARKS.md section from a saved result (no generation)."""
    import json

    from .report import write_section

    with open(path) as f:
        data = json.load(f)
    for key in ("quality", "quality-full"):
        if key in data:
            result = data[key]
            result["bars"] = base_bars(result["configs"][0]["result"])
            result["notes"] = _notes(result) + [f"Re-rendered from the JSON of the run measured {result.get('measured')}."]
            if result.get("runtime"):
                torch.set_num_threads(int(result["runtime"]["torch_threads"]))
            body = render_markdown(result)
            write_section(key, f"Quality on the toy world ({result['tier']} tier)", body,
                          result.get("command", COMMAND), data=result, json_path=path)
            print(body)
    return 0


def add_quality_cli(sub):
    s = sub.add_parser("quality", help="erasure quality on the toy world (UA/IRA/CRA, gates, judges) -> BENCHMARKS.md")
    s.add_argument("--full", action="store_true", help="release tier (more prompts; slow on CPU)")
    s.add_argument("--stack", action="append", help="a stack manifest (.json) to evaluate as well (repeatable)")
    s.add_argument("--no-edits", action="store_true", help="skip the on-the-fly UCE/RECE erasers")
    s.add_argument("--seeds", type=int, default=None, help="override seeds per prompt")
    s.add_argument("--steps", type=int, default=None, help="override DDIM steps (stated in the output)")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    s.add_argument("--from-json", default=None, help="only re-render the BENCHMARKS.md section from a saved JSON")
    s.add_argument("--json", default=None, help="also write the numbers here (default: benchmarks.json)")
    s.set_defaults(func=run_quality)
    return s

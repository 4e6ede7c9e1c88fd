"""The quality bench's prompt sets on the toy world: targets resolved through the toy vocabulary, balanced
keyword / synonym / held-out sets, and the text-only sets of a gate profile."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

KINDS = ("object", "style", "colour")

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


def add_target(targets: list, t: Target | None) -> None:
    """Append ``t`` unless a target of the same class is there: an in-context edit names its keyword and its
    synonyms (triangle, trigon), one target under the first name."""
    if t is not None and all((t.kind, t.index) != (u.kind, u.index) for u in targets):
        targets.append(t)


def eraser_targets(eraser) -> list[Target]:
    """The toy classes an eraser's concepts name, one target per class."""
    out = []
    for c in eraser.concepts:
        add_target(out, resolve_concept(c))
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

"""Captions of the toy world: templates, synonyms, held-out paraphrases and held-out pairs.

Everything a test or a benchmark needs is exposed as plain data: ``OBJECT_NAMES``, ``STYLE_NAMES``,
``COLOUR_NAMES`` (index -> list of names, the first is the keyword), ``TRAIN_TEMPLATES``,
``HELDOUT_TEMPLATES``, ``HELDOUT_PAIRS`` (object index, style index) and the anchor vocabulary.
The watermark is never mentioned in any caption.
"""

from __future__ import annotations

import numpy as np

from .render import COLOURS, OBJECTS, STYLES

# index -> names; names[0] is the keyword, names[1:] are synonyms (all seen in training).
OBJECT_NAMES = {
    0: ["circle", "disc"],
    1: ["square", "box"],
    2: ["triangle", "trigon"],
    3: ["star", "pentagram"],
    4: ["cross", "plus sign"],
    5: ["ring", "donut"],
    6: ["heart", "valentine"],
    7: ["crescent", "moon"],
}
STYLE_NAMES = {
    0: ["flat", "solid"],
    1: ["striped", "zebra-lined"],
    2: ["checkered", "chessboard"],
    3: ["polka-dot", "dotted"],
    4: ["gradient", "glowing"],
    5: ["outlined", "contoured"],
}
COLOUR_NAMES = {i: [c] for i, c in enumerate(COLOURS)}

# Neutral anchors.  "a shape" stands for any object; "plain" renders the flat style, so an eraser
# that maps a style onto "plain" has a measurable replacement.
ANCHOR_OBJECT = "shape"
ANCHOR_STYLE = "plain"
ANCHOR_STYLE_INDEX = 0  # "plain" is rendered as the flat style

KEYWORDS = {
    "object": [v[0] for v in OBJECT_NAMES.values()],
    "style": [v[0] for v in STYLE_NAMES.values()],
    "colour": [v[0] for v in COLOUR_NAMES.values()],
}
SYNONYMS = {
    "object": {v[0]: v[1:] for v in OBJECT_NAMES.values()},
    "style": {v[0]: v[1:] for v in STYLE_NAMES.values()},
}

# {o}=object name, {s}=style name, {c}=colour name.  Templates that leave out a field let that
# attribute vary freely in the image (the model must learn "unspecified" as "any").
TRAIN_TEMPLATES = [
    "a {c} {o} in {s} style",
    "a {s} {c} {o}",
    "{s} drawing of a {c} {o}",
    "a picture of a {c} {o}, {s}",
    "a {c} {o}",
    "a {o} in {s} style",
    "a {s} {o}",
    "a {o}",
    "{s} style",
    "a {c} shape in {s} style",
]
# Paraphrases never seen in training (generalisation / leakage of erasure to new wordings).
HELDOUT_TEMPLATES = [
    "an illustration showing a {o} coloured {c} with a {s} texture",
    "{c} {o}, rendered {s}",
    "a {s} looking {o} painted {c}",
]

# About 10% of the 48 object x style pairs never appear in the generator's training data; each object
# and each style is held out at most once.
HELDOUT_PAIRS = [(0, 3), (2, 5), (3, 1), (5, 4), (7, 2)]

# Fields each template names.
def template_fields(template: str) -> set:
    return {f for f in ("o", "s", "c") if "{" + f + "}" in template}


def fill(template: str, obj: int | None, sty: int | None, col: int | None, syn: bool = False,
         rng: np.random.Generator | None = None) -> str:
    """Fill a template with keyword names (or, with ``syn=True``, names drawn from all synonyms)."""
    rng = rng or np.random.default_rng(0)

    def name(table, i):
        names = table[i]
        return names[int(rng.integers(0, len(names)))] if syn else names[0]

    kw = {}
    if "{o}" in template:
        kw["o"] = name(OBJECT_NAMES, obj)
    if "{s}" in template:
        kw["s"] = name(STYLE_NAMES, sty)
    if "{c}" in template:
        kw["c"] = name(COLOUR_NAMES, col)
    return template.format(**kw)


def prompt(obj: int, sty: int, col: int, template: str = TRAIN_TEMPLATES[0], name_index=(0, 0)) -> str:
    """A benchmark prompt naming object, style and colour with chosen names (0 = keyword)."""
    return template.format(o=OBJECT_NAMES[obj][name_index[0]], s=STYLE_NAMES[sty][name_index[1]],
                           c=COLOUR_NAMES[col][0])


def training_captions(labels: dict, rng: np.random.Generator, p_drop: float = 0.0,
                      p_anchor: float = 0.04, return_fields: bool = False):
    """Random training captions for rendered labels: a training template, random synonyms, empty
    caption with probability ``p_drop`` (classifier-free guidance), and the anchor words
    ("a shape", "plain") with probability ``p_anchor`` where they are true.

    With ``return_fields`` also returns an (n, 3) int array of the (object, style, colour) each
    caption states, -1 where it leaves the attribute free (used by the contrastive loss)."""
    n = len(labels["object"])
    out = []
    fields = np.full((n, 3), -1, np.int64)
    for i in range(n):
        if rng.random() < p_drop:
            out.append("")
            continue
        o, s, c = int(labels["object"][i]), int(labels["style"][i]), int(labels["colour"][i])
        t = TRAIN_TEMPLATES[int(rng.integers(0, len(TRAIN_TEMPLATES)))]
        r = rng.random()
        if r < p_anchor and "{o}" in t:
            t = t.replace("{o}", ANCHOR_OBJECT)
        elif r < 2 * p_anchor and s == ANCHOR_STYLE_INDEX and "{s}" in t:
            t = t.replace("{s}", ANCHOR_STYLE)
            fields[i, 1] = s
        f = template_fields(t)
        fields[i, 0] = o if "o" in f else -1
        if "s" in f:
            fields[i, 1] = s
        fields[i, 2] = c if "c" in f else -1
        out.append(fill(t, o, s, c, syn=True, rng=rng))
    return (out, fields) if return_fields else out


def concept_templates(concept: str, n: int = 48, seed: int = 0) -> list[str]:
    """Prompts that put ``concept`` in context, with ``{}`` where the concept goes.

    The concept's kind (object or style, by its name or synonym) picks training templates that name
    that field; the other fields are filled with random names (synonyms included). Used by
    ``train spm --templates toy`` so that a membrane learns the concept inside full prompts."""
    key = concept.strip().lower()
    slot = None
    for table, field in ((OBJECT_NAMES, "{o}"), (STYLE_NAMES, "{s}")):
        if any(key == name for names in table.values() for name in names):
            slot = field
    if slot is None:
        raise ValueError(f"{concept!r} is not an object or style of the toy world")
    rng = np.random.default_rng(seed)
    pool = [t for t in TRAIN_TEMPLATES if slot in t]
    out = []
    while len(out) < n:
        t = pool[len(out) % len(pool)].replace(slot, "\x00")
        o, s, c = (int(rng.integers(0, len(tab))) for tab in (OBJECT_NAMES, STYLE_NAMES, COLOUR_NAMES))
        out.append(fill(t, o, s, c, syn=True, rng=rng).replace("\x00", "{}"))
    return out


def all_training_names() -> list[str]:
    names = [n for v in OBJECT_NAMES.values() for n in v] + [n for v in STYLE_NAMES.values() for n in v]
    return names + [v[0] for v in COLOUR_NAMES.values()] + [ANCHOR_OBJECT, ANCHOR_STYLE]


assert len(OBJECT_NAMES) == len(OBJECTS) and len(STYLE_NAMES) == len(STYLES)

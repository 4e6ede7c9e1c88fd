"""Prompt contexts the toy world provides to the trainers (registered in the core's registry on import)."""

from __future__ import annotations

from . import captions as C


def abo_prompt_pairs(concept: str, alternative: str) -> list[tuple[str, str]]:
    """All-but-One's ``toy`` prompt context: the toy world's training templates that name an object (or
    a style, when the concept is a toy style), every colour and style (or object) filled in, the concept
    by its keyword and synonyms (or ``concept`` itself if it is not in the toy vocabulary), and the same
    template with the alternative's keyword."""

    def lookup(word):
        w = word.strip().lower()
        for kind, table in (("o", C.OBJECT_NAMES), ("s", C.STYLE_NAMES)):
            for names in table.values():
                if w in names:
                    return kind, names
        return None, [word]

    kind, names = lookup(concept)
    kind = kind or "o"
    alt_kind, alt_names = lookup(alternative) if alternative.strip() else (kind, [""])
    alt = alt_names[0]
    if alt_kind not in (None, kind):
        raise ValueError(f"the toy context swaps {concept!r} for {alternative!r} in the same template, but one is "
                         "an object and the other a style; use --context generic or bare")
    other = "s" if kind == "o" else "o"
    other_names = [v[0] for v in (C.STYLE_NAMES if other == "s" else C.OBJECT_NAMES).values()]
    colours = [v[0] for v in C.COLOUR_NAMES.values()]
    pairs = []
    for template in C.TRAIN_TEMPLATES:
        fields = C.template_fields(template)
        if kind not in fields:
            continue
        for name in names:
            for col in (colours if "c" in fields else [None]):
                for oth in (other_names if other in fields else [None]):
                    kw = {"c": col, other: oth}
                    e = template.format(**{**kw, kind: name})
                    a = template.format(**{**kw, kind: alt}) if alt else ""
                    pairs.append((e, a))
    return pairs


def _slot(concept: str) -> str | None:
    w = concept.strip().lower()
    for slot, table in (("o", C.OBJECT_NAMES), ("s", C.STYLE_NAMES), ("c", C.COLOUR_NAMES)):
        if any(w in names for names in table.values()):
            return slot
    return None


def gate_synonyms(concept: str) -> list[str]:
    """The toy vocabulary's other names of ``concept`` (what a user would list as synonyms)."""
    w = concept.strip().lower()
    for table in (C.OBJECT_NAMES, C.STYLE_NAMES):
        for names in table.values():
            if w in names:
                return [n for n in names if n != w]
    return []


def gate_carriers(rng, n: int, concept: str) -> list[str]:
    """Calibration carriers of the ``context`` gate in the toy world: toy captions with ``{}`` in the
    concept's slot (object, style, colour), or appended for a concept the captions never name (the
    implicit watermark)."""
    slot, out = _slot(concept), []
    pool = [t for t in C.TRAIN_TEMPLATES if slot and "{" + slot + "}" in t] or C.TRAIN_TEMPLATES
    for i in range(n):
        kw = {"o": C.OBJECT_NAMES[int(rng.integers(8))][int(rng.integers(2))],
              "s": C.STYLE_NAMES[int(rng.integers(6))][int(rng.integers(2))],
              "c": C.COLOUR_NAMES[int(rng.integers(6))][0]}
        if slot:
            kw[slot] = "\x00"
            out.append(pool[i % len(pool)].format(**kw).replace("\x00", "{}"))
        else:
            out.append(pool[i % len(pool)].format(**kw) + (" with a {}", ", {}", " and a {}")[i % 3])
    return out


def gate_neutral_prompts(rng, n: int) -> list[str]:
    """Toy captions (every template, random fillings) for the gate's neutral pool."""
    out = []
    for i in range(n):
        t = C.TRAIN_TEMPLATES[i % len(C.TRAIN_TEMPLATES)]
        out.append(t.format(o=C.OBJECT_NAMES[int(rng.integers(8))][int(rng.integers(2))],
                            s=C.STYLE_NAMES[int(rng.integers(6))][int(rng.integers(2))],
                            c=C.COLOUR_NAMES[int(rng.integers(6))][0]))
    return out

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

"""Prompts in context, shared by the mechanisms that learn or solve on sentences rather than bare words
(the All-but-One adapter's training pairs, the templated UCE/RECE erase set).

A *context* names where the sentences come from: ``bare`` (the word alone), ``generic``
(:data:`GENERIC_TEMPLATES`, for any model) or one a model world registered in the core's registry
(:func:`~conceptgate.adapters.registry.register_prompt_context`; the toy world registers ``toy``, its
own caption templates)."""

from __future__ import annotations

from .registry import prompt_contexts

#: Templates for models other than the toy world ("{}" is the concept).
GENERIC_TEMPLATES = (
    "{}", "a {}", "a photo of a {}", "a picture of a {}", "a painting of a {}", "a drawing of a {}",
    "an illustration of a {}", "a close-up photo of a {}", "a {} in the scene", "a detailed image of a {}",
)


def prompt_pairs(concept: str, alternative: str, context: str) -> list[tuple[str, str]]:
    """(c_e, c_a) prompt pairs: the same template with the concept and with the alternative.

    ``toy``: the toy world's caption templates (registered by ``conceptgate.toyworld``, see
    :func:`conceptgate.toyworld.contexts.abo_prompt_pairs`); any other registered context;
    ``generic``: :data:`GENERIC_TEMPLATES`; ``bare``: the concept alone. With an empty alternative
    ``c_a = ""``."""
    if context == "bare":
        pairs = [(concept, alternative)]
    elif context == "generic":
        pairs = [(t.format(concept), t.format(alternative) if alternative else "") for t in GENERIC_TEMPLATES]
    else:
        contexts = prompt_contexts()
        if context not in contexts:
            raise ValueError(f"the {context!r} context's prompts are not available here: known contexts are "
                             f"{', '.join(sorted(set(contexts) | {'generic', 'bare'}))}")
        pairs = contexts[context](concept, alternative)
    out, seen = [], set()
    for e, a in pairs:
        a = a if alternative.strip() else ""
        if e not in seen:
            seen.add(e)
            out.append((e, a))
    return out


def sentence_pairs(concept: str, replacement: str, context: str) -> list[tuple[str, str]]:
    """Like :func:`prompt_pairs`, but an empty ``replacement`` removes the concept from the sentence
    ("a red triangle in striped style" -> "a red in striped style") instead of giving ``""``: the pairs
    stay the same sentence, token for token, up to the concept."""
    if replacement.strip():
        return prompt_pairs(concept, replacement, context)
    hole = "\x00"  # a placeholder no template or vocabulary contains
    return [(e, " ".join(a.replace(hole, " ").split())) for e, a in prompt_pairs(concept, hole, context)]

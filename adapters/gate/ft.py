"""The published gate, SPM's *Facilitated Transport*, kept exactly as published (rule ``ft``; its halves
``cos`` and ``tokens``).

The published gate is SPM's *Facilitated Transport* (Lyu et al., CVPR 2024, ``infer_spm.py``)::

    s_cos(p, c) = cos(flatten(E(p)), flatten(E(c)))        # over all 77 x D values, padding included
    s_tok(p, c) = |T(p) & T(c)| / |T(c)|                    # special tokens excluded
    gamma(p, c) = max(s_cos, s_tok)
    m(p)        = f * max over the eraser's concepts of gamma(p, c)

``E`` is the text encoder output exactly as the sampler feeds it to the UNet (so CLIP skip and the
host's padding apply), truncated or padded to one 77-token window. There is no threshold or clip in
the official rule; :class:`GateSettings` adds optional, clearly non-official calibration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .settings import GateSettings
from .text import EncodedText, TextEncoderLike, to_window


def cosine_scores(prompt_hidden: torch.Tensor, concept_hidden: torch.Tensor) -> torch.Tensor:
    """[P, C] cosine similarities of flattened 77-token windows (fp32)."""
    p = to_window(prompt_hidden).flatten(1).float()
    c = to_window(concept_hidden).flatten(1).float().to(p.device)
    p = p / p.norm(dim=1, keepdim=True).clamp_min(1e-12)
    c = c / c.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return p @ c.T


def token_scores(prompt_tokens: Sequence[set[int]], concept_tokens: Sequence[set[int]]) -> torch.Tensor:
    """[P, C] fraction of each concept's tokens present in each prompt."""
    out = torch.zeros(len(prompt_tokens), len(concept_tokens))
    for i, pt in enumerate(prompt_tokens):
        for j, ct in enumerate(concept_tokens):
            if ct:
                out[i, j] = len(pt & ct) / len(ct)
    return out


@dataclass
class ConceptBank:
    """The encoded concepts of one eraser, computed once with the host's own text encoder."""

    concepts: list[str]
    hidden: torch.Tensor
    tokens: list[set[int]]

    @classmethod
    def encode(cls, concepts: Sequence[str], encoder: TextEncoderLike) -> "ConceptBank":
        enc = encoder(list(concepts))
        return cls(list(concepts), to_window(enc.hidden).detach(), enc.tokens)


def facilitated_transport(
    prompt: EncodedText, bank: ConceptBank, settings: GateSettings | None = None, tokens_known: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate per prompt [P] for one eraser, and the raw per-concept scores [P, C].

    ``tokens_known=False`` when the host gave hidden states without token ids (the token half of
    the rule is then skipped; the caller should tell the user).
    """
    settings = settings or GateSettings()
    n = prompt.hidden.shape[0]
    if settings.rule == "always":
        ones = torch.ones(n)
        return ones, ones[:, None].expand(n, len(bank.concepts))
    s_cos = cosine_scores(prompt.hidden, bank.hidden).cpu()
    s_tok = token_scores(prompt.tokens, bank.tokens) if tokens_known else torch.zeros_like(s_cos)
    if settings.rule == "cos":
        scores = s_cos
    elif settings.rule == "tokens":
        scores = s_tok
    else:
        scores = torch.maximum(s_cos, s_tok)
    gamma = settings.factor * scores.max(dim=1).values
    gamma = torch.tensor([settings.calibrate(float(g)) for g in gamma])
    return gamma, scores

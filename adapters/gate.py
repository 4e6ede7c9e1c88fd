"""Gates: how strongly each eraser acts for a given prompt.

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

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol, Sequence

import torch

WINDOW = 77


@dataclass
class EncodedText:
    """Text as the sampler sees it: hidden states [B, L, D] and the content token ids per text."""

    hidden: torch.Tensor
    tokens: list[set[int]]


class TextEncoderLike(Protocol):
    def __call__(self, texts: Sequence[str]) -> EncodedText: ...


@dataclass
class GateSettings:
    """Per-entry gate configuration.

    ``rule``: ``"ft"`` (official Facilitated Transport), ``"always"`` (gate 1, a plain LoRA at
    ``strength``), ``"cos"`` / ``"tokens"`` (one half of FT, as the reference's other metrics).
    ``factor`` is FT's facilitate factor f. ``threshold`` / ``temperature`` are a non-official
    calibration: ``sigmoid((gamma - threshold) / temperature)`` (hard step when temperature is 0).
    ``cond_only`` applies the eraser to conditional rows only (non-official; keeps the
    unconditional score of the base model).
    """

    rule: str = "ft"
    factor: float = 1.0
    threshold: float | None = None
    temperature: float | None = None
    cond_only: bool = False

    def __post_init__(self):
        if self.rule not in ("ft", "always", "cos", "tokens"):
            raise ValueError(f"unknown gate rule {self.rule!r} (ft, always, cos, tokens)")

    @property
    def official(self) -> bool:
        return self.rule == "ft" and self.threshold is None and not self.cond_only

    def calibrate(self, gamma: float) -> float:
        if self.threshold is None:
            return gamma
        t = self.temperature or 0.0
        if t <= 0:
            return 1.0 if gamma >= self.threshold else 0.0
        return 1.0 / (1.0 + math.exp(-(gamma - self.threshold) / t))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "GateSettings":
        d = dict(d or {})
        return cls(**{k: d[k] for k in ("rule", "factor", "threshold", "temperature", "cond_only") if k in d})


def to_window(hidden: torch.Tensor, pad_row: torch.Tensor | None = None) -> torch.Tensor:
    """First 77-token window of [B, L, D] hidden states (padded by repeating the last row when short)."""
    if hidden.shape[1] >= WINDOW:
        return hidden[:, :WINDOW]
    pad = (pad_row if pad_row is not None else hidden[:, -1:]).expand(hidden.shape[0], WINDOW - hidden.shape[1], -1)
    return torch.cat([hidden, pad], dim=1)


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


def special_token_filter(special_ids: Sequence[int]) -> Callable[[Sequence[int]], set[int]]:
    special = set(int(i) for i in special_ids)

    def content(ids: Sequence[int]) -> set[int]:
        return {int(i) for i in ids if int(i) not in special}

    return content


@dataclass
class GateReport:
    """What fired, for the user: one line per eraser."""

    rows: list[dict] = field(default_factory=list)

    def add(self, name: str, gate: float, strength: float, enabled: bool, detail: str = ""):
        self.rows.append({"eraser": name, "gate": float(gate), "strength": float(strength),
                          "enabled": bool(enabled), "detail": detail})

    def text(self) -> str:
        if not self.rows:
            return "ConceptGate: no erasers"
        lines = []
        for r in self.rows:
            state = "off" if not r["enabled"] else f"gate {r['gate']:.3f} x strength {r['strength']:.2f}"
            lines.append(f"{r['eraser']}: {state}{(' (' + r['detail'] + ')') if r['detail'] else ''}")
        return "\n".join(lines)

"""Text as the sampler sees it, the input of every gate rule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

WINDOW = 77


@dataclass
class EncodedText:
    """Hidden states ``[B, L, D]`` exactly as the sampler feeds them to the UNet, the content token ids
    of each text (a set: the token half of FT, the name half of ``context``), and where known the
    token id at every position ``ids [B, L]`` and the content positions ``mask [B, L]`` (no start, end
    or padding token). Hosts that cannot tell the positions leave ``mask`` None; rules that need it
    then act as if the concept were present (fail closed) and say so."""

    hidden: torch.Tensor
    tokens: list[set[int]]
    ids: torch.Tensor | None = None
    mask: torch.Tensor | None = None


class TextEncoderLike(Protocol):
    def __call__(self, texts: Sequence[str]) -> EncodedText: ...


def to_window(hidden: torch.Tensor, pad_row: torch.Tensor | None = None) -> torch.Tensor:
    """First 77-token window of [B, L, D] hidden states (padded by repeating the last row when short)."""
    if hidden.shape[1] >= WINDOW:
        return hidden[:, :WINDOW]
    pad = (pad_row if pad_row is not None else hidden[:, -1:]).expand(hidden.shape[0], WINDOW - hidden.shape[1], -1)
    return torch.cat([hidden, pad], dim=1)


def special_token_filter(special_ids: Sequence[int]) -> Callable[[Sequence[int]], set[int]]:
    special = set(int(i) for i in special_ids)

    def content(ids: Sequence[int]) -> set[int]:
        return {int(i) for i in ids if int(i) not in special}

    return content


def positions_mask(counts: Sequence[int], length: int, start: int = 1) -> torch.Tensor:
    """``[B, length]`` content mask for CLIP-style layouts: ``counts[b]`` content tokens after one start
    token (the webuis and ComfyUI report counts, not positions)."""
    pos = torch.arange(length)[None]
    c = torch.as_tensor(list(counts))[:, None].clamp(0, length - start)
    return (pos >= start) & (pos < start + c)


def content_mask(enc: EncodedText) -> torch.Tensor | None:
    """The content positions of ``enc`` cut to its hidden states' length, or None when unknown."""
    if enc.mask is None:
        return None
    m = enc.mask.bool()
    L = enc.hidden.shape[1]
    if m.shape[1] >= L:
        return m[:, :L]
    return torch.cat([m, m.new_zeros(m.shape[0], L - m.shape[1])], 1)

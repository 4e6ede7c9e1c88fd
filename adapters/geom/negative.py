"""Geom-Erasing's negative prompt: the concept + location tokens appended to the user's negative, with
the token-set choice and the policy for the 75-token window, per row where the gate fires."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..eraser import Eraser
from .tokens import (OVERFLOW, TOKEN_SETS, WINDOW, check_text_encoder, embedding_table, encode_segments,
                     segment_ids, validate)

# --------------------------------------------------------------------------- negative prompts


def select_bins(eraser: Eraser, token_set: str | None = None, top_k: int | None = None) -> list[int]:
    """Bins whose location tokens go into the negative prompt, most frequently observed first.

    ``all``: every bin; ``observed``: bins covered at least once in training; ``topk``: the
    ``top_k`` most frequently covered bins (ties: lower index first)."""
    s = eraser.settings
    token_set = token_set or s.get("token_set", "observed")
    top_k = int(top_k if top_k is not None else s.get("top_k", 8))
    if token_set not in TOKEN_SETS:
        raise ValueError(f"unknown token set {token_set!r} ({', '.join(TOKEN_SETS)})")
    g = int(s["grid"])
    counts = list(s.get("bin_counts") or [0] * (g * g))
    order = sorted(range(g * g), key=lambda b: (-counts[b], b))
    if token_set == "all":
        return order
    observed = [b for b in order if counts[b] > 0]
    return observed if token_set == "observed" else observed[:top_k]


@dataclass
class NegativePlan:
    """What the builder appends: ``segments`` (text and vectors, the part after the user's negative),
    the bins used and dropped, and token counts. ``host_text`` spells it for a host's text box."""

    segments: list
    bins: list[int]
    dropped: list[int]
    user_tokens: int
    own_tokens: int
    chunks: int
    separator: str = ", "

    def rows(self, user_negative: str = "") -> list:
        return ([user_negative, self.separator] if user_negative else []) + self.segments


def concept_segments(eraser: Eraser) -> list:
    c = eraser.tensors.get("concept")
    return [c] if c is not None else [eraser.settings["concept_name"]]


def plan_negative(eraser: Eraser, tokenizer, user_negative: str = "", token_set: str | None = None,
                  top_k: int | None = None, overflow: str | None = None, window: int = WINDOW,
                  separator: str = ", ") -> NegativePlan:
    """Combine the user's negative prompt with the concept token and location tokens.

    The user's negative comes first, unchanged, then ``separator``, the concept (learned vector,
    or the concept's word), then the selected location tokens, most frequently observed bin first.

    When the whole exceeds the ``window`` (75 tokens per chunk):

    * ``overflow="chunk"`` (the hosts' behaviour): the sequence continues in further 77-token
      chunks whose encodings are concatenated (ComfyUI, A1111). Diffusers pipelines take one
      chunk only: :func:`encode_negative` then raises.
    * ``overflow="drop"``: location tokens of the least observed bins are dropped until the
      negative needs no more chunks than the user's negative plus the concept token alone (so our
      tokens never add a chunk unless the concept token itself does); ``dropped`` lists them.
    """
    overflow = overflow or eraser.settings.get("overflow", "drop")
    if overflow not in OVERFLOW:
        raise ValueError(f"unknown overflow mode {overflow!r} ({', '.join(OVERFLOW)})")
    bins = select_bins(eraser, token_set, top_k)
    loc = eraser.tensors["locations"]
    head = concept_segments(eraser)
    n_user = len(segment_ids(tokenizer, [user_negative, separator] if user_negative else [])[0])
    n_head = len(segment_ids(tokenizer, head)[0])
    dropped: list[int] = []
    if overflow == "drop":
        room = max(1, math.ceil((n_user + n_head) / window)) * window - n_user - n_head
        if len(bins) > room:
            bins, dropped = bins[:max(room, 0)], bins[max(room, 0):]
    segs = head + ([loc[bins]] if bins else [])
    total = n_user + n_head + len(bins)
    return NegativePlan(segs, bins, dropped, n_user, n_head + len(bins), max(1, math.ceil(total / window)), separator)


@torch.no_grad()
def encode_negative(eraser: Eraser, tokenizer, text_encoder, user_negatives: Sequence[str], on: Sequence[bool] | None = None,
                    clip_skip: int | None = None, max_chunks: int | None = 1, **plan_kw) -> torch.Tensor:
    """Negative prompt embeddings [B, 77 * chunks, D] for a batch: row ``i`` is the user's negative
    plus the learned tokens when ``on[i]`` (the gate), the user's negative alone otherwise."""
    check_text_encoder(eraser, embedding_table(text_encoder).weight, strict=plan_kw.pop("strict", True))
    on = [True] * len(user_negatives) if on is None else list(on)
    rows = []
    for neg, o in zip(user_negatives, on):
        rows.append(plan_negative(eraser, tokenizer, neg, **plan_kw).rows(neg) if o else [neg])
    return encode_segments(tokenizer, text_encoder, rows, max_chunks=max_chunks, clip_skip=clip_skip)


# ------------------------------------------------------------------------------ diffusers


def diffusers_handler(pipe, entries, prompts, gates, negative=None) -> dict:
    """The registry's conditioning handler for diffusers pipelines (method ``geom``): per-row negative prompt
    embeddings, the learned tokens appended to the row's negative prompt (``negative``, default empty)
    where the entry's coefficient (gate x strength) is >= 0.5 (a conditioning change is on or off per row),
    the plain negative elsewhere. One geom eraser per stack in this path (a second one would replace the
    first one's embeddings)."""
    if len(entries) > 1:
        raise ValueError("Geom-Erasing: one token set per stack on the diffusers path "
                         f"({', '.join(e.eraser.name for e in entries)} given)")
    e = validate(entries[0].eraser)
    on = (torch.as_tensor(gates).reshape(len(prompts), -1)[:, 0] >= 0.5).tolist()
    texts = list(negative) if negative is not None else [""] * len(prompts)
    neg = encode_negative(e, pipe.tokenizer, pipe.text_encoder, texts, on=on)
    return {"negative_prompt_embeds": neg.to(pipe.unet.dtype)}
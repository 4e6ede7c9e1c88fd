"""Geom-Erasing's negative prompt: the concept + location tokens appended to the user's negative, with
the token-set choice and the policy for the 75-token window, per row where the gate fires."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..eraser import Eraser
from .tokens import (OVERFLOW, TOKEN_SETS, WINDOW, VectorOverride, check_text_encoder, chunk_rows, embedding_table,
                     encode_segments, segment_ids, validate)

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
    from .regional import require_prompt_negation

    require_prompt_negation(e, "the negative-prompt handler")  # GatedPipeline sends regional ones to its row session
    on = (torch.as_tensor(gates).reshape(len(prompts), -1)[:, 0] >= 0.5).tolist()
    if getattr(pipe, "text_encoder_2", None) is not None:
        return sdxl_negative(e, pipe, negative, on)
    texts = list(negative) if negative is not None else [""] * len(prompts)
    neg = encode_negative(e, pipe.tokenizer, pipe.text_encoder, texts, on=on)
    return {"negative_prompt_embeds": neg.to(pipe.unet.dtype)}

# ------------------------------------------------------------------------------ SDXL (issue 18)
# An SDXL Geom eraser carries one token set per text encoder: ``locations`` / ``concept`` for the first
# (CLIP-L) and ``locations_g`` / ``concept_g`` for the second (bigG), with ``settings["text_fingerprint_g"]``
# (the layout SDXL embedding files use: ``clip_l`` / ``clip_g``). Both encoders see the same negative text,
# each with its own vectors at the same positions (the two tokenizers share CLIP's vocabulary).
SDXL_SECOND = {"locations": "locations_g", "concept": "concept_g"}


def second_encoder_view(eraser: Eraser) -> Eraser:
    """The eraser as the second (bigG) encoder sees it: its ``*_g`` tensors under the usual names. Raises
    :class:`IncompatibleModelError` naming the file when it has no token set for a second encoder."""
    import dataclasses

    from ..errors import IncompatibleModelError

    if SDXL_SECOND["locations"] not in eraser.tensors:
        raise IncompatibleModelError(eraser.source or eraser.name,
                                     f"SDXL needs Geom tokens for both text encoders (tensors locations and "
                                     f"locations_g); this file has one set of {eraser.tensors['locations'].shape[1]}-d "
                                     f"tokens (made for a one-encoder model such as SD1.x)")
    tensors = {k: eraser.tensors[v] for k, v in SDXL_SECOND.items() if v in eraser.tensors}
    return dataclasses.replace(eraser, tensors=tensors, text_fingerprint=eraser.settings.get("text_fingerprint_g"))


@torch.no_grad()
def _encode_xl(tokenizer, text_encoder, rows) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows of segments -> (``hidden_states[-2]`` [B, 77, D], pooled [B, P] or None), as SDXL's
    ``encode_prompt`` encodes a negative prompt (one window)."""
    ids, mask, values, _ = chunk_rows(tokenizer, rows, max_chunks=1)
    with VectorOverride(text_encoder) as ov:
        ov.set(mask, values)
        out = text_encoder(ids.to(next(text_encoder.parameters()).device), output_hidden_states=True)
    return out.hidden_states[-2], (out[0] if out[0].ndim == 2 else None)


def sdxl_negative(eraser: Eraser, pipe, negative, on) -> dict:
    """``negative_prompt_embeds`` [B, 77, D1 + D2] and ``negative_pooled_prompt_embeds`` for an SDXL
    pipeline. Rows whose gate is off get exactly what the pipeline itself would use: the user's negative
    encoded, or zeros when no negative was given and the pipeline zeroes empty negatives
    (``force_zeros_for_empty_prompt``), so an eraser whose gate stays closed changes nothing."""
    second = second_encoder_view(eraser)
    B = len(on)
    texts = list(negative) if negative is not None else [""] * B
    parts, pooled = [], None
    for view, tok, te in ((eraser, pipe.tokenizer, pipe.text_encoder), (second, pipe.tokenizer_2, pipe.text_encoder_2)):
        check_text_encoder(view, embedding_table(te).weight)
        rows = [plan_negative(view, tok, neg).rows(neg) if o else [neg] for neg, o in zip(texts, on)]
        hidden, p = _encode_xl(tok, te, rows)
        parts.append(hidden)
        pooled = p if p is not None else pooled
    hidden = torch.cat(parts, -1)
    if negative is None and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
        off = ~torch.tensor(on, dtype=torch.bool)
        hidden[off.to(hidden.device)] = 0
        pooled[off.to(pooled.device)] = 0
    dtype = pipe.unet.dtype
    return {"negative_prompt_embeds": hidden.to(dtype), "negative_pooled_prompt_embeds": pooled.to(dtype)}

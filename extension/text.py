"""Prompt text -> what the gate compares, with the webui's loaded model.

How the webui's prompt features enter the gate (Facilitated Transport, see ``adapters/gate.py``):

* **Cosine half**: the hidden states are the conditioning the sampler feeds the UNet. In A1111 the
  gate reads them from ``on_cfg_denoiser``'s ``text_cond`` at every step, so CLIP skip, emphasis
  ``(word:1.2)``, textual inversion, prompt editing ``[a:b:N]`` and BREAK are exactly as the host
  encoded them; the erased concepts are encoded with the same model
  (``sd_model.get_learned_conditioning``, so the same CLIP skip). Prompts longer than 75 tokens or
  split by BREAK give ``77*k`` positions: only the first 77-token window enters the cosine (the
  official rule's window). In Forge the prompts are encoded once per sampling pass with
  ``sd_model.get_learned_conditioning``, as the host does.
* **Token half**: token ids of the prompt's words with the attention syntax removed (parentheses,
  brackets, ``:weight``, ``BREAK``, ``AND``), from the model's own tokenizer, over the whole prompt
  (all windows, every prompt-editing alternative).
* **AND**: each sub-prompt is its own conditioning row and gets its own gate.
"""

from __future__ import annotations

import contextlib
import re
from typing import Sequence

import torch

from ..adapters.gate import EncodedText, positions_mask, special_token_filter, to_window

AND = re.compile(r"\bAND\b")
SUB_WEIGHT = re.compile(r"\s*:\s*[-+]?(?:\d+\.?|\d*\.\d+)\s*$")  # "cat :1.2" weight of an AND part
_ATTN_WEIGHT = re.compile(r":\s*[-+]?(?:\d+\.?|\d*\.\d+)\s*(?=[\)\]])")
_ESCAPED = re.compile(r"\\([\(\)\[\]\\])")


def subprompts(prompt: str) -> list[str]:
    """A1111's AND split (``prompt_parser.get_multicond_prompt_list``), weights removed."""
    return [SUB_WEIGHT.sub("", part).strip() for part in AND.split(prompt or "")]


def plain_words(text: str) -> str:
    """The words of a prompt without attention / editing syntax (for token overlap only)."""
    text = text.replace("BREAK", " ")
    text = _ATTN_WEIGHT.sub("", text)
    text = _ESCAPED.sub(lambda m: " " if m.group(1) != "\\" else "", text)
    text = re.sub(r"[\(\)\[\]\|]", " ", text)
    text = re.sub(r"(?<=\S):(?=\S)", " ", text)  # [from:to:when] -> from to when
    return " ".join(text.split())


def autocast():
    try:
        from modules import devices  # the webui's own autocast (fp16 models)

        return devices.autocast()
    except Exception:
        return contextlib.nullcontext()


class HostTextEncoder:
    """A ``TextEncoderLike`` over the webui model: ``get_learned_conditioning`` for hidden states
    (a tensor, or SDXL's dict with ``crossattn``) and the host tokenizer for token ids."""

    def __init__(self, sd_model):
        self.sd_model = sd_model
        self._tokenize, specials = self._find_tokenizer(sd_model)
        self._specials = specials  # (start, end, pad) where the host names them
        self._content = special_token_filter(specials)

    @staticmethod
    def _find_tokenizer(sd_model):
        # A1111 (SD1/2 and SDXL's GeneralConditioner): cond_stage_model.tokenize(texts) -> id lists
        # without start/end tokens. Forge: the text processing engines have the same method.
        for owner in ("cond_stage_model", "text_processing_engine", "text_processing_engine_l"):
            obj = getattr(sd_model, owner, None)
            fn = getattr(obj, "tokenize", None)
            if callable(fn):
                specials = [getattr(obj, a) for a in ("id_start", "id_end", "id_pad") if isinstance(getattr(obj, a, None), int)]
                return fn, specials
        return None, []

    @property
    def tokens_known(self) -> bool:
        return self._tokenize is not None

    def hidden(self, texts: Sequence[str]) -> torch.Tensor:
        with torch.no_grad(), autocast():
            out = self.sd_model.get_learned_conditioning(list(texts))
        return conditioning_hidden(out)

    def token_rows(self, texts: Sequence[str]) -> tuple[list[set[int]], list[int] | None]:
        """(content token ids per text, content tokens in the first 75-token window per text or None
        when the host has no tokenizer)."""
        tokens, counts, _ = self._token_rows(texts)
        return tokens, counts

    def _token_rows(self, texts: Sequence[str]):
        if self._tokenize is None:
            return [set() for _ in texts], None, None
        ids = self._tokenize([plain_words(t) for t in texts])
        return [self._content(row) for row in ids], [min(len(row), 75) for row in ids], ids

    def tokens(self, texts: Sequence[str]) -> list[set[int]]:
        return self.token_rows(texts)[0]

    def __call__(self, texts: Sequence[str]) -> EncodedText:
        hidden = to_window(self.hidden(texts))
        tokens, counts, rows = self._token_rows(texts)
        if counts is None:
            return EncodedText(hidden, tokens)
        return EncodedText(hidden, tokens, self._window_ids(rows, hidden.shape[1]), positions_mask(counts, hidden.shape[1]))

    def _window_ids(self, rows, length: int) -> torch.Tensor | None:
        """The first window's ids as the webui lays them out (start, 75 content tokens, end, padding)."""
        if len(self._specials) < 2:
            return None
        start, end = self._specials[0], self._specials[1]
        pad = self._specials[2] if len(self._specials) > 2 else end
        ids = torch.full((len(rows), length), pad, dtype=torch.long)
        for b, row in enumerate(rows):
            row = [start] + list(row)[: length - 2] + [end]
            ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        return ids


def conditioning_hidden(cond) -> torch.Tensor:
    """The cross-attention context of a webui conditioning (SDXL: ``cond["crossattn"]``), fp32."""
    if isinstance(cond, dict):
        cond = cond["crossattn"]
    return cond.detach().float()

"""Hosts for closed-form edits: what :func:`~.edit.compute_edit` needs from the model it edits.

``conceptgate.nodes.nodes_uce.ComfyEditHost`` (ComfyUI MODEL + CLIP) lives with the ComfyUI glue, so
that the core never imports ComfyUI."""
from __future__ import annotations

import hashlib
import os
from typing import Mapping, Sequence

import torch

from ..fingerprint import _tensor_digest, weights_fingerprint
from . import closed_form as cf

class EditHost:
    """What :func:`compute_edit` needs from a host.

    ``cross_attention_weights()``: ``{canonical module name: W}`` as the sampler uses them.
    ``encode(texts)``: ``(hidden [B, 77, D], token_ids [B, 77])`` exactly as the sampler's context.
    ``base_family``: ``"sd1" | "sd2" | "sdxl" | None``. Fingerprints are computed from these.
    """

    kind = "abstract"
    base_family: str | None = None

    def cross_attention_weights(self) -> dict:
        raise NotImplementedError

    def encode(self, texts: Sequence[str]):
        raise NotImplementedError

    def text_fingerprint(self) -> str:
        raise NotImplementedError

    def unet_fingerprint(self, weights: Mapping[str, torch.Tensor] | None = None) -> str:
        return weights_fingerprint(self.cross_attention_weights() if weights is None else weights)

    def gate_encoder(self):
        """A text encoder for the stack's gates (:class:`~.gate.EncodedText`): by default this host's
        context and the content tokens (between BOS and the first EoT)."""
        from ..gate import EncodedText

        def enc(texts):
            hidden, ids = self.encode(list(texts))
            toks, mask = [], torch.zeros(ids.shape, dtype=torch.bool)
            for b, row in enumerate(ids.tolist()):
                end = next((i for i, t in enumerate(row[1:], 1) if t == cf.CLIP_EOS_TOKEN_ID), len(row))
                toks.append({t for t in row[1:end] if t >= 0})
                mask[b, 1:end] = True
            return EncodedText(hidden.float(), toks, ids.long(), mask)
        return enc


class DiffusersSDXLTextEncoder:
    """SDXL's context as ``StableDiffusionXLPipeline.encode_prompt`` builds it: each encoder's
    ``hidden_states[-(clip_skip + 2)]`` (penultimate by default, no final layer norm), concatenated."""

    def __init__(self, tokenizers, text_encoders, clip_skip: int | None = None):
        self.tokenizers = list(tokenizers)
        self.text_encoders = list(text_encoders)
        self.clip_skip = clip_skip

    @torch.no_grad()
    def __call__(self, texts):
        parts, first_ids = [], None
        for tok, te in zip(self.tokenizers, self.text_encoders):
            window = te.config.max_position_embeddings
            ids = tok(list(texts), padding="max_length", max_length=window, truncation=True,
                      return_tensors="pt").input_ids
            out = te(ids.to(next(te.parameters()).device), output_hidden_states=True)
            layer = -2 if self.clip_skip is None else -(self.clip_skip + 2)
            parts.append(out.hidden_states[layer].float())
            first_ids = ids if first_ids is None else first_ids
        return torch.cat(parts, -1), first_ids


def _module_digest(module: torch.nn.Module, extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for name, t in module.state_dict().items():
        if t.is_floating_point():
            _tensor_digest(h, name, t, 256, False)
    return h.hexdigest()[:16]


class DiffusersEditHost(EditHost):
    """A diffusers UNet with its tokenizer(s) and text encoder(s).

    ``DiffusersEditHost.from_pipeline(pipe, clip_skip)`` or ``from_folder(path)``; SDXL is used when
    a second tokenizer/text encoder is given. The UNet's weights are read, never written.
    """

    kind = "diffusers"

    def __init__(self, unet, tokenizer, text_encoder, clip_skip: int | None = None,
                 tokenizer_2=None, text_encoder_2=None):
        from ..diffusers_host import DiffusersTextEncoder
        from ..naming import layout_from_diffusers_config

        self.unet = unet
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.clip_skip = clip_skip
        self.sdxl = text_encoder_2 is not None
        if self.sdxl:
            self._encoder = DiffusersSDXLTextEncoder([tokenizer, tokenizer_2], [text_encoder, text_encoder_2], clip_skip)
            self._text_modules = [text_encoder, text_encoder_2]
        else:
            self._encoder = DiffusersTextEncoder(tokenizer, text_encoder, clip_skip)
            self._text_modules = [text_encoder]
        fam = layout_from_diffusers_config(unet.config).family
        self.base_family = None if fam == "custom" else fam

    @classmethod
    def from_pipeline(cls, pipe, clip_skip: int | None = None) -> "DiffusersEditHost":
        return cls(pipe.unet, pipe.tokenizer, pipe.text_encoder, clip_skip,
                   getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None))

    @classmethod
    def from_folder(cls, path: str, clip_skip: int | None = None, torch_dtype=torch.float32) -> "DiffusersEditHost":
        """Load UNet + tokenizer(s) + text encoder(s) of a diffusers folder (no VAE, no scheduler)."""
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        if not os.path.isdir(os.path.join(path, "unet")):
            raise FileNotFoundError(f"{path}: not a diffusers model folder (no unet/ subfolder)")
        kw = dict(torch_dtype=torch_dtype, local_files_only=True)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw).eval()
        tok = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
        te = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw).eval()
        tok2 = te2 = None
        if os.path.isdir(os.path.join(path, "text_encoder_2")):
            tok2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", local_files_only=True)
            te2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **kw).eval()
        return cls(unet, tok, te, clip_skip, tok2, te2)

    def cross_attention_weights(self) -> dict:
        return cf.collect_cross_attention_weights(self.unet)

    @torch.no_grad()
    def encode(self, texts):
        texts = list(texts)
        if self.sdxl:
            return self._encoder(texts)
        hidden = self._encoder(texts).hidden
        window = self.text_encoder.config.max_position_embeddings
        ids = self.tokenizer(texts, padding="max_length", max_length=window, truncation=True,
                             return_tensors="pt").input_ids
        return hidden, ids

    def gate_encoder(self):
        if self.sdxl:  # what GatedPipeline uses on SDXL: the same concatenated context, its content positions
            from ..diffusers_host import DiffusersSDXLGateEncoder

            return DiffusersSDXLGateEncoder(self._encoder.tokenizers, self._encoder.text_encoders, self.clip_skip)
        return self._encoder     # what GatedPipeline uses

    def text_fingerprint(self) -> str:
        extra = f"diffusers|sdxl={self.sdxl}|clip_skip={self.clip_skip}"
        return hashlib.sha256("|".join([extra] + [_module_digest(m, "") for m in self._text_modules])
                              .encode()).hexdigest()[:16]

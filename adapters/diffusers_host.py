"""ConceptGate on plain diffusers: gated erasers on a ``UNet2DConditionModel`` via forward hooks.

Typical use::

    stack = EraserStack().with_eraser(load_eraser("snoopy.safetensors"))
    with GatedPipeline(pipe, stack) as gated:
        images = gated(["a photo of snoopy", "a cat"], negative_prompt="", num_inference_steps=25).images
        print(gated.last_report.text())

The pipeline's UNet weights are never modified: hooks are removed on exit.
"""

from __future__ import annotations

import weakref
from typing import Sequence

import torch

from .hooks import RowGatedDeltas
from .errors import IncompatibleModelError
from .fingerprint import EDIT_METHODS, edit_base_mismatch
from .gate import EncodedText, GateReport, special_token_filter
from .naming import layout_from_diffusers_config
from .gate import BankCache
from .stack import EraserStack


class DiffusersTextEncoder:
    """Encodes text exactly as diffusers' SD pipelines do (77 tokens, max-length padding, CLIP skip
    taken from ``hidden_states[-(clip_skip + 1)]`` followed by the final layer norm)."""

    def __init__(self, tokenizer, text_encoder, clip_skip: int | None = None):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.clip_skip = clip_skip
        specials = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id]
        self._content = special_token_filter([s for s in specials if s is not None])
        self._special = torch.tensor([s for s in specials if s is not None], dtype=torch.long)

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> EncodedText:
        # the text encoder's window (77), not the tokenizer's model_max_length (some copies say 8192)
        window = self.text_encoder.config.max_position_embeddings
        ids = self.tokenizer(list(texts), padding="max_length", max_length=window,
                             truncation=True, return_tensors="pt").input_ids
        device = next(self.text_encoder.parameters()).device
        if self.clip_skip:
            out = self.text_encoder(ids.to(device), output_hidden_states=True)
            hidden = out.hidden_states[-(self.clip_skip + 1)]
            inner = getattr(self.text_encoder, "text_model", self.text_encoder)  # transformers 5 flattened it
            hidden = inner.final_layer_norm(hidden)
        else:
            hidden = self.text_encoder(ids.to(device))[0]
        ids = ids.cpu()
        return EncodedText(hidden.float(), [self._content(row.tolist()) for row in ids], ids, ~torch.isin(ids, self._special))


class DiffusersSDXLGateEncoder:
    """What an SDXL UNet is conditioned on, as ``StableDiffusionXLPipeline.encode_prompt`` builds it, for the
    gate (issue 18): each encoder's ``hidden_states[-2]`` (``[-(clip_skip + 2)]`` with CLIP skip; no final
    layer norm), CLIP-L's and bigG's concatenated along the width (768 + 1280 = 2048 on SDXL).

    Why these states: the gate must read what the UNet reads (the cross-attention context an SPM membrane,
    a UCE edit or an ABO row acts on), and they are exactly what ComfyUI's SDXL CLIP puts in a
    CONDITIONING's ``cross_attn``, so a stack gates the same prompt alike in both hosts and a stored
    ``context`` calibration is comparable. The pooled embedding (encoder 2's projected EoT state) is one
    vector per prompt with no token positions, so the token-wise rules cannot read it; it is returned by
    :meth:`encode` for the pipeline and All-but-One's extra rows. Token ids and content positions come
    from the first tokenizer (both SDXL tokenizers share CLIP's vocabulary; the second one pads with "!")."""

    def __init__(self, tokenizers, text_encoders, clip_skip: int | None = None):
        self.tokenizers, self.text_encoders = list(tokenizers), list(text_encoders)
        self.clip_skip = clip_skip
        tok = self.tokenizers[0]
        specials = [s for s in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) if s is not None]
        self._content = special_token_filter(specials)
        self._special = torch.tensor(specials, dtype=torch.long)

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> tuple[EncodedText, torch.Tensor]:
        """``(EncodedText of the context, pooled [B, P])``."""
        parts, ids0, pooled = [], None, None
        layer = -2 if self.clip_skip is None else -(self.clip_skip + 2)
        for tok, te in zip(self.tokenizers, self.text_encoders):
            ids = tok(list(texts), padding="max_length", max_length=te.config.max_position_embeddings,
                      truncation=True, return_tensors="pt").input_ids
            out = te(ids.to(next(te.parameters()).device), output_hidden_states=True)
            if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds first (diffusers' own test)
                pooled = out[0]
            parts.append(out.hidden_states[layer].float())
            ids0 = ids if ids0 is None else ids0
        ids0 = ids0.cpu()
        enc = EncodedText(torch.cat(parts, -1), [self._content(r.tolist()) for r in ids0], ids0,
                          ~torch.isin(ids0, self._special))
        return enc, pooled

    def __call__(self, texts: Sequence[str]) -> EncodedText:
        return self.encode(texts)[0]

    def pooled(self, texts: Sequence[str]) -> torch.Tensor:
        return self.encode(texts)[1]


def is_sdxl_pipeline(pipe) -> bool:
    """Two text encoders (``StableDiffusionXLPipeline`` and its img2img / inpaint siblings)."""
    return getattr(pipe, "text_encoder_2", None) is not None and getattr(pipe, "tokenizer_2", None) is not None


def gate_encoder_for(pipe, clip_skip: int | None = None):
    """The gate's text encoder for a diffusers pipeline: SD1.x/2.x's one encoder, or SDXL's concatenated
    context (:class:`DiffusersSDXLGateEncoder`). A pipeline with only ``text_encoder_2`` (the SDXL refiner) is
    refused: its context is bigG alone."""
    if is_sdxl_pipeline(pipe):
        if getattr(pipe, "text_encoder", None) is None:
            raise ValueError("GatedPipeline: an SDXL pipeline without its first text encoder (the refiner) is not "
                             "supported (its context is bigG alone)")
        return DiffusersSDXLGateEncoder([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2],
                                        clip_skip)
    return DiffusersTextEncoder(pipe.tokenizer, pipe.text_encoder, clip_skip)


def check_stack_fits(stack: EraserStack, unet, allow_other_base: bool = False) -> EraserStack:
    """``stack`` if every weight eraser fits ``unet`` (layout, and a closed-form edit's base fingerprint);
    a best-effort entry that does not is left out with a note; any other raises
    :class:`IncompatibleModelError` naming the file."""
    layout = layout_from_diffusers_config(unet.config)
    attn_weights = None

    def problem(entry):
        nonlocal attn_weights
        if entry.eraser.kind != "weight":
            return None
        problems = entry.eraser.check_against(layout)
        if not problems and entry.eraser.method in EDIT_METHODS:
            if attn_weights is None:
                attn_weights = cross_attention_weights(unet)
            why = edit_base_mismatch(entry.eraser, attn_weights, allow_other_base)
            problems = [why] if why else []
        return "; ".join(problems)

    return stack.applicable(problem, lambda e, why: IncompatibleModelError(e.eraser.source or e.eraser.name, why))


def cross_attention_weights(unet) -> dict:
    """``{module name: W}`` of every attn2 ``to_k`` / ``to_v`` (what closed-form edits fingerprint)."""
    return {name: m.weight.detach() for name, m in unet.named_modules()
            if "attn2" in name and name.endswith((".to_k", ".to_v")) and hasattr(m, "weight")}


def attach(unet, stack: EraserStack, allow_other_base: bool = False) -> RowGatedDeltas:
    """Validate, then hook ``stack``'s weight erasers onto ``unet`` (call ``.detach()`` to remove)."""
    return RowGatedDeltas(check_stack_fits(stack, unet, allow_other_base), unet.get_submodule).attach()


def cfg_rows(stack: EraserStack, coeffs: torch.Tensor, with_uncond: bool) -> torch.Tensor:
    """Row coefficients for a CFG batch laid out ``[uncond x P, cond x P]`` (diffusers' order).

    The official gate acts on both branches (the weights are shared in the reference); entries with
    ``cond_only`` act on conditional rows only.
    """
    if not with_uncond:
        return coeffs
    uncond = coeffs.clone()
    for i, e in enumerate(stack.entries):
        if e.gate.cond_only:
            uncond[:, i] = 0.0
    return torch.cat([uncond, coeffs], 0)


class GatedPipeline:
    """Wraps a diffusers Stable Diffusion pipeline: computes each prompt's gates with the pipeline's
    own text encoder and applies every enabled eraser of the stack, whatever its kind, per row:

    * weight erasers (SPM, UCE/RECE, the All-but-One adapter): per-row forward hooks;
    * conditioning erasers (Geom-Erasing): the registry's handler builds ``negative_prompt_embeds``,
      the learned tokens appended to the rows whose gate fires; those acting through extra CFG rows
      (Geom regional negation: the registry's row terms) are folded by the row session instead;
    * guidance erasers (All-but-One): the registry's guidance session adds their rows to the
      pipeline's CFG batch (one UNet call per step) and corrects the conditional prediction.

    ``last_report`` / ``last_coefficients`` describe the last call.

    ``edited_states``: what the gate does with ``prompt_embeds`` that are not the prompt text's own
    encoding (a prompt-weighting tool, an averaged or concatenated conditioning, an embedding-level attack
    such as a Ring-A-Bell concept vector or an optimised soft prompt): ``"full"`` (the default: every
    enabled eraser acts at full strength on that prompt, as the ComfyUI operator lock treats edited
    conditioning: a gate that reads text cannot vouch for states that are not the text's; measured in
    ``bench attack``) or ``"gate"`` (gate on the states as given; trusted callers that edit states on
    purpose). A prompt counts as edited when its states differ from the encoding of its text by more than
    :data:`EDITED_TOLERANCE` (relative Frobenius norm), which a pipeline's own half-precision encoding stays
    well inside. ``last_edited`` says which prompts of the last call were."""

    #: relative difference above which given prompt embeddings count as edited (half-precision round trips
    #: of the same encoding differ by ~1e-3)
    EDITED_TOLERANCE = 1e-2
    EDITED_STATES = ("full", "gate")

    def __init__(self, pipe, stack: EraserStack, clip_skip: int | None = None, allow_other_base: bool = False,
                 edited_states: str = "full"):
        if edited_states not in self.EDITED_STATES:
            raise ValueError(f"edited_states must be one of {self.EDITED_STATES}, got {edited_states!r}")
        self.edited_states = edited_states
        self.last_edited: torch.Tensor | None = None
        self.pipe = pipe
        # checked now, so gates and hooks agree on the entries (a best-effort entry that cannot apply is out)
        self.stack = check_stack_fits(stack, pipe.unet, allow_other_base)
        self.sdxl = is_sdxl_pipeline(pipe)
        self.encoder = gate_encoder_for(pipe, clip_skip)  # SDXL: the concatenated context
        self.banks = BankCache(self.encoder)
        self.hooks: RowGatedDeltas | None = None
        self.last_report: GateReport | None = None
        self.last_coefficients: torch.Tensor | None = None
        from .registry import (GUIDANCE_SESSIONS, conditioning_handler, guidance_session, row_session_method,
                               row_terms)  # a missing handler raises here, not mid-call

        self.sessions = {}
        #: conditioning entries acting through extra CFG rows (Geom regional negation), folded by the row session
        self.row_entries = [i for i, e in enumerate(self.stack.entries)
                            if e.enabled and e.eraser.kind == "conditioning" and row_terms(e.eraser) is not None]
        self._negatives: list[str] | None = None
        for e in self.stack.entries:
            if e.enabled and e.eraser.kind == "guidance" and e.eraser.method not in self.sessions:
                self.sessions[e.eraser.method] = guidance_session(e.eraser)(self)
            if e.enabled and e.eraser.kind == "conditioning" and row_terms(e.eraser) is None:
                conditioning_handler(e.eraser)
        if self.row_entries and row_session_method() not in self.sessions:
            self.sessions[row_session_method()] = GUIDANCE_SESSIONS[row_session_method()](self)

    # UNet -> the GatedPipeline whose hooks are on it: one stack's hooks per UNet at a time
    _in_use: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    def __enter__(self):
        unet = self.pipe.unet
        if self.hooks is not None:
            raise RuntimeError("this GatedPipeline is already entered (nested 'with' on the same instance); "
                               "use the outer one")
        owner = GatedPipeline._in_use.get(unet)
        if owner is not None and owner is not self:
            raise RuntimeError("this UNet already carries the erasers of another GatedPipeline; leave that one "
                               "first (two stacks on one UNet would both act)")
        self.hooks = RowGatedDeltas(self.stack, unet.get_submodule).attach()
        GatedPipeline._in_use[unet] = self
        try:
            for session in self.sessions.values():
                session.attach()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for session in self.sessions.values():
            session.detach()
        if self.hooks is not None:
            self.hooks.detach()
            self.hooks = None
        if GatedPipeline._in_use.get(self.pipe.unet) is self:
            del GatedPipeline._in_use[self.pipe.unet]

    def coefficients(self, prompts: Sequence[str], prompt_embeds: torch.Tensor | None = None,
                     encoded: EncodedText | None = None) -> tuple[torch.Tensor, GateReport]:
        """Gates of ``prompts``; with ``prompt_embeds`` (the states the UNet will get, e.g. edited by an
        embedding-level tool) the gate reads those states at the prompts' token positions."""
        enc = encoded if encoded is not None else self.encoder(prompts)
        edited = torch.zeros(len(enc.tokens), dtype=torch.bool)
        if prompt_embeds is not None:
            given = prompt_embeds.detach().float().cpu()
            own = enc.hidden.detach().float().cpu()
            if given.shape != own.shape:
                raise ValueError(f"GatedPipeline: prompt_embeds {tuple(given.shape)} do not match the encoding of "
                                 f"the {len(prompts)} prompt(s) {tuple(own.shape)}")
            edited = (given - own).flatten(1).norm(dim=1) > self.EDITED_TOLERANCE * own.flatten(1).norm(dim=1)
            enc = EncodedText(prompt_embeds.float(), enc.tokens, enc.ids, enc.mask)
        self.last_edited = edited
        coeffs, report = self.stack.gates(enc, banks=self.banks)
        if self.edited_states == "full" and bool(edited.any()):
            for i, e in enumerate(self.stack.entries):
                if e.enabled:
                    coeffs[edited, i] = e.strength
            rows = ", ".join(str(int(k)) for k in edited.nonzero().flatten())
            report.notes.append(f"prompt(s) {rows}: the given prompt_embeds are not the text's own encoding (edited "
                                "states): every enabled eraser at full strength (edited_states='full')")
            if bool(edited[0]):
                for r in report.rows:
                    if r["enabled"]:
                        r["gate"], r["detail"] = 1.0, "edited states: full strength"
        return coeffs, report

    def _conditioning_kwargs(self, prompts, coeffs, kwargs) -> dict:
        """Extra pipeline arguments of the enabled conditioning erasers (the registry's handlers)."""
        from .registry import conditioning_handler

        groups: dict[str, list[int]] = {}
        for i, e in enumerate(self.stack.entries):
            if e.enabled and e.eraser.kind == "conditioning" and i not in self.row_entries:
                groups.setdefault(e.eraser.method, []).append(i)
        if not groups:
            return {}
        if kwargs.get("negative_prompt_embeds") is not None:
            raise ValueError("GatedPipeline: conditioning erasers build negative_prompt_embeds themselves; pass "
                             "negative_prompt (text) instead")
        negative = kwargs.pop("negative_prompt", None)
        # None stays None: SDXL pipelines zero an absent negative (force_zeros_for_empty_prompt), and the
        # handler's rows whose gate is off must equal that; SD1.x handlers read None as ""
        if negative is not None:
            negative = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
        extra = {}
        for method, idx in groups.items():
            entries = [self.stack.entries[i] for i in idx]
            extra.update(conditioning_handler(entries[0].eraser)(self.pipe, entries, prompts, coeffs[:, idx],
                                                                  negative=negative))
        return extra

    def row_terms(self, prompts, guidance_scale: float):
        """(terms per prompt, encodings) of the entries acting through extra CFG rows, for this call's
        gates (:attr:`last_coefficients`) and negatives; the row session folds them."""
        from .registry import row_terms

        terms: list[list] = [[] for _ in prompts]
        hidden: dict = {}
        if not self.row_entries or self.last_coefficients is None:
            return terms, hidden
        groups: dict = {}
        for i in self.row_entries:
            groups.setdefault(row_terms(self.stack.entries[i].eraser), []).append(i)
        for fn, idx in groups.items():
            t, h = fn(self, [self.stack.entries[i] for i in idx], prompts, self.last_coefficients[:, idx],
                      self._negatives, guidance_scale)
            for k, row in enumerate(t):
                terms[k].extend(row)
            hidden.update(h)
        return terms, hidden

    def _sdxl_call(self, prompts, encoded, prompt_embeds, extra, kwargs) -> dict:
        """SDXL: the pipeline encodes the prompt itself (CLIP skip passed on: its own path reads
        ``hidden_states``, which works on transformers 5). When a conditioning eraser brings
        ``negative_prompt_embeds`` (+ ``negative_pooled_prompt_embeds``), diffusers wants the prompt's
        embeddings and pooled embeddings too: ours, which are the pipeline's own (tested)."""
        call = {}
        if self.encoder.clip_skip and "clip_skip" not in kwargs:
            call["clip_skip"] = self.encoder.clip_skip
        if extra.get("negative_prompt_embeds") is not None and prompt_embeds is None:
            enc, pooled = self.encoder.encode(prompts)
            dtype = self.pipe.unet.dtype
            call = dict(prompt=None, prompt_embeds=enc.hidden.to(dtype), pooled_prompt_embeds=pooled.to(dtype))
        return call

    def __call__(self, prompt, guidance_scale: float = 7.5, prompt_embeds: torch.Tensor | None = None, **kwargs):
        """The pipeline call with the stack gated per prompt. ``prompt_embeds``, if given, replace the
        encoding of ``prompt`` (which still says where its tokens are) and are what the gate reads."""
        from contextlib import ExitStack

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        encoded = self.encoder(prompts)
        coeffs, report = self.coefficients(prompts, prompt_embeds, encoded)
        self.last_report, self.last_coefficients = report, coeffs
        rows = cfg_rows(self.stack, coeffs, with_uncond=guidance_scale > 1.0)
        negative = kwargs.get("negative_prompt")  # row terms (Geom regional negation) read the rows' negatives
        self._negatives = None if negative is None else (
            [negative] * len(prompts) if isinstance(negative, str) else list(negative))
        call = dict(prompt=prompts) if prompt_embeds is None else dict(prompt_embeds=prompt_embeds)
        extra = self._conditioning_kwargs(prompts, coeffs, kwargs)
        if self.sdxl:
            call.update(self._sdxl_call(prompts, encoded, prompt_embeds, extra, kwargs))
        elif prompt_embeds is None and self.encoder.clip_skip:
            # encode with our encoder: diffusers' own clip_skip path reads text_encoder.text_model, which
            # transformers 5 no longer has; the embeddings are the ones the gates were computed from
            negative = kwargs.pop("negative_prompt", None) or ""
            negative = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
            dtype = self.pipe.unet.dtype
            call = dict(prompt_embeds=encoded.hidden.to(dtype),
                        negative_prompt_embeds=self.encoder(negative).hidden.to(dtype))
        if not self.sdxl and extra.get("negative_prompt_embeds") is not None and "prompt" in call:
            # diffusers takes negative embeddings only together with prompt embeddings
            call = dict(prompt_embeds=encoded.hidden.to(self.pipe.unet.dtype))
        call.update(extra)
        owns_hooks = self.hooks is None
        if owns_hooks:
            self.__enter__()
        try:
            with ExitStack() as active:
                active.enter_context(self.hooks.coefficients(rows))
                for session in self.sessions.values():
                    active.enter_context(session.active(prompts, encoded, guidance_scale))
                return self.pipe(guidance_scale=guidance_scale, **call, **kwargs)
        finally:
            if owns_hooks:
                self.__exit__()

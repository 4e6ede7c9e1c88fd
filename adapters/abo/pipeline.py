"""All-but-One guidance (sampling-time reconstruction, see :mod:`.guidance`) on plain diffusers.

Typical use::

    stack = EraserStack().with_eraser(abo_eraser("triangle", "square"))
    with AboGuidedPipeline(pipe, stack) as guided:
        images = guided(["a red triangle", "a blue circle"], guidance_scale=5.0, num_inference_steps=25).images

How it runs: the pipeline's own sampler, scheduler and CFG are untouched. A forward pre-hook on the
UNet appends, to the pipeline's ``[uncond x P, cond x P]`` batch, one row per extra conditioning a
firing prompt needs (its latent, the erase / alternative text encoding): still ONE UNet call per
step. A forward hook removes those rows again and hands the pipeline
``eps_cond' = eps_cond - sum_j gamma_j [eps(x, e_erase_j) - eps(x, e_alt_j)]``, so the pipeline's
``eps_uncond + w (eps_cond' - eps_uncond)`` is exactly the ABO rule. At CFG <= 1 diffusers skips
the unconditional branch and uses ``eps_cond'`` directly: the rule with ``w = 1``. When no prompt
fires the hooks return ``None`` (no extra row, output bit-identical to the plain pipeline).

Weight erasers in the same stack act through :class:`GatedPipeline`'s per-row hooks; the extra rows
carry the coefficients of the prompt they belong to. Nothing is written into the UNet; hooks are
removed on exit.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .. import hooks
from ..hooks import HookSet
from ..diffusers_host import DiffusersTextEncoder, GatedPipeline, gate_encoder_for  # noqa: F401
from ..errors import UnsupportedEraser
from ..gate import entry_gates
from ..gate import BankCache
from .guidance import NEGATIVE_ROW, AboPlan, Term, abo_entries, encode_texts, guidance_terms, in_prompt_terms, terms_from_gates


class AboUNetHooks(HookSet):
    """Pre/post forward hooks on a diffusers ``UNet2DConditionModel`` that batch ABO rows into the
    pipeline's CFG call. Activate for one sampling call with :meth:`active`; ``calls`` / ``extra_rows``
    count UNet calls and extra rows seen while active (for tests and the speed bench)."""

    def __init__(self, unet, row_hooks=None):
        super().__init__()
        self.unet = unet
        self.row_hooks = row_hooks  # a RowGatedDeltas whose coefficients must follow the extra rows
        self.calls = 0
        self.extra_rows = 0

    # --------------------------------------------------------------- lifecycle
    def _register(self):
        yield self.unet.register_forward_pre_hook(self._pre, with_kwargs=True)
        yield self.unet.register_forward_hook(self._post, with_kwargs=True)

    def active(self, terms: list[list[Term]], text_hidden: dict[str, torch.Tensor], with_uncond: bool,
               text_pooled: dict[str, torch.Tensor] | None = None):
        """Context: the next UNet calls carry ``terms`` (one list per prompt, in the pipeline's prompt
        order); ``with_uncond``: the pipeline batches ``[uncond, cond]`` (CFG > 1). ``text_pooled``
        (SDXL): each text's pooled embedding, the ``text_embeds`` of its extra rows."""
        fires = any(terms)
        state = ({"terms": terms, "text": text_hidden, "uncond": with_uncond, "plans": {}, "pooled": text_pooled}
                 if fires else None)
        return self.scoped(state)

    # --------------------------------------------------------------- hooks
    def _plan(self, state, ehs: torch.Tensor, P: int, r: int) -> AboPlan:
        key = (ehs.data_ptr(), tuple(ehs.shape), P, r)
        plan = state["plans"].get(key)
        if plan is None:
            off = P * r if state["uncond"] else 0
            cond = ehs[off: off + P * r: r].float()
            uncond = ehs[0: P * r: r].float() if state["uncond"] else None
            plan = state["plans"][key] = AboPlan.build(state["terms"], state["text"], cond, uncond)
        return plan

    def _pre(self, module, args, kwargs):
        state = self.state
        self._local.pending = None
        if state is None:
            return None
        args, kwargs = list(args), dict(kwargs)
        sample = args[0] if args else kwargs["sample"]
        ehs_in_args = len(args) > 2
        ehs = args[2] if ehs_in_args else kwargs["encoder_hidden_states"]
        B, P = sample.shape[0], len(state["terms"])
        groups = 2 if state["uncond"] else 1
        if B % (groups * P):
            raise RuntimeError(f"All-but-One guidance: a UNet batch of {B} rows does not fit {P} prompt(s) "
                               f"{'with' if state['uncond'] else 'without'} the unconditional branch")
        r = B // (groups * P)  # num_images_per_prompt: diffusers repeats each prompt r times in a row
        plan = self._plan(state, ehs, P, r)
        self.calls += 1
        if not plan.extra_rows:  # every needed prediction is already in the batch (e.g. p = erase, alt = "")
            self._local.pending = (plan, B, P, r, None)
            return None
        off = P * r if state["uncond"] else 0
        idx = torch.tensor([off + i * r + j for i in plan.sources for j in range(r)], device=sample.device)
        extra_h = plan.hidden.to(ehs.device, ehs.dtype)
        if extra_h.shape[1:] != ehs.shape[1:]:
            raise RuntimeError(f"All-but-One guidance: concept encodings {tuple(extra_h.shape[1:])} do not match the "
                               f"pipeline's prompt encodings {tuple(ehs.shape[1:])}")
        extra_h = extra_h.repeat_interleave(r, 0)
        new_sample = torch.cat([sample, sample[idx]])
        new_ehs = torch.cat([ehs, extra_h])
        if args:
            args[0] = new_sample
        else:
            kwargs["sample"] = new_sample
        if ehs_in_args:
            args[2] = new_ehs
        else:
            kwargs["encoder_hidden_states"] = new_ehs
        t_in_args = len(args) > 1
        t = args[1] if t_in_args else kwargs.get("timestep")
        if torch.is_tensor(t) and t.dim() > 0 and t.shape[0] == B:
            t = torch.cat([t, t[idx]])
            if t_in_args:
                args[1] = t
            else:
                kwargs["timestep"] = t
        added = kwargs.get("added_cond_kwargs")
        if added:  # SDXL: an extra row gets its prompt row's time ids (same image) and its own text's pooled
            kwargs["added_cond_kwargs"] = {k: self._extra_added(k, v, idx, B, r, plan, state) for k, v in added.items()}
        prev_rows = None
        if self.row_hooks is not None and self.row_hooks.current() is not None:
            prev_rows = self.row_hooks.state
            cur = self.row_hooks.current()
            rows = cur.repeat_interleave(B // cur.shape[0], 0)
            src = idx.cpu()
            if state["uncond"]:  # a negative's extra row (Geom regional negation) is weighted as the uncond rows
                neg = torch.tensor([plan.texts[k].startswith(NEGATIVE_ROW) for k in range(len(plan.sources))
                                    for _ in range(r)], dtype=torch.bool)
                src = torch.where(neg, src - off, src)
            self.row_hooks.set_coefficients(torch.cat([rows, rows[src]]))
        self.extra_rows += len(idx)
        self._local.pending = (plan, B, P, r, prev_rows)
        return tuple(args), kwargs

    @staticmethod
    def _extra_added(key, value, idx, B, r, plan, state):
        """One ``added_cond_kwargs`` entry with the extra rows appended. ``time_ids``: the source prompt's
        row. ``text_embeds`` (the pooled text embedding): eps(x, c) of an erase / alternative text ``c``
        means SDXL conditioned on ``c`` in both its inputs, the token context and the pooled vector, so
        the text's own pooled embedding (when the session gave them; the prompt's otherwise)."""
        if not (torch.is_tensor(value) and value.shape[:1] == (B,)):
            return value
        extra = value[idx]
        pooled = state.get("pooled")
        if key == "text_embeds" and pooled is not None:
            extra = torch.stack([pooled[t] for t in plan.texts]).to(value).repeat_interleave(r, 0)
        return torch.cat([value, extra])

    def _post(self, module, args, kwargs, output):
        pending = getattr(self._local, "pending", None)
        if pending is None:
            return None
        self._local.pending = None
        plan, B, P, r, prev_rows = pending
        if prev_rows is not None:
            self.row_hooks.state = prev_rows
        state = self.state
        out = output[0] if isinstance(output, tuple) else output.sample
        main, extra = out[:B], out[B:]
        off = P * r if state["uncond"] else 0
        eps_cond = main[off: off + P * r]
        eps_uncond = main[: P * r] if state["uncond"] else None
        eps_cond = eps_cond - plan.correction(eps_cond, eps_uncond, extra, r).to(eps_cond)
        new = torch.cat([eps_uncond, eps_cond]) if state["uncond"] else eps_cond
        if isinstance(output, tuple):
            return (new,) + tuple(output[1:])
        output.sample = new
        return output


class AboSession:
    """How :class:`~..diffusers_host.GatedPipeline` runs a stack's All-but-One guidance erasers (the
    registry's guidance session for method ``abo``): the UNet hooks above, the extra rows carrying the
    weight erasers' coefficients of the prompt they belong to. ``last_terms`` holds the firing terms of
    the last call; ``unet_hooks.calls`` / ``unet_hooks.extra_rows`` count UNet calls and extra rows."""

    def __init__(self, gated: GatedPipeline):
        self.gated = gated
        self.unet_hooks = AboUNetHooks(gated.pipe.unet)
        self._texts: dict = {}
        self._pooled: dict = {}
        self.last_terms: list[list[Term]] | None = None  # All-but-One's own
        self.last_row_terms: list[list[Term]] | None = None  # other mechanisms' (Geom regional negation)

    def attach(self):
        self.unet_hooks.row_hooks = self.gated.hooks
        self.unet_hooks.attach()

    def detach(self):
        self.unet_hooks.detach()

    def active(self, prompts, encoded, guidance_scale: float):
        terms = guidance_terms(self.gated.stack, encoded, self.gated.banks)
        edited = getattr(self.gated, "last_edited", None)
        if getattr(self.gated, "edited_states", "gate") == "full" and edited is not None and bool(edited.any()):
            # prompts whose given states are not their text's encoding: every ABO entry at full strength
            entries = [e for _, e in abo_entries(self.gated.stack)]
            full = terms_from_gates(entries, torch.ones(len(terms), len(entries)))
            terms = [full[i] if bool(edited[i]) else t for i, t in enumerate(terms)]
        terms = in_prompt_terms(terms, prompts, self.gated.stack)
        self.last_terms = terms
        texts = encode_texts(self.gated.encoder, terms, self._texts)
        pooled = encode_pooled(self.gated.encoder, texts, self._pooled)
        rows, hidden = self.gated.row_terms(prompts, guidance_scale)  # other mechanisms' terms (Geom regional)
        if any(rows):
            terms = [a + b for a, b in zip(terms, rows)]
            texts = {**texts, **hidden}
        self.last_row_terms = rows
        return self.unet_hooks.active(terms, texts, with_uncond=guidance_scale > 1.0, text_pooled=pooled)


def encode_pooled(encoder, texts, cache: dict) -> dict | None:
    """SDXL: ``{text: pooled [P]}`` for ``texts`` with an encoder that has ``pooled`` (the SDXL gate
    encoder); None for one-encoder models (no pooled conditioning)."""
    if not hasattr(encoder, "pooled"):
        return None
    todo = [t for t in texts if t not in cache]
    if todo:
        cache.update(zip(todo, encoder.pooled(todo)))
    return {t: cache[t] for t in texts}


class AboGuidedPipeline(GatedPipeline):
    """:class:`GatedPipeline` (which runs every kind of eraser, All-but-One guidance included), with the
    guidance session's counters at hand: ``last_terms``, ``unet_hooks``. Kept for existing code."""

    def __init__(self, pipe, stack, clip_skip: int | None = None):
        super().__init__(pipe, stack, clip_skip)
        self.sessions.setdefault("abo", AboSession(self))

    @property
    def unet_hooks(self) -> AboUNetHooks:
        return self.sessions["abo"].unet_hooks

    @property
    def last_terms(self):
        return self.sessions["abo"].last_terms


def abo_generate(pipe, prompts: Sequence[str], stack, guidance_scale: float = 7.5, negative_prompt=None,
                 clip_skip: int | None = None, **kwargs):
    """One call of ``pipe`` with ``stack``'s ABO guidance (and weight) erasers: the pipeline output."""
    with AboGuidedPipeline(pipe, stack, clip_skip) as guided:
        return guided(list(prompts), guidance_scale=guidance_scale, negative_prompt=negative_prompt, **kwargs)


# ------------------------------------------------------------------------------------ quality bench


def diffusers_handler(pipe, entries, prompts, seeds, gates, steps, cfg, sample):
    """The registry's guidance handler for diffusers pipelines (method ``abo``): the default
    sampler with the UNet hooks on; ``gates`` are the raw per-entry gates (strength applied here).

    Stacks that also hold weight erasers are refused here: the bench's sampler keeps their per-row
    hooks private (use :class:`AboGuidedPipeline`, which handles both)."""
    if _row_gated_hooks_present(pipe.unet):
        raise UnsupportedEraser("All-but-One guidance together with weight erasers in one bench stack: the bench's "
                                "per-row hooks cannot follow the extra rows (AboGuidedPipeline handles such stacks)")
    encoder = gate_encoder_for(pipe)  # SDXL: the concatenated context the UNet gets
    enc = encoder(list(prompts))
    banks = BankCache(encoder)
    best = torch.zeros(len(prompts), len(entries), dtype=torch.long)
    for j, e in enumerate(entries):
        best[:, j] = entry_gates(enc, e.eraser, e.gate, banks).scores.argmax(1)
    terms = in_prompt_terms(terms_from_gates(entries, gates, best), list(prompts), entries)
    texts = encode_texts(encoder, terms)
    unet_hooks = AboUNetHooks(pipe.unet).attach()
    try:
        with unet_hooks.active(terms, texts, with_uncond=cfg > 1.0, text_pooled=encode_pooled(encoder, texts, {})):
            return sample()
    finally:
        unet_hooks.detach()


def _row_gated_hooks_present(unet) -> bool:
    return any(getattr(h, "__module__", None) == hooks.__name__
               for m in unet.modules() for h in m._forward_hooks.values())


__all__ = ["AboGuidedPipeline", "AboSession", "AboUNetHooks", "abo_entries", "abo_generate", "diffusers_handler"]

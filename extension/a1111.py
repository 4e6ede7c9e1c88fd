"""AUTOMATIC1111: weight erasers as per-row forward hooks with gates from the CFG batch layout; Geom-Erasing
tokens (:mod:`.geom`) and All-but-One rows (:mod:`.abo`) from the same per-step gates.

Nothing writes ``.weight`` (the built-in Lora extension backs weights up and merges into them; an
in-place edit would be captured in its backup). :class:`~conceptgate.adapters.hooks.RowGatedDeltas`
adds ``sum_i c[row, i] * U_i(D_i(x))`` to each target module's output.

Row bookkeeping. ``CFGDenoiser.forward`` (``modules/sd_samplers_cfg_denoiser.py``) builds, per step::

    x_in = [image 0 x n_0 sub-prompts, image 1 x n_1, ...] + [uncond of image 0, 1, ..., B-1]

(uncond rows last; ``n_i`` = number of AND parts of prompt i; SDXL passes dict conditionings), fires
``on_cfg_denoiser`` with ``text_cond`` [sum n_i, 77k, D] and ``text_uncond`` [B, ...], then calls the
UNet either once on all rows (``batch_cond_uncond``), in consecutive chunks, or on the cond rows
and then on the uncond rows (cond/uncond of different lengths); under ``s_min_uncond`` /
``skip_early_cond`` the uncond rows are dropped from ``x_in``. In every case the UNet calls consume
the rows *in order*. So:

* ``on_cfg_denoiser`` computes one coefficient row per cond row (its own gate, from the very
  ``text_cond`` row the UNet will see) and, for image i's uncond row, image i's gate (max over its
  AND parts; official semantics, shared weights) or 0 for ``cond_only`` entries; and rewinds a cursor;
* a forward pre-hook on the diffusion model hands each UNet call the next ``batch`` rows.

Rows past the table (an edit model's second uncond block, another extension's extra pass) continue
with the uncond block again, i.e. each image's prompt gate.

All-but-One rows (:mod:`.abo`) are inserted between the cond and the uncond rows in the same callback;
their table rows carry the coefficients of the image they belong to. Geom-Erasing tokens (:mod:`.geom`)
lengthen ``text_uncond`` of the images whose gate fires, which A1111 handles as a negative prompt longer
than the positive one (separate cond / uncond calls, or padded with ``pad_cond_uncond``).
"""

from __future__ import annotations

import logging

import torch

from ..adapters.abo.guidance import NEGATIVE_ROW
from ..adapters.hooks import RowGatedDeltas
from ..adapters.gate import EncodedText, GateReport, positions_mask, to_window
from ..adapters.gate import BankCache
from ..adapters.stack import EraserStack
from . import ldm
from .abo import A1111Guidance, abo_only, image_terms, swapped_texts
from .geom import GeomTokens
from .text import HostTextEncoder, conditioning_hidden, subprompts

log = logging.getLogger("conceptgate")


class RowTable:
    """Coefficient rows of one CFG step and the cursor the UNet calls advance."""

    def __init__(self, cond: torch.Tensor, uncond: torch.Tensor):
        self.cond, self.uncond = cond, uncond  # [n_cond, E], [B, E]
        self.cursor = 0

    def take(self, n: int) -> torch.Tensor:
        n_cond, n_unc = self.cond.shape[0], max(self.uncond.shape[0], 1)
        rows = [self.cond[k] if k < n_cond else self.uncond[(k - n_cond) % n_unc]
                for k in range(self.cursor, self.cursor + n)]
        self.cursor += n
        return torch.stack(rows)


class A1111Runtime:
    """One generation's glue on ``sd_model.model.diffusion_model``: per-row weight hooks, Geom-Erasing tokens
    on the unconditional rows, All-but-One rows in the CFG batch; gates from every step's conditioning."""

    def __init__(self, stack: EraserStack, sd_model):
        self.stack = stack
        self.attach_to(sd_model)
        # per pass (hires or not): (tokens, image_of_row, counts, texts) of the prompts' AND parts
        self.prompt_rows: dict[bool, tuple | None] = {False: None, True: None}
        self.is_hr = lambda: False
        self.cfg_scale = lambda: 7.0
        self.table: RowTable | None = None
        self.first_report: GateReport | None = None
        self.image_gates: torch.Tensor | None = None  # [B, E] of the last step (for the UI)
        self.first_images: dict | None = None  # per image of the first step: coefficients, geom, ABO terms
        self._rows_of_step = (0, 0)

    # ------------------------------------------------------------- model
    def attach_to(self, sd_model):
        self.sd_model = sd_model
        self.dm = sd_model.model.diffusion_model
        self.encoder = HostTextEncoder(sd_model)
        self.banks = BankCache(self.encoder)
        self.hooks = None
        if self.stack.weight_entries:
            self.layout, names = ldm.module_map(self.dm)
            ldm.check_fits(self.stack, self.layout, names, self.dm)
            self.hooks = RowGatedDeltas(self.stack, lambda n: self.dm.get_submodule(names[n]))
        self.geom = GeomTokens(self.stack, sd_model)  # encoded now, before sampling
        self.abo = A1111Guidance(self.stack, sd_model, uncond_terms=self.geom.regional_names)  # regional rides its rows
        self._pre = None

    def attach(self) -> "A1111Runtime":
        for entry in self.stack.entries:  # encode the concepts / load the detectors now, not mid-sampling
            self.banks.prepare(entry)
        if self.hooks is not None:
            self.hooks.attach()
        if self._pre is None:
            self._pre = self.dm.register_forward_pre_hook(self._unet_call, with_kwargs=True)
        return self

    def detach(self):
        if self.hooks is not None:
            self.hooks.detach()
            self.hooks.set_coefficients(None)
        if self._pre is not None:
            self._pre.remove()
            self._pre = None
        self.table = None

    def follow_model(self, sd_model):
        """Re-attach when the webui swapped the model (a hires-fix checkpoint, for instance)."""
        if sd_model is None or sd_model.model.diffusion_model is self.dm:
            return
        self.detach()
        self.attach_to(sd_model)
        self.attach()

    # ------------------------------------------------------------- prompts
    def set_prompts(self, prompts, hr_prompts=None):
        self.prompt_rows = {False: self._rows(prompts), True: self._rows(hr_prompts) if hr_prompts else None}

    def _rows(self, prompts):
        if not prompts:
            return None
        texts, image_of_row = [], []
        for i, prompt in enumerate(prompts):
            for part in subprompts(prompt):
                texts.append(part)
                image_of_row.append(i)
        tokens, counts = self.encoder.token_rows(texts)
        if self.abo:  # in-prompt All-but-One: the swapped parts are encoded now, before sampling
            self.abo.conds.add(swapped_texts(self.stack, texts))
        return tokens, image_of_row, counts, texts

    # ------------------------------------------------------------- CFG step
    def on_cfg_denoiser(self, params):
        hidden = conditioning_hidden(params.text_cond)
        n_cond = hidden.shape[0]
        uncond = params.text_uncond
        n_images = (uncond["crossattn"] if isinstance(uncond, dict) else uncond).shape[0]
        rows = self.prompt_rows.get(bool(self.is_hr())) or self.prompt_rows.get(False)
        if rows is not None and len(rows[1]) == n_cond and max(rows[1]) < n_images:
            tokens, image_of_row, counts, texts = rows
            known = self.encoder.tokens_known
        else:  # the rows do not match the prompts (another extension changed them): cosine only, bare-word terms
            tokens = [set() for _ in range(n_cond)]
            image_of_row = [min(r * n_images // max(n_cond, 1), n_images - 1) for r in range(n_cond)]
            known, counts, texts = False, None, None
        window = to_window(hidden)
        mask = positions_mask(counts, window.shape[1]) if counts is not None else None  # None: the rule fails closed
        encoded = EncodedText(window, tokens, mask=mask)
        coeffs, report = self.stack.gates(encoded, banks=self.banks, tokens_known=known)
        per_image = image_coefficients(coeffs, image_of_row, n_images)
        if self.geom:  # Geom-Erasing: tokens on the unconditional rows of the images whose gate fires
            params.text_uncond = self.geom.append(params.text_uncond, per_image)
        sources, terms = [], [[] for _ in range(n_images)]
        if self.abo:  # All-but-One (and Geom regional negation): rows between the conditional and the unconditional ones
            terms = image_terms(self.stack, encoded, self.banks, known, image_of_row, n_images, texts)
            private = {}
            if self.geom.regional:  # the negative as the UNet sees it this step, after any prompt-mode tokens
                regional = self.geom.regional_terms(per_image)
                private = self.geom.regional_texts(params.text_uncond, regional)
                terms = [a + r for a, r in zip(terms, regional)]
            first_row = [image_of_row.index(i) if i in image_of_row else 0 for i in range(n_images)]
            single = [image_of_row.count(i) == 1 for i in range(n_images)]
            sources = self.abo.extend(params, terms, n_cond, first_row, single, texts, private)
        uncond_rows = per_image.clone()
        for j, entry in enumerate(self.stack.entries):
            if entry.gate.cond_only:
                uncond_rows[:, j] = 0.0
        extra_rows = per_image[sources] if sources else None  # extra rows: their image's coefficients
        if sources and self.geom.regional:  # regional negation's rows are negatives: the unconditional rows' coefficients
            negative = [t.startswith(NEGATIVE_ROW) for t in self.abo.step["plan"].texts]
            extra_rows = torch.where(torch.tensor(negative)[:, None], uncond_rows[sources], extra_rows)
        cond_rows = torch.cat([coeffs, extra_rows]) if sources else coeffs
        self.table = RowTable(cond_rows, uncond_rows)
        self._rows_of_step = (cond_rows.shape[0], n_images)
        self.image_gates = per_image
        if self.first_report is None:
            self.first_report = report
        if self.first_images is None:
            self.first_images = {"coeffs": per_image.clone(), "geom": [list(a) for a in self.geom.applied] if self.geom else None,
                                 "abo": abo_only(terms, self.abo.uncond_terms) if self.abo else None}

    def on_cfg_denoised(self, params):
        if self.abo and self.table is not None:
            n_cond, _ = self._rows_of_step
            self.abo.denoised(params.x, uncond_computed=self.table.cursor > n_cond, cfg_scale=self.cfg_scale())

    def on_cfg_after_cfg(self, params):
        if self.abo:
            params.x = self.abo.after_cfg(params.x)

    def _unet_call(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("x")
        if self.table is None or x is None:
            if self.hooks is not None:
                self.hooks.set_coefficients(None)
            return None
        rows = self.table.take(int(x.shape[0]))
        if self.hooks is not None:
            self.hooks.set_coefficients(rows)
        return None


def image_coefficients(coeffs: torch.Tensor, image_of_row: list[int], n_images: int) -> torch.Tensor:
    """Each image's coefficients: per entry, its AND part with the strongest (largest |m|) gate."""
    out = torch.zeros(n_images, coeffs.shape[1])
    for r, i in enumerate(image_of_row):
        stronger = coeffs[r].abs() > out[i].abs()
        out[i] = torch.where(stronger, coeffs[r], out[i])
    return out

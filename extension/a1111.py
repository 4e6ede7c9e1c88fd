"""Weight erasers in AUTOMATIC1111: per-row forward hooks with gates from the CFG batch layout.

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
"""

from __future__ import annotations

import logging

import torch

from ..adapters.hooks import RowGatedDeltas
from ..adapters.gate import EncodedText, GateReport, positions_mask, to_window
from ..adapters.gate import BankCache
from ..adapters.stack import EraserStack
from . import ldm
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
    """One generation's hooks on ``sd_model.model.diffusion_model``."""

    def __init__(self, stack: EraserStack, sd_model):
        self.stack = stack
        self.attach_to(sd_model)
        self.prompt_rows: dict[bool, tuple[list[set[int]], list[int]] | None] = {False: None, True: None}
        self.is_hr = lambda: False
        self.table: RowTable | None = None
        self.first_report: GateReport | None = None
        self.image_gates: torch.Tensor | None = None  # [B, E] of the last step (for the UI)

    # ------------------------------------------------------------- model
    def attach_to(self, sd_model):
        self.sd_model = sd_model
        self.dm = sd_model.model.diffusion_model
        self.layout, names = ldm.module_map(self.dm)
        ldm.check_fits(self.stack, self.layout, names, self.dm)
        self.encoder = HostTextEncoder(sd_model)
        self.banks = BankCache(self.encoder)
        self.hooks = RowGatedDeltas(self.stack, lambda n: self.dm.get_submodule(names[n]))
        self._pre = None

    def attach(self) -> "A1111Runtime":
        for entry in self.stack.entries:  # encode the concepts / load the detectors now, not mid-sampling
            self.banks.prepare(entry)
        self.hooks.attach()
        if self._pre is None:
            self._pre = self.dm.register_forward_pre_hook(self._unet_call, with_kwargs=True)
        return self

    def detach(self):
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
        return tokens, image_of_row, counts

    # ------------------------------------------------------------- CFG step
    def on_cfg_denoiser(self, params):
        hidden = conditioning_hidden(params.text_cond)
        n_cond = hidden.shape[0]
        uncond = params.text_uncond
        n_images = (uncond["crossattn"] if isinstance(uncond, dict) else uncond).shape[0]
        rows = self.prompt_rows.get(bool(self.is_hr())) or self.prompt_rows.get(False)
        if rows is not None and len(rows[1]) == n_cond and max(rows[1]) < n_images:
            tokens, image_of_row, counts = rows
            known = self.encoder.tokens_known
        else:  # the rows do not match the prompts (another extension changed them): cosine only
            tokens = [set() for _ in range(n_cond)]
            image_of_row = [min(r * n_images // max(n_cond, 1), n_images - 1) for r in range(n_cond)]
            known, counts = False, None
        window = to_window(hidden)
        mask = positions_mask(counts, window.shape[1]) if counts is not None else None  # None: the rule fails closed
        coeffs, report = self.stack.gates(EncodedText(window, tokens, mask=mask), banks=self.banks, tokens_known=known)
        per_image = image_coefficients(coeffs, image_of_row, n_images)
        uncond_rows = per_image.clone()
        for j, entry in enumerate(self.stack.entries):
            if entry.gate.cond_only:
                uncond_rows[:, j] = 0.0
        self.table = RowTable(coeffs, uncond_rows)
        self.image_gates = per_image
        if self.first_report is None:
            self.first_report = report

    def _unet_call(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("x")
        if self.table is None or x is None:
            self.hooks.set_coefficients(None)
            return None
        self.hooks.set_coefficients(self.table.take(int(x.shape[0])))
        return None


def image_coefficients(coeffs: torch.Tensor, image_of_row: list[int], n_images: int) -> torch.Tensor:
    """Each image's coefficients: per entry, its AND part with the strongest (largest |m|) gate."""
    out = torch.zeros(n_images, coeffs.shape[1])
    for r, i in enumerate(image_of_row):
        stronger = coeffs[r].abs() > out[i].abs()
        out[i] = torch.where(stronger, coeffs[r], out[i])
    return out

"""Forge: weight erasers as LoRA patches on a clone of ``p.sd_model.forge_objects.unet`` (Geom-Erasing and
All-but-One on the same clone and pass: :mod:`.geom`, :mod:`.abo`).

Forge resets ``forge_objects`` right before every sampling pass (and again for the hires pass), so
the patches are added in ``process_before_every_sampling``::

    unet = p.sd_model.forge_objects.unet.clone()
    unet.add_patches(filename=..., patches=..., strength_patch=m)     # Forge HEAD (keyword-only)
    unet.add_patches(patches, m)                                       # old Forge / reForge (ComfyUI API)
    p.sd_model.forge_objects.unet = unet

The patches come from the host's own LoRA loader (``load_lora`` with ``model_lora_keys_unet(model,
{})``, as Forge's Lora extension does), fed with the eraser's kohya tensors. Forge HEAD re-merges
only when ``str(list(lora_patches.keys()))`` changes; the identifier holds ``filename``, so the
filename carries the file's content hash and the gate (and the strength is in the key as well).

One set of weights serves the whole batch, so a batch gets one coefficient per eraser: per eraser,
the strongest gate over the batch's prompts and their AND parts (an eraser cannot be bypassed by
putting the concept in the second prompt of a batch). ``cond_only`` cannot be honoured with shared
weights; the report says so. Geom-Erasing tokens and All-but-One rows are per image (they change
conditionings and rows, not weights), from the same per-image gates.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass

import torch

from ..adapters.hooks import RowGatedDeltas, combined_deltas
from ..adapters.files import kohya_tensors

from ..adapters.errors import IncompatibleModelError
from ..adapters.gate import EncodedText, GateReport
from ..adapters.lowrank import ModuleDelta
from ..adapters.gate import BankCache
from ..adapters.stack import EraserStack
from . import host as _host
from . import ldm
from .a1111 import image_coefficients
from .text import HostTextEncoder, subprompts


def lora_module(host: str):
    return importlib.import_module("backend.patcher.lora" if host == _host.FORGE else "ldm_patched.modules.lora")


def host_patches(unet, modules: dict[str, ModuleDelta], host: str, source: str) -> dict:
    lora = lora_module(host)
    key_map = lora.model_lora_keys_unet(unet.model, {})  # a fresh dict: the default is shared
    loaded = lora.load_lora(kohya_tensors(modules), key_map)
    patches = loaded[0] if isinstance(loaded, tuple) else loaded  # HEAD returns (patches, remaining)
    if len(patches) != len(modules):
        raise IncompatibleModelError(source, f"the host mapped {len(patches)} of {len(modules)} modules")
    return patches


def content_hash(stack: EraserStack, coeffs: torch.Tensor, which: list[int]) -> str:
    h = hashlib.sha256()
    for i in which:
        e = stack.entries[i].eraser
        h.update((e.sha256 or f"{e.name}:{id(e)}").encode())
        h.update(f":{float(coeffs[i]):.8g};".encode())
    h.update(stack.combine.encode())
    return h.hexdigest()[:16]


def patch_filename(stack: EraserStack, coeffs: torch.Tensor, which: list[int]) -> str:
    names = "+".join(stack.entries[i].eraser.name for i in which)
    gates = ",".join(f"{float(coeffs[i]):.6g}" for i in which)
    return f"conceptgate:{names}:{content_hash(stack, coeffs, which)}:m={gates}"


def patch_unet(unet, stack: EraserStack, coeffs: torch.Tensor, host: str) -> tuple[object, list[str]]:
    """A clone of ``unet`` with the stack's weight erasers at coefficients ``coeffs`` [E];
    returns (clone, the filenames used)."""
    layout, names = ldm.module_map(unet.model.diffusion_model)
    ldm.check_fits(stack, layout, names, unet.model.diffusion_model)
    m = unet.clone()
    coeffs = coeffs.flatten()
    used = []

    def add(patches, strength, filename):
        if host == _host.FORGE:
            m.add_patches(filename=filename, patches=patches, strength_patch=strength)
        else:
            m.add_patches(patches, strength)
        used.append(filename)

    # the whole stack as one patch per weight; the filename changes whenever a gate does, so Forge re-merges
    live = [i for i, _ in stack.weight_entries if float(coeffs[i]) != 0.0]
    merged = combined_deltas(stack, coeffs)
    if merged:
        add(host_patches(m, merged, host, "conceptgate stack"), 1.0, patch_filename(stack, coeffs, live))
    return m, used


@dataclass
class BatchGates:
    """The gates of one Forge sampling pass: ``batch`` [E] (weight patches: per eraser the strongest over the
    batch), ``per_image`` [B, E] (what Geom-Erasing and All-but-One use, per image), the first prompt's report,
    the prompts as encoded (one row per AND part) and the image of each row."""

    batch: torch.Tensor
    report: GateReport
    per_image: torch.Tensor
    encoded: EncodedText
    image_of_row: list[int]
    tokens_known: bool
    texts: list[str] | None = None  # each row's AND-part text


def batch_gates(stack: EraserStack, sd_model, prompts, banks: BankCache | None = None) -> BatchGates:
    encoder = banks.encoder if banks is not None else HostTextEncoder(sd_model)
    banks = banks or BankCache(encoder)
    texts, image_of_row = [], []
    for i, prompt in enumerate(prompts):
        for part in subprompts(prompt):
            texts.append(part)
            image_of_row.append(i)
    encoded = encoder(texts)
    coeffs, report = stack.gates(encoded, banks=banks, tokens_known=encoder.tokens_known)
    from .state import check_finite_coefficients  # NaN would vanish in the max below: stop instead
    check_finite_coefficients(stack, coeffs, "Forge batch")
    per_image = image_coefficients(coeffs, image_of_row, len(prompts))
    batch = image_coefficients(per_image, [0] * len(prompts), 1)[0]
    for row, entry in zip(report.rows, stack.entries):
        if entry.gate.cond_only and entry.eraser.kind == "weight" and not per_row_enabled():
            row["detail"] = (row["detail"] + "; " if row["detail"] else "") + "cond_only not possible with Forge weight patches"
    return BatchGates(batch, report, per_image, encoded, image_of_row, encoder.tokens_known, texts)


PER_ROW_OPTION = "conceptgate_forge_per_row"
COND = 0


def per_row_enabled() -> bool:
    try:
        from modules import shared

        return bool(getattr(shared.opts, PER_ROW_OPTION, False))
    except (ImportError, AttributeError):
        return False


class ForgeRowHooks:
    """Weight erasers per image on Forge (opt-in, setting ``conceptgate_forge_per_row``): forward hooks on the
    UNet's modules instead of Forge's LoRA merge, as in A1111, so each image of a batch carries its own gate.

    Forge calls its UNet on chunks of ``B`` rows and passes ``transformer_options["cond_or_uncond"]`` (0: a
    conditional chunk, 1: the unconditional one) to the diffusion model, so a forward pre-hook gives row ``i``
    of a conditional chunk image ``i``'s coefficients (its strongest AND part: Forge's chunks do not say which
    AND part they hold) and of the unconditional chunk the same, or 0 for ``cond_only`` entries (which this
    path can honour). All-but-One's extra chunks are marked conditional and carry their image's. The modules
    are shared by every clone of the patcher: the hooks are removed when the generation ends."""

    def __init__(self, stack: EraserStack, dm):
        self.stack, self.dm = stack, dm
        layout, names = ldm.module_map(dm)
        ldm.check_fits(stack, layout, names, dm)
        self.hooks = RowGatedDeltas(stack, lambda n: dm.get_submodule(names[n]))
        self.cond_rows: torch.Tensor | None = None
        self.uncond_rows: torch.Tensor | None = None
        self._pre = None
        self.calls = 0

    def attach(self) -> "ForgeRowHooks":
        self.hooks.attach()
        if self._pre is None:
            self._pre = self.dm.register_forward_pre_hook(self._call, with_kwargs=True)
        return self

    def detach(self):
        self.hooks.detach()
        self.hooks.set_coefficients(None)
        if self._pre is not None:
            self._pre.remove()
            self._pre = None

    def set_gates(self, per_image: torch.Tensor):
        self.cond_rows = per_image.clone()
        self.uncond_rows = per_image.clone()
        for j, entry in enumerate(self.stack.entries):
            if entry.gate.cond_only:
                self.uncond_rows[:, j] = 0.0

    def _call(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("x")
        if self.cond_rows is None or x is None:
            self.hooks.set_coefficients(None)
            return None
        B = self.cond_rows.shape[0]
        cou = list((kwargs.get("transformer_options") or {}).get("cond_or_uncond") or [])
        if x.shape[0] != len(cou) * B:
            if x.shape[0] % B:
                raise RuntimeError(f"ConceptGate: a Forge UNet call of {x.shape[0]} rows does not fit a batch of {B} "
                                   "images; per-row weights cannot tell which image a row belongs to")
            cou = [COND] * (x.shape[0] // B)  # no chunk marks (another extension's call): prompt gates
        self.hooks.set_coefficients(torch.cat([self.cond_rows if c == COND else self.uncond_rows for c in cou]))
        self.calls += 1
        return None

"""ConceptGate on ComfyUI models: everything here goes through ComfyUI's own patch mechanisms.

* Weight path (one gate for the whole batch): the erasers become LoRA patches on a
  ``ModelPatcher`` clone, built by ComfyUI's own ``comfy.lora.load_lora`` with the key map ComfyUI
  derives from the model config (the same route as the stock ``LoraLoader``). ComfyUI patches the
  weights once when it loads the model and keeps its own backup.
* Per-row path: forward hooks on the target modules, registered as a ``PatcherInjection`` (added
  when ComfyUI patches the model, removed when it unpatches), with per-row coefficients set by a
  ``DIFFUSION_MODEL`` wrapper from the batch's ``uuids`` / ``cond_or_uncond``; gates are computed
  per conditioning in a ``CALC_COND_BATCH`` wrapper. No weight is copied; both wrapper lists are
  stackable, so no single-slot hook (``model_function_wrapper``, attention replace) is taken.
"""

from __future__ import annotations

import logging

import torch

import comfy.lora
import comfy.patcher_extension
import comfy.utils

from ..adapters.hooks import RowGatedDeltas, combined_deltas
from ..adapters.errors import IncompatibleModelError
from ..adapters.files import kohya_tensors
from ..adapters.fingerprint import EDIT_METHODS, edit_base_mismatch
from ..adapters.gate import EncodedText, GateReport, special_token_filter, to_window
from ..adapters.lowrank import ModuleDelta
from ..adapters.naming import UNetLayout, guess_family
from ..adapters.gate import BankCache
from ..adapters.stack import EraserStack

log = logging.getLogger("conceptgate")
KEY = "conceptgate"
TOKENS_KEY = "conceptgate_tokens"  # set on conditionings by our text-encode node: content token ids
WINDOW_IDS_KEY = "conceptgate_window_ids"  # and the token id at every position of the first 77-token window
TEXT_KEY = "conceptgate_text"  # and the prompt text (the in-prompt All-but-One form swaps a word in it)


# ------------------------------------------------------------------ text
def _tokenizers(clip):
    tok = clip.tokenizer
    found = [v for v in vars(tok).values() if hasattr(v, "tokenize_with_weights") and hasattr(v, "end_token")]
    return found or [tok]


def _specials(clip) -> set[int]:
    specials = set()
    for t in _tokenizers(clip):
        specials |= {x for x in (getattr(t, "start_token", None), getattr(t, "end_token", None),
                                 getattr(t, "pad_token", None)) if x is not None}
    return specials


def window_ids(clip, tokens: dict) -> list[int]:
    """The token id at every position of the first 77-token window (an embedding vector counts as a
    content position with id -1)."""
    first = next(iter(tokens.values()))[0]
    return [t[0] if isinstance(t[0], int) else -1 for t in first][:77]


def encoded_conditioning(clip_specials: set[int] | None, ctx: torch.Tensor, extra: dict) -> EncodedText:
    """What the gate reads from one CONDITIONING entry: its context and, where our text-encode node
    recorded them, its tokens and content positions (a stock CLIPTextEncode records neither)."""
    tokens = extra.get(TOKENS_KEY)
    hidden = to_window(ctx[:1].float())
    ids = extra.get(WINDOW_IDS_KEY)
    mask = None
    if ids is not None and clip_specials is not None:
        row = torch.tensor(list(ids)[: hidden.shape[1]], dtype=torch.long)
        m = ~torch.isin(row, torch.tensor(sorted(clip_specials), dtype=torch.long))
        mask = torch.zeros(1, hidden.shape[1], dtype=torch.bool)
        mask[0, : len(m)] = m
    return EncodedText(hidden, [set(tokens or ())], mask=mask)


def content_tokens(clip, tokens: dict) -> set[int]:
    """Token ids of a ComfyUI token dict without start/end/pad (and without embedding tensors)."""
    keep = special_token_filter(sorted(_specials(clip)))
    ids = []
    first = next(iter(tokens.values()))  # SDXL: the g and l lists hold the same words
    for chunk in first:
        ids += [t[0] for t in chunk if isinstance(t[0], int)]
    return keep(ids)


class ComfyTextEncoder:
    """Encodes text with a ComfyUI ``CLIP`` exactly as ``CLIPTextEncode`` does (CLIP skip set by
    ``CLIPSetLastLayer`` included); only the first 77-token window is used for gates."""

    def __init__(self, clip):
        self.clip = clip

    def encode_one(self, text: str) -> tuple[torch.Tensor, set[int], list[int]]:
        tokens = self.clip.tokenize(text)
        cond = self.clip.encode_from_tokens(tokens)
        return to_window(cond.float()), content_tokens(self.clip, tokens), window_ids(self.clip, tokens)

    def __call__(self, texts) -> EncodedText:
        rows = [self.encode_one(t) for t in texts]
        hidden = torch.cat([r[0] for r in rows])
        ids = torch.full((len(rows), hidden.shape[1]), -2, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r[2])] = torch.tensor(r[2][: hidden.shape[1]], dtype=torch.long)
        specials = torch.tensor(sorted(_specials(self.clip) | {-2}), dtype=torch.long)
        return EncodedText(hidden, [r[1] for r in rows], ids, ~torch.isin(ids, specials))


# ------------------------------------------------------------------ model layout
def unet_layout(model) -> UNetLayout:
    cfg = dict(model.model.model_config.unet_config)
    cfg.setdefault("transformer_depth_middle", None)
    layout = UNetLayout(cfg)
    layout.family = guess_family(cfg)
    return layout


def module_names(model) -> dict[str, str]:
    """canonical (diffusers) module path -> ComfyUI module path, from ComfyUI's own map."""
    mapping = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    return {k[: -len(".weight")]: "diffusion_model." + v[: -len(".weight")] for k, v in mapping.items() if k.endswith(".weight")}


def effective_attention_weights(model, names: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """The attn2 ``to_k`` / ``to_v`` weights the sampler will use, in float32 under canonical names: the
    base weight (ComfyUI's backup while another clone is patched in) plus this patcher's own patches
    (LoRAs, merges), through ComfyUI's ``get_key_patches`` and ``comfy.lora.calculate_weight``. What a
    closed-form edit is solved on, and what its base fingerprint is checked against."""
    names = names if names is not None else module_names(model)
    kp = model.get_key_patches("diffusion_model.")
    out = {}
    for canonical, path in names.items():
        if "attn2" in canonical and canonical.endswith((".to_k", ".to_v")) and path + ".weight" in kp:
            entry = kp[path + ".weight"]
            weight, convert = entry[0]
            w = convert(weight.to(torch.float32, copy=True), inplace=True)
            if len(entry) > 1:
                w = comfy.lora.calculate_weight(entry[1:], w, path + ".weight")
            out[canonical] = w
    return out


def _stored_in_float32(model, names: dict[str, str]) -> bool:
    for canonical, path in names.items():
        if "attn2" in canonical and canonical.endswith(".to_k"):
            return model.model.get_submodule(path).weight.dtype == torch.float32
    return True


def check_fits(model, stack: EraserStack, allow_other_base: bool = False) -> EraserStack:
    """``stack`` if every weight eraser fits ``model`` (layout, and a closed-form edit's base fingerprint);
    a best-effort entry that does not is left out (noted in the report); any other raises
    :class:`IncompatibleModelError` naming the file."""
    layout = unet_layout(model)
    names = module_names(model)
    attn = {}

    def problem(entry):
        if entry.eraser.kind != "weight":
            return None
        missing = [n for n in entry.eraser.modules if n not in names]
        problems = ([f"{len(missing)} module(s) not in this model, e.g. {missing[0]}"] if missing else [])
        problems += [p for p in entry.eraser.check_against(layout) if "not in this UNet" not in p]
        if not problems and entry.eraser.method in EDIT_METHODS:
            if not attn and _stored_in_float32(model, names):  # fp16/bf16 models cannot be compared
                attn.update(effective_attention_weights(model, names))
            why = edit_base_mismatch(entry.eraser, attn or None, allow_other_base)
            problems += [why] if why else []
        return "; ".join(problems)

    return stack.applicable(problem, lambda e, why: IncompatibleModelError(e.eraser.source or e.eraser.name, why))


# ------------------------------------------------------------------ weight path
def comfy_patches(model, modules: dict[str, ModuleDelta]) -> dict:
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    return comfy.lora.load_lora(kohya_tensors(modules), key_map, log_missing=True)


def _kept(kept: EraserStack, stack: EraserStack, coeffs: torch.Tensor):
    """Coefficients of the entries ``check_fits`` kept."""
    if kept is stack:
        return stack, coeffs
    ids = {id(e) for e in kept.entries}
    return kept, coeffs[[i for i, e in enumerate(stack.entries) if id(e) in ids]]


def weight_patched(model, stack: EraserStack, coeffs: torch.Tensor, allow_other_base: bool = False):
    """A clone of ``model`` with the stack as weight patches at coefficients ``coeffs`` [E]
    (one LoRA patch per weight; ComfyUI applies it when it loads the model and keeps its backup)."""
    stack, coeffs = _kept(check_fits(model, stack, allow_other_base), stack, coeffs)
    m = model.clone()
    merged = combined_deltas(stack, coeffs)
    if merged:
        m.add_patches(comfy_patches(m, merged), 1.0)
    return m


# ------------------------------------------------------------------ per-row path
class RowGateRuntime:
    """Per-conditioning gates during sampling, and the hooks that apply them per row."""

    def __init__(self, model, stack: EraserStack, encoder, report_sink=None):
        self.stack = stack
        self.banks = BankCache(encoder)
        self.specials = _specials(encoder.clip) if hasattr(encoder, "clip") else None
        names = module_names(model)
        diffusion = model.model
        self.hooks = RowGatedDeltas(stack, lambda n: diffusion.get_submodule(names[n]))
        self.by_uuid: dict = {}
        self.report_sink = report_sink

    def _gate(self, cond: dict) -> torch.Tensor:
        ctx = cond.get("cross_attn")
        if ctx is None:
            return torch.zeros(len(self.stack.entries))
        enc = encoded_conditioning(self.specials, ctx, cond)
        coeffs, report = self.stack.gates(enc, banks=self.banks, tokens_known=cond.get(TOKENS_KEY) is not None)
        if self.report_sink is not None:
            self.report_sink(report)
        return coeffs[0]

    def calc_cond_batch_wrapper(self, executor, model, conds, x_in, timestep, model_options):
        positives = []
        for index, cond_list in enumerate(conds):
            for cond in cond_list or []:
                uid = cond.get("uuid")
                if uid is not None and uid not in self.by_uuid:
                    self.by_uuid[uid] = self._gate(cond) if index == 0 else None
                if index == 0 and uid is not None:
                    positives.append(self.by_uuid[uid])
        # official semantics: the unconditional branch carries the prompt's gate (weights are shared)
        pos = torch.stack(positives).max(0).values if positives else torch.zeros(len(self.stack.entries))
        uncond = pos.clone()
        for i, e in enumerate(self.stack.entries):
            if e.gate.cond_only:
                uncond[i] = 0.0
        self._uncond = uncond
        if len(self.by_uuid) > 4096:
            self.by_uuid.clear()
        return executor(model, conds, x_in, timestep, model_options)

    def diffusion_model_wrapper(self, executor, *args, **kwargs):
        transformer_options = args[5] if len(args) > 5 else kwargs.get("transformer_options", {})
        uuids = transformer_options.get("uuids") or []
        kinds = transformer_options.get("cond_or_uncond") or []
        rows = []
        for uid, kind in zip(uuids, kinds):
            g = self.by_uuid.get(uid)
            rows.append(g if (kind == 0 and g is not None) else getattr(self, "_uncond", torch.zeros(len(self.stack.entries))))
        coeffs = torch.stack(rows) if rows else None
        with self.hooks.coefficients(coeffs):
            return executor(*args, **kwargs)


def row_gated(model, stack: EraserStack, clip, report_sink=None, allow_other_base: bool = False):
    """A clone of ``model`` whose erasers are gated per conditioning and per batch row."""
    stack = check_fits(model, stack, allow_other_base)
    m = model.clone()
    runtime = RowGateRuntime(m, stack, ComfyTextEncoder(clip), report_sink)
    for entry in stack.entries:  # encode the concepts / load the detectors now, not in the middle of sampling
        runtime.banks.prepare(entry)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, KEY, runtime.calc_cond_batch_wrapper)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, KEY, runtime.diffusion_model_wrapper)
    m.set_injections(KEY, [comfy.patcher_extension.PatcherInjection(
        inject=lambda patcher: runtime.hooks.attach(), eject=lambda patcher: runtime.hooks.detach())])
    return m


def gates_for_conditioning(stack: EraserStack, clip, conditioning, banks: BankCache | None = None) -> tuple[torch.Tensor, GateReport]:
    """Coefficients [E] for a CONDITIONING (max over its entries) and a report."""
    banks = banks or BankCache(ComfyTextEncoder(clip))
    best, best_report = None, GateReport()
    for cond_tensor, extra in conditioning:
        enc = encoded_conditioning(_specials(clip), cond_tensor, extra)
        coeffs, report = stack.gates(enc, banks=banks, tokens_known=extra.get(TOKENS_KEY) is not None)
        if best is None or float(coeffs.sum()) > float(best.sum()):
            best, best_report = coeffs[0], report
    if best is None:
        best = torch.zeros(len(stack.entries))
    return best, best_report


# ------------------------------------------------------------------ batch extensions (extra CFG rows)
#: MODEL wrapper keys of the patches that append rows to the sampler's batched prediction and fold them back
#: after CFG (All-but-One guidance, Geom-Erasing regional negation): one of them per MODEL, since each expects
#: the plain ``[positive, negative]`` batch
BATCH_EXTENSIONS = {"conceptgate_abo": "All-but-One guidance", "conceptgate_geom_regional": "Geom-Erasing regional negation"}


def attach_batch_extension(model, key: str, runtime, source: str):
    """A clone of ``model`` with ``runtime.calc_cond_batch_wrapper`` as its CALC_COND_BATCH wrapper under ``key``
    and ``runtime.post_cfg`` as a post-CFG function. Raises :class:`EraserFileError` naming ``source`` when the
    model already carries a batch extension."""
    from ..adapters.errors import EraserFileError

    present = getattr(model, "wrappers", {}).get(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, {})
    for k, what in BATCH_EXTENSIONS.items():
        if k in present:
            raise EraserFileError(source, f"this MODEL already carries {what}, already attached by an earlier node "
                                  "(Apply Eraser Stack attaches a stack's guidance erasers itself); both extend the "
                                  "same batched prediction, so attach one of them, once, per MODEL")
    m = model.clone()

    # plain closures, not bound methods: ModelPatcher.clone() deep-copies model_options, which would copy a
    # bound method's runtime (and its CLIP) and split the state the wrapper and the post-CFG function share
    def wrapper(executor, model_, conds, x_in, timestep, model_options):
        return runtime.calc_cond_batch_wrapper(executor, model_, conds, x_in, timestep, model_options)

    def post_cfg(args):
        return runtime.post_cfg(args)

    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, key, wrapper)
    m.set_model_sampler_post_cfg_function(post_cfg)
    return m

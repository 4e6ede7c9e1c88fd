"""One generation's ConceptGate state, kept on ``p`` (``p.conceptgate``) between the script stages.

The stack of a batch is, in this order (an eraser named again overrides the strength of the earlier
entry and keeps its gate settings): the preset's entries, the accordion's selection (both only
when the accordion is enabled), then the ``<erase:...>`` tags of the batch's first prompt (A1111
takes extra networks from the first prompt of a batch only).
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace

import torch

from ..adapters.errors import EraserFileError
from ..adapters.gate import DEFAULT_RULE, GateReport, GateSettings
from ..adapters.gate import BankCache
from ..adapters.registry import default_gate_rule
from ..adapters.stack import EraserStack
from . import host as _host
from .library import Library
from .lock import current_policy
from .mechanisms import reachable_kind
from .params import KEY_ABO, KEY_GEOM, NO_PRESET, PerImage, ScriptArgs, UsedEraser, infotext_params, shown

log = logging.getLogger("conceptgate")
TAGS_ATTR = "conceptgate_tags"  # set on p by the <erase:...> extra network
STATE_ATTR = "conceptgate"
ERROR_ATTR = "conceptgate_error"  # the error that stopped this generation (fail closed)

# forward pre-hooks that raise the error of a failed generation on the next UNet call (see fail_closed)
_POISON: list = []


def fail_closed(p, err: BaseException, stage: str) -> BaseException:
    """Make sure generation ``p`` stops with ``err`` instead of producing an unerased image.

    The webui runs every script stage (and extra networks, and callbacks) inside ``try/except`` and only
    logs what they raise, so raising is not enough. Two things are done, whatever the stage:

    * ``p.sample`` is replaced on the instance: ``process_images_inner`` calls ``p.sample(...)``
      outside any script ``try``, so an error found before sampling stops the generation there; the
      webui shows it in the UI and the API answers with an error;
    * a forward pre-hook on the UNet raises it on the next UNet call, for errors found while sampling
      (CFG callback, Forge's ``process_before_every_sampling``, the hires pass).

    Whichever fires first removes the fail-closed hooks and this generation's eraser hooks, so a failed
    generation leaves nothing on the model; :func:`clear_poison` also runs at every ``process``.
    """
    first = getattr(p, ERROR_ATTR, None)
    if first is None:
        setattr(p, ERROR_ATTR, err)
        first = err
        log.error("ConceptGate stopped the generation (%s): %s", stage, err)

    def stop():  # the generation ends here: nothing of it stays on the model (webui generations are serial)
        clear_poison()
        state = getattr(p, STATE_ATTR, None)
        if isinstance(state, GenerationState):
            state.release()

    def refuse(*args, **kwargs):
        stop()
        raise first

    try:
        p.sample = refuse
    except AttributeError:
        pass
    for dm in _diffusion_models(p):
        def poison(module, args, kwargs=None):
            stop()
            raise first

        _POISON.append(dm.register_forward_pre_hook(poison))
    return first


def clear_poison():
    while _POISON:
        _POISON.pop().remove()


def _diffusion_models(p) -> list:
    sd_model = getattr(p, "sd_model", None)
    found = []
    for owner in (getattr(sd_model, "model", None),
                  getattr(getattr(getattr(sd_model, "forge_objects", None), "unet", None), "model", None)):
        dm = getattr(owner, "diffusion_model", None)
        if isinstance(dm, torch.nn.Module) and all(dm is not d for d in found):
            found.append(dm)
    return found


def _key(eraser) -> str:
    return os.path.realpath(eraser.source) if eraser.source else f"<{eraser.name}>"


class GenerationState:
    def __init__(self, args: ScriptArgs, library: Library, host: str | None = None):
        self.args = args
        self.library = library
        self.host = host or _host.HOST
        self.policy = current_policy(library)  # PolicyError: the generation stops (fail closed)
        self.base = self._base_stack()
        self._stacks: dict[tuple, EraserStack] = {}
        self.stack: EraserStack | None = None
        self.runtime = None  # A1111Runtime
        self.forge_rows = None  # forge.ForgeRowHooks (opt-in per-row weights on Forge)
        self.report: GateReport | None = None
        self.image_gates: torch.Tensor | None = None
        self.forge_files: list[str] = []
        self._banks: dict[int, BankCache] = {}
        self._forge: dict = {}  # (stack, model) -> (GeomTokens, ForgeGuidance), made once per generation
        self.forge_geom = None  # the GeomTokens of the current Forge pass
        self.forge_guidance = None  # its ForgeGuidance when it has terms (Geom regional negation's rows are set per step)
        self.forge_per_image: torch.Tensor | None = None  # [B, E] per-image coefficients of the current pass
        self.batch_images: dict | None = None  # per image of the batch: applied coefficients, geom, ABO terms
        self.records: dict[int, dict] = {}  # infotext per image of the job (global index)

    # ------------------------------------------------------------- stacks
    def _settings(self, eraser=None) -> GateSettings:
        """Gate settings for an eraser chosen in the accordion, the API or a tag: the chosen rule; with the
        default rule, the eraser's own default (Geom-Erasing: ``always``, an implicit concept such as a
        watermark is not asked for by the prompt)."""
        rule = self.args.gate
        if eraser is not None and rule == DEFAULT_RULE:
            rule = default_gate_rule(eraser)
        return GateSettings(rule=rule, cond_only=self.args.cond_only)

    def _base_stack(self) -> EraserStack:
        stack = EraserStack(combine=self.args.combine)
        if self.args.enabled:
            if self.args.preset and self.args.preset != NO_PRESET:
                for e in self.library.load_preset(self.args.preset).entries:
                    stack = _merge(stack, e.eraser, e.strength, e.gate, e.enabled)
            for name, strength in self.args.erasers:
                eraser = self.library.load(name)
                stack = _merge(stack, eraser, strength, self._settings(eraser))
        # the operator's locked erasers, whatever the accordion says (unticked included)
        return self.policy.enforce(stack) if self.policy is not None else stack

    def stack_for(self, tags) -> EraserStack:
        key = tuple(tags or ())
        if key not in self._stacks:
            stack = self.base
            for name, strength in key:
                eraser = self.library.load(name)
                stack = _merge(stack, eraser, strength, self._settings(eraser))
            if self.policy is not None:  # tags may add erasers or raise a locked one, never lower it
                stack = self.policy.enforce(stack)
            for e in stack.entries:
                why = reachable_kind(e.eraser.kind)
                if why is not None:
                    raise EraserFileError(e.eraser.source or e.eraser.name, f"{why} (eraser {e.eraser.name!r})")
            self._stacks[key] = stack
        return self._stacks[key]

    def banks(self, encoder) -> BankCache:
        key = id(encoder.sd_model)
        if key not in self._banks or self._banks[key].encoder.sd_model is not encoder.sd_model:
            self._banks[key] = BankCache(encoder)
        return self._banks[key]

    # ------------------------------------------------------------- A1111
    def sync_a1111(self, p, sd_model=None):
        """(Re)build the hooks for the batch's stack; set the batch's prompts."""
        from .a1111 import A1111Runtime

        stack = self.stack_for(getattr(p, TAGS_ATTR, None))
        if not any(e.enabled for e in stack.entries):
            self.release()
            self.stack = stack
            return
        if self.runtime is None or self.runtime.stack is not stack:
            self.release()
            self.runtime = A1111Runtime(stack, sd_model or p.sd_model).attach()
            self.runtime.is_hr = lambda: bool(getattr(p, "is_hr_pass", False))
            self.runtime.cfg_scale = lambda: float(getattr(p, "cfg_scale", 7.0))
        self.stack = stack
        self._prompts_key = None
        self.sync_prompts(p)

    def sync_prompts(self, p):
        prompts, hr = list(getattr(p, "prompts", None) or []), list(getattr(p, "hr_prompts", None) or [])
        key = (tuple(prompts), tuple(hr))
        if self.runtime is not None and key != getattr(self, "_prompts_key", None):
            self.runtime.set_prompts(prompts, hr or None)
            self._prompts_key = key

    def on_cfg_denoiser(self, p, params, sd_model=None):
        if _host.is_forge(self.host):  # Forge: only the Geom-Erasing tokens are added here (weights are patched)
            if self.forge_geom and self.forge_per_image is not None:
                params.text_uncond = self.forge_geom.append(params.text_uncond, self.forge_per_image)
                if self.forge_guidance is not None and self.forge_geom.regional:  # regional negation: this step's negative
                    terms = self.forge_guidance.terms
                    self.forge_guidance.private = self.forge_geom.regional_texts(params.text_uncond, terms)
            return
        if getattr(p, TAGS_ATTR, None) is not None and self.stack is not self.stack_for(getattr(p, TAGS_ATTR, None)):
            self.sync_a1111(p, sd_model)  # hires pass with other <erase:...> tags
        if self.runtime is None:
            return
        self.runtime.follow_model(sd_model)
        self.sync_prompts(p)
        self.runtime.on_cfg_denoiser(params)
        table = self.runtime.table
        if table is not None:
            check_finite_coefficients(self.runtime.stack, torch.cat([table.cond, table.uncond]), "A1111 CFG step")
        if self.report is None:
            self.report = self.runtime.first_report
        self.image_gates = self.runtime.image_gates
        if self.batch_images is None and self.runtime.first_images is not None:
            self.batch_images = self.runtime.first_images

    def on_cfg_denoised(self, p, params):
        if self.runtime is not None and not _host.is_forge(self.host):
            self.runtime.on_cfg_denoised(params)

    def on_cfg_after_cfg(self, p, params):
        if self.runtime is not None and not _host.is_forge(self.host):
            self.runtime.on_cfg_after_cfg(params)

    def release(self):
        if self.runtime is not None:
            self.runtime.detach()
            self.runtime = None
        if self.forge_rows is not None:
            self.forge_rows.detach()
            self.forge_rows = None

    # ------------------------------------------------------------- Forge
    def forge_before_sampling(self, p):
        from . import forge
        from .abo import ForgeGuidance, abo_only, image_terms
        from .geom import GeomTokens
        from .text import HostTextEncoder

        stack = self.stack_for(getattr(p, TAGS_ATTR, None))
        self.stack = stack
        self.forge_geom = self.forge_per_image = None
        if not any(e.enabled for e in stack.entries):
            return
        hr = bool(getattr(p, "is_hr_pass", False)) and getattr(p, "hr_prompts", None)
        prompts = list(p.hr_prompts if hr else p.prompts)
        sd_model = p.sd_model
        banks = self.banks(HostTextEncoder(sd_model))
        gates = forge.batch_gates(stack, sd_model, prompts, banks)  # the text encoder is loaded now
        key = (id(stack), id(sd_model))
        if key not in self._forge:
            geom = GeomTokens(stack, sd_model)
            self._forge[key] = (stack, geom, ForgeGuidance(stack, sd_model, uncond_terms=geom.regional_names))
        _, geom, guidance = self._forge[key]
        unet = sd_model.forge_objects.unet
        per_row = forge.per_row_enabled() and any(e.enabled for _, e in stack.weight_entries)
        if per_row:  # opt-in: hooks on the shared modules, each image its own gate (removed in postprocess)
            dm = unet.model.diffusion_model
            if self.forge_rows is None or self.forge_rows.stack is not stack or self.forge_rows.dm is not dm:
                self.release()
                self.forge_rows = forge.ForgeRowHooks(stack, dm).attach()
            self.forge_rows.set_gates(gates.per_image)
            unet, files = unet.clone(), []
        elif any(e.enabled for _, e in stack.weight_entries):
            self.release()
            unet, files = forge.patch_unet(unet, stack, gates.batch, self.host)
        else:
            self.release()
            unet, files = unet.clone(), []
        terms = [[] for _ in prompts]
        self.forge_guidance = None
        if guidance:
            terms = image_terms(stack, gates.encoded, banks, gates.tokens_known, gates.image_of_row, len(prompts),
                                gates.texts)
            guidance.conds.add(t for row in terms for term in row for t in (term.erase, term.alternative))
            if geom.regional:  # Geom regional negation: its rows' conditionings come with each step's negative
                terms = [a + r for a, r in zip(terms, geom.regional_terms(gates.per_image))]
            guidance.private = {}
            guidance.install(unet, terms)
            self.forge_guidance = guidance
        sd_model.forge_objects.unet = unet
        self.forge_files = files
        self.image_gates = gates.per_image
        if geom:
            self.forge_geom, self.forge_per_image = geom, gates.per_image
            geom.applied = geom.firing(gates.per_image)
        applied = gates.per_image.clone()  # what each image got: weight erasers share the batch's strongest gate
        for i, _ in ([] if per_row else stack.weight_entries):
            applied[:, i] = gates.batch[i]
        if self.report is None or not hr:
            self.report = gates.report
        if not hr:
            self.batch_images = {"coeffs": applied, "geom": [list(a) for a in geom.applied] if geom else None,
                                 "abo": abo_only(terms, guidance.uncond_terms) if guidance else None}

    # ------------------------------------------------------------- results
    def used(self) -> list[UsedEraser]:
        if self.stack is None:
            return []
        rows = self.report.rows if self.report is not None else []
        out = []
        for i, e in enumerate(self.stack.entries):
            gate = rows[i]["gate"] if i < len(rows) else None
            out.append(UsedEraser(e.eraser.name, e.strength, gate if e.enabled else None, e.eraser.sha256, e.locked))
        return out

    def write_infotext(self, p, batch_number: int | None = None):
        """The infotext keys. Values that differ per image (gates, which images got Geom tokens or
        All-but-One terms) are :class:`~.params.PerImage`: the text of the job's first image, and each
        image's own text where the webui asks per image (A1111 >= 1.8, Forge, reForge)."""
        params = infotext_params(self.used(), self.args)
        if not params:
            return
        n = getattr(p, "batch_number", 0) if batch_number is None else batch_number
        offset = n * int(getattr(p, "batch_size", 1) or 1)
        for key, values in self._per_image_params(offset).items():
            old = p.extra_generation_params.get(key)
            merged = dict(old.values) if isinstance(old, PerImage) else {}
            merged.update(values)
            shown_first = next((merged[k] for k in sorted(merged) if merged[k] is not None), None)
            if shown_first is None:
                continue  # no image of the job got it (e.g. no Geom tokens)
            params[key] = PerImage(shown_first, merged)
        p.extra_generation_params.update(params)

    def _per_image_params(self, offset: int) -> dict[str, dict[int, str | None]]:
        """{infotext key: {global image index: text}} for the images of the last batch."""
        from .params import KEY, escape_name, _gate_text, _num

        info = self.batch_images
        if info is None or self.stack is None:
            return {}
        coeffs = info["coeffs"]
        out: dict[str, dict[int, str | None]] = {KEY: {}, KEY_GEOM: {}, KEY_ABO: {}}
        names = {c: e.eraser.name for c, e in enumerate(self.stack.entries)}
        rows = self.report.rows if self.report is not None else []
        for i in range(coeffs.shape[0]):
            parts = []
            for c, e in enumerate(self.stack.entries):
                if not e.enabled:
                    gate = None
                elif e.strength:
                    gate = float(coeffs[i, c]) / e.strength
                else:
                    gate = rows[c]["gate"] if c < len(rows) else 0.0
                parts.append(f"{escape_name(e.eraser.name)}:{_num(e.strength)}:{_gate_text(gate)}")
            out[KEY][offset + i] = ", ".join(parts)
            geom = info.get("geom")
            if geom and i < len(geom) and geom[i]:
                out[KEY_GEOM][offset + i] = ", ".join(escape_name(names[c]) for c in geom[i])
            else:
                out[KEY_GEOM][offset + i] = None
            abo = info.get("abo")
            if abo and i < len(abo) and abo[i]:
                out[KEY_ABO][offset + i] = ", ".join(f"{escape_name(t.eraser)}:{escape_name(t.label[0])}>"
                                                     f"{escape_name(t.label[1]) or 'nothing'}" for t in abo[i])
            else:
                out[KEY_ABO][offset + i] = None
        return out

    def summary(self) -> str:
        if self.stack is None or not len(self.stack):
            return "ConceptGate: no erasers in the last generation"
        lines = [self.report.text() if self.report is not None else "ConceptGate: no gate computed (no sampling step ran)"]
        if self.image_gates is not None and self.image_gates.shape[0] > 1:
            for i, row in enumerate(self.image_gates.tolist()):
                lines.append(f"image {i + 1}: " + ", ".join(f"{e.eraser.name} {m:.3f}" for e, m in zip(self.stack.entries, row)))
        return "\n".join(lines)


def check_finite_coefficients(stack: EraserStack, coeffs: torch.Tensor, where: str):
    """A NaN / inf coefficient would make an unerased (or broken) image: stop instead."""
    bad = ~torch.isfinite(coeffs).all(0)
    if bool(bad.any()):
        names = [e.eraser.name for e, b in zip(stack.entries, bad.tolist()) if b]
        raise ValueError(f"ConceptGate: the gate of {', '.join(shown(n) for n in names)} is not a finite number "
                         f"({where}); the generation was stopped instead of running without the eraser")


def _merge(stack: EraserStack, eraser, strength: float, gate: GateSettings, enabled: bool = True) -> EraserStack:
    for i, e in enumerate(stack.entries):
        if _key(e.eraser) == _key(eraser):
            if e.locked:  # the operator's entry: a user may raise it, never lower or disable it
                return stack.with_entry(i, strength=max(e.strength, float(strength) if enabled else 0.0))
            return stack.with_entry(i, strength=float(strength), enabled=bool(enabled))
    return stack.with_eraser(eraser, enabled, strength, replace(gate))

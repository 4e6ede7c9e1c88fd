"""The operator lock in ComfyUI: the policy's erasers act on every image the server makes, whatever the graph.

Why no graph can route around it (ComfyUI 0.3.75 to 0.8):

* Every sampler ends in ``comfy.samplers.CFGGuider.sample``: ``KSampler`` / ``KSamplerAdvanced`` go
  through ``comfy.sample.sample`` -> ``comfy.samplers.KSampler.sample`` -> ``comfy.samplers.sample``,
  which builds a ``CFGGuider``; ``SamplerCustom`` / ``SamplerCustomAdvanced`` call a GUIDER's
  ``sample``, and every guider (``BasicGuider``, ``CFGGuider``, ``DualCFGGuider``, ours) subclasses
  ``CFGGuider``. The lock wraps that method on the class, so whichever model, loader, LoRA or node
  chain produced the MODEL, the sampler samples a clone with the locked erasers attached (per-row
  hooks, gated per conditioning). The user's model is never changed.
* Second line: ``comfy.model_base.BaseModel.apply_model`` (every UNet evaluation of every image model)
  refuses to run while a policy is in force unless the call carries the lock's wrapper. A sampler that
  bypassed ``CFGGuider`` (a custom node calling the model directly) gets an error, not an image.
* Gates read the prompt: ``CLIP.encode_from_tokens_scheduled`` (what ``CLIPTextEncode`` and the other
  text encoders call) records, while a policy is in force, the token ids of every 77-token window, the
  CLIP and a digest of the conditioning it returned. A conditioning that is not, bit for bit, what a
  recorded encode produced (averaged, concatenated, zeroed, edited by a node, or from an encoder that
  does not record) tells the gate nothing it can trust: the locked erasers then act at full strength.
  Every window is gated, so a concept after token 75 is seen too.
* A broken policy (unreadable, a file missing or changed, an eraser that does not fit the model)
  raises in the sampler, so ComfyUI shows the error on the sampler node and makes no image.

Limits (also in the README's Security section): the lock holds for image models sampled through
ComfyUI's sampling code; it cannot see a LoRA that undoes an eraser if the operator lets users load
the eraser file itself as a LoRA at negative strength (keep locked files out of ``models/loras``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import weakref

import torch

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.samplers
import comfy.sd
import folder_paths

from ..adapters.gate import BankCache, EncodedText
from ..adapters.gate.text import WINDOW
from ..adapters.policy import POLICY_FILE, PolicyCache, PolicyError, configured_path
from . import comfy_glue

log = logging.getLogger("conceptgate")

LOCK_KEY = "conceptgate_lock"
CLIP_REF_KEY = "conceptgate_clip"  # a _ClipRef: the CLIP that encoded this conditioning
DIGEST_KEY = "conceptgate_digest"  # digest of the conditioning tensor that encode returned
ALL_IDS_KEY = "conceptgate_window_ids_all"  # token ids of every 77-token window
_ORIGINALS: dict = {}
_POLICIES = PolicyCache()
_STATE = threading.local()
_BANKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # CLIP -> BankCache of the locked erasers


def policy_path() -> str | None:
    return configured_path(os.path.join(folder_paths.base_path, POLICY_FILE))


def current_policy():
    """The policy in force, or None; raises :class:`PolicyError` when one is configured but unusable."""
    path = policy_path()
    if path is None:
        return None
    dirs = [d for d in folder_paths.folder_names_and_paths.get("conceptgate", ([], set()))[0]]
    return _POLICIES.get(path, dirs)


# ------------------------------------------------------------------ prompt records
class _ClipRef:
    """A weak reference that survives ComfyUI's shallow copies of conditioning dicts."""

    conceptgate_clip_ref = True  # checked by attribute: ComfyUI may load this module twice (by path and by name)

    def __init__(self, clip):
        self._ref = weakref.ref(clip)

    def __call__(self):
        return self._ref()


def digest(t: torch.Tensor) -> str:
    x = t.detach().to("cpu").contiguous()
    h = hashlib.sha1(repr((tuple(x.shape), str(x.dtype))).encode())
    h.update(x.view(torch.uint8).numpy().tobytes() if x.dtype == torch.bfloat16 else x.numpy().tobytes())
    return h.hexdigest()


def all_window_ids(tokens: dict) -> list[list[int]]:
    first = next(iter(tokens.values()))  # SDXL: the g and l lists hold the same words
    return [[t[0] if isinstance(t[0], int) else -1 for t in chunk] for chunk in first]


def _encode_scheduled(self, tokens, *args, **kwargs):
    out = _ORIGINALS["encode"](self, tokens, *args, **kwargs)
    if policy_path() is None:
        return out
    try:
        ids = all_window_ids(tokens)
        content = sorted(comfy_glue.content_tokens(self, tokens))
        for cond, extra in out:
            extra[CLIP_REF_KEY] = _ClipRef(self)
            extra[ALL_IDS_KEY] = ids
            extra.setdefault(comfy_glue.TOKENS_KEY, content)
            extra.setdefault(comfy_glue.WINDOW_IDS_KEY, ids[0][:WINDOW] if ids else [])
            extra[DIGEST_KEY] = digest(cond)
    except Exception:  # nothing recorded: the lock's erasers then act on this prompt (fail closed)
        log.exception("ConceptGate lock: could not record the prompt's tokens; locked erasers will act on it")
    return out


# ------------------------------------------------------------------ sampling
class LockRuntime(comfy_glue.RowGateRuntime):
    """Per-row gates of the locked stack, read from each conditioning's record. Anything it cannot
    trust (no record, a changed tensor, no uuid on a row) gives the locked erasers full strength."""

    def __init__(self, model, stack):
        names = comfy_glue.module_names(model)
        diffusion = model.model
        self.stack = stack
        self.hooks = comfy_glue.RowGatedDeltas(stack, lambda n: diffusion.get_submodule(names[n]))
        self.by_uuid = {}
        self.report_sink = None
        self.full = torch.tensor([e.strength for e in stack.entries], dtype=torch.float32)
        self._uncond = self.full.clone()
        self.reports: list[str] = []

    @staticmethod
    def _banks_for(clip) -> BankCache:
        # one cache per CLIP for the server's life, not per image: concept encodings and a recalibration
        # for this encoder (1,200 prompts) are done once
        banks = _BANKS.get(clip)
        if banks is None:
            banks = _BANKS[clip] = BankCache(comfy_glue.ComfyTextEncoder(clip))
        return banks

    def _gate(self, cond: dict) -> torch.Tensor:
        ctx = cond.get("cross_attn")
        ref = cond.get(CLIP_REF_KEY)
        clip = ref() if getattr(ref, "conceptgate_clip_ref", False) else None
        ids = cond.get(ALL_IDS_KEY)
        why = None
        if ctx is None or clip is None or not ids:
            why = "prompt not encoded by a recording CLIP"
        elif cond.get(DIGEST_KEY) != digest(ctx):
            why = "conditioning changed after encoding"
        if why is not None:
            self.reports.append(f"locked erasers at full strength ({why})")
            return self.full.clone()
        specials = torch.tensor(sorted(comfy_glue._specials(clip) | {-1}), dtype=torch.long)
        banks = self._banks_for(clip)
        best = torch.zeros(len(self.stack.entries))
        windows = max(1, ctx.shape[1] // WINDOW)
        for w in range(windows):
            hidden = comfy_glue.to_window(ctx[:1, w * WINDOW:(w + 1) * WINDOW].float())
            row = list(ids[w]) if w < len(ids) else []
            if len(row) < hidden.shape[1]:
                return self.full.clone()  # positions unknown for this window
            row_t = torch.tensor(row[: hidden.shape[1]], dtype=torch.long)
            mask = ~torch.isin(row_t, specials)
            content = {i for i in row if i >= 0 and i not in set(specials.tolist())}
            coeffs, report = self.stack.gates(EncodedText(hidden, [content], row_t[None], mask[None]), banks=banks)
            best = torch.maximum(best, coeffs[0])
            if w == 0:
                self.reports.append(report.text().replace("\n", "; "))
        if not torch.isfinite(best).all():
            raise PolicyError(self.stack.entries[0].eraser.source, "a locked eraser's gate is not a finite number; "
                                                                    "the generation was stopped")
        return best

    def calc_cond_batch_wrapper(self, executor, model, conds, x_in, timestep, model_options):
        positives = []
        for cond in (conds[0] if conds else None) or []:
            uid = cond.get("uuid")
            if uid is None:  # a row that cannot be told apart: the whole batch gets full strength
                positives.append(self.full)
                continue
            if uid not in self.by_uuid:
                self.by_uuid[uid] = self._gate(cond)
            positives.append(self.by_uuid[uid])
        # the unconditional branch (shared weights, SPM's semantics) carries the strongest positive gate;
        # with no positive row at all the erasers act at full strength
        self._uncond = torch.stack(positives).max(0).values if positives else self.full.clone()
        if len(self.by_uuid) > 4096:
            self.by_uuid.clear()
        return executor(model, conds, x_in, timestep, model_options)

    def diffusion_model_wrapper(self, executor, *args, **kwargs):
        options = args[5] if len(args) > 5 else kwargs.get("transformer_options", {})
        x = args[0] if args else kwargs.get("x")
        uuids = options.get("uuids") or []
        kinds = options.get("cond_or_uncond") or []
        batch = int(x.shape[0]) if isinstance(x, torch.Tensor) else len(uuids)
        fallback = self._uncond
        rows = []
        if uuids and batch % len(uuids) == 0:
            per = batch // len(uuids)
            for uid, kind in zip(uuids, kinds or [0] * len(uuids)):
                g = self.by_uuid.get(uid)
                rows += [g if (kind == 0 and g is not None) else fallback] * per
        else:
            rows = [self.full] * batch
        with self.hooks.coefficients(torch.stack(rows)):
            return executor(*args, **kwargs)


def _trusted(cond: dict) -> bool:
    """The conditioning is, bit for bit, what a recording text encode returned, and one window long."""
    ctx = cond.get("cross_attn")
    ref = cond.get(CLIP_REF_KEY)
    return (ctx is not None and getattr(ref, "conceptgate_clip_ref", False) and ref() is not None
            and bool(cond.get(ALL_IDS_KEY)) and ctx.shape[1] <= WINDOW and cond.get(DIGEST_KEY) == digest(ctx))


def _recorded_clip(conds):
    for c in conds or ():
        ref = c.get(CLIP_REF_KEY)
        if getattr(ref, "conceptgate_clip_ref", False) and ref() is not None:
            return ref()
    return None


def _lock_abo(stack, clip):
    """All-but-One runtime for the locked guidance erasers: a conditioning it cannot trust (see
    :func:`_trusted`) gets the erasers at full strength (the ``always`` rule) instead of its gate."""
    from dataclasses import replace

    from ..adapters.gate import GateSettings
    from .nodes_abo import AboRuntime

    class LockAboRuntime(AboRuntime):
        def terms_for(self, positive):
            key = tuple(c.get("uuid") for c in positive or ())
            if key not in self.trust:  # the digest once per conditioning, not at every step
                self.trust[key] = all(_trusted(c) for c in positive or ())
            if positive and not self.trust[key]:
                gated, self.stack = self.stack, self.always
                try:
                    return super().terms_for(positive)
                finally:
                    self.stack = gated
            return super().terms_for(positive)

    runtime = LockAboRuntime(stack, clip)
    runtime.trust = {}  # uuids of a positive conditioning list -> trusted
    runtime.always = replace(stack, entries=tuple(replace(e, gate=GateSettings(rule="always")) for e in stack.entries))
    return runtime


def locked_model(patcher, model_options: dict, policy, conds: dict | None = None):
    """(a clone of ``patcher`` carrying the lock's hooks, ``model_options`` with the lock's wrappers, the
    runtime, replacement conditionings or None): weight erasers per row; All-but-One guidance rows in the
    CFG batch; Geom-Erasing tokens appended to the negative when their gate fires on the positive."""
    stack = comfy_glue.check_fits(patcher, policy.stack)  # IncompatibleModelError names the file and the model
    m = patcher.clone()
    runtime = LockRuntime(m, stack)
    options = comfy.model_patcher.create_model_options_clone(model_options)
    for kind, fn in ((comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, runtime.calc_cond_batch_wrapper),
                     (comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, runtime.diffusion_model_wrapper)):
        comfy.patcher_extension.add_wrapper_with_key(kind, LOCK_KEY, fn, options, is_model_options=True)
    m.set_injections(LOCK_KEY, [comfy.patcher_extension.PatcherInjection(
        inject=lambda p: runtime.hooks.attach(), eject=lambda p: runtime.hooks.detach())])
    kinds = {e.eraser.kind for e in stack.entries}
    new_conds = None
    if kinds & {"guidance", "conditioning"}:
        positive = (conds or {}).get("positive") or []
        clip = _recorded_clip(positive)
        if clip is None:
            raise PolicyError(policy.path, "locked Geom-Erasing / All-but-One erasers need the prompt's CLIP, and this "
                                           "positive prompt was not encoded by a text-encode node; no image is made")
        if "guidance" in kinds:
            abo = _lock_abo(stack, clip)

            def abo_wrapper(executor, model_, conds_, x_in, timestep, model_options_):
                return abo.calc_cond_batch_wrapper(executor, model_, conds_, x_in, timestep, model_options_)

            def abo_post_cfg(args):
                return abo.post_cfg(args)

            comfy.patcher_extension.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH,
                                                         LOCK_KEY + "_abo", abo_wrapper, options, is_model_options=True)
            options["sampler_post_cfg_function"] = [abo_post_cfg] + list(options.get("sampler_post_cfg_function", []))
        if "conditioning" in kinds:
            negative = (conds or {}).get("negative")
            if not negative:
                raise PolicyError(policy.path, "a locked Geom-Erasing eraser acts through the negative prompt, and this "
                                               "sampler has none (CFG 1 / BasicGuider); no image is made")
            from .nodes_geom import encode_tokens

            coeffs = torch.stack([runtime._gate(c) for c in positive]).max(0).values
            for i, e in enumerate(stack.entries):
                if e.eraser.kind == "conditioning" and float(coeffs[i]) >= 0.5:
                    tokens = encode_tokens(clip, e.eraser)[0][0][0]
                    negative = [dict(d, cross_attn=torch.cat(
                        (d["cross_attn"], tokens.to(d["cross_attn"].device, d["cross_attn"].dtype).expand(
                            d["cross_attn"].shape[0], -1, -1)), 1)) for d in negative]
            new_conds = {"negative": negative}
    return m, options, runtime, new_conds


def _guider_sample(self, *args, **kwargs):
    policy = current_policy()  # PolicyError: ComfyUI shows it on the sampler node; no image
    if policy is None or getattr(_STATE, "depth", 0):
        return _ORIGINALS["sample"](self, *args, **kwargs)
    patcher, options, runtime, new_conds = locked_model(self.model_patcher, self.model_options, policy,
                                                        self.original_conds)
    saved = self.model_patcher, self.model_options, self.original_conds
    self.model_patcher, self.model_options = patcher, options
    if new_conds:
        self.original_conds = dict(self.original_conds, **new_conds)
    _STATE.depth = getattr(_STATE, "depth", 0) + 1
    try:
        return _ORIGINALS["sample"](self, *args, **kwargs)
    finally:
        _STATE.depth -= 1
        self.model_patcher, self.model_options, self.original_conds = saved
        if runtime.reports:
            log.info("ConceptGate lock (%s): %s", policy.path, runtime.reports[0])


def _guarded_apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
    wrappers = (transformer_options or {}).get("wrappers", {})
    # every UNet call: only whether a policy is configured (a stat), not the policy itself, which the
    # sampler wrapper has already read and checked
    if LOCK_KEY not in wrappers.get(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, {}) and policy_path() is not None:
        raise PolicyError(policy_path(), "this model was called outside ComfyUI's samplers, past the operator's "
                                         "ConceptGate lock; refused")
    return _ORIGINALS["apply_model"](self, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


def policy_token():
    """What identifies the policy in force, for ComfyUI's output cache (see :func:`_execute_async`)."""
    path = policy_path()
    if path is None:
        return None
    try:
        st = os.stat(path)
        return (os.path.abspath(path), st.st_mtime_ns, st.st_size)
    except OSError:
        return (os.path.abspath(path), None, None)


async def _execute_async(self, *args, **kwargs):
    # ComfyUI serves unchanged nodes from its output cache without running them: an image cached before
    # the policy came into force (or changed) would be served again, unerased. A new policy empties it.
    token = policy_token()
    if getattr(self, "_conceptgate_policy_token", "unset") != token:
        self.reset()
        self._conceptgate_policy_token = token
    return await _ORIGINALS["execute_async"](self, *args, **kwargs)


def install() -> None:
    """Wrap ComfyUI's sampling entry point, its UNet entry point and its text encoding (idempotent).
    Without a policy in force every wrapper passes straight through."""
    if _ORIGINALS or getattr(comfy.samplers.CFGGuider.sample, "conceptgate_lock", False):
        return  # installed (also by another copy of this module: ComfyUI imports packs by path)
    _ORIGINALS["sample"] = comfy.samplers.CFGGuider.sample
    _ORIGINALS["apply_model"] = comfy.model_base.BaseModel.apply_model
    _ORIGINALS["encode"] = comfy.sd.CLIP.encode_from_tokens_scheduled
    for fn in (_guider_sample, _guarded_apply_model, _encode_scheduled, _execute_async):
        fn.conceptgate_lock = True
    try:
        import execution
    except ImportError:  # ComfyUI always imports it before custom nodes; a host without it has no cache
        execution = None
    if execution is not None:
        _ORIGINALS["execute_async"] = execution.PromptExecutor.execute_async
        execution.PromptExecutor.execute_async = _execute_async
    comfy.samplers.CFGGuider.sample = _guider_sample
    comfy.model_base.BaseModel.apply_model = _guarded_apply_model
    comfy.sd.CLIP.encode_from_tokens_scheduled = _encode_scheduled
    path = policy_path()
    if path is not None:
        try:
            policy = current_policy()
            log.info("ConceptGate: operator policy %s in force: %s", path,
                     ", ".join(f"{e.eraser.name} x{e.strength:g}" for e in policy.entries))
        except PolicyError as e:
            log.error("ConceptGate: operator policy unusable, every generation will stop: %s", e)


def uninstall() -> None:
    """Undo :func:`install` (tests)."""
    if not _ORIGINALS:
        return
    comfy.samplers.CFGGuider.sample = _ORIGINALS.pop("sample")
    comfy.model_base.BaseModel.apply_model = _ORIGINALS.pop("apply_model")
    comfy.sd.CLIP.encode_from_tokens_scheduled = _ORIGINALS.pop("encode")
    if "execute_async" in _ORIGINALS:
        import execution

        execution.PromptExecutor.execute_async = _ORIGINALS.pop("execute_async")

"""UCE / RECE on the user's loaded model: the edit, its cache and its export as an eraser.

The closed-form math lives in :mod:`.closed_form`; this module binds it to a host:

* a **host** (:mod:`.hosts`) gives the current ``attn2.to_k`` / ``attn2.to_v`` weights under canonical (diffusers)
  module names and encodes text exactly as that host's sampler does:

  - :class:`DiffusersEditHost`: a ``UNet2DConditionModel`` + tokenizer/text encoder (SD1.x/SD2.x
    through :class:`~.diffusers_host.DiffusersTextEncoder`: CLIP skip, the tokenizer's own padding,
    the final layer norm; SDXL through :class:`DiffusersSDXLTextEncoder`, the two penultimate layers
    concatenated as ``StableDiffusionXLPipeline.encode_prompt`` does).
  - ``conceptgate.nodes.nodes_uce.ComfyEditHost``: a ComfyUI MODEL + CLIP (kept with the ComfyUI
    glue so that this package never imports ComfyUI).

* :func:`compute_edit` runs UCE (joint solve over all concepts) or RECE (UCE start + K epochs),
  caches the outcome by (UNet attn2 fingerprint, text-encoder fingerprint, method, concepts, guide,
  preserve set, hyper-parameters) and returns an :class:`EditOutcome` holding the raw
  :class:`~.closed_form.EditResult`, an :class:`~.eraser.Eraser` (kind ``weight``, method ``uce`` /
  ``rece``, exact construction factors, ``alpha = rank`` so the kohya scale is 1) and a report
  (timings, rank, reconstruction error, size).
* :func:`save_edit` writes it with :func:`~.files.save_eraser` (kohya keys: stock ComfyUI / A1111
  LoRA loaders load it at a fixed strength; ConceptGate loads it as a gated eraser).
* :func:`~.published.import_published` converts UCE's safetensors of edited ``attn2`` weights and RECE's
  full-UNet ``.pt`` (read only with ``torch.load(weights_only=True)``) against a base model:
  delta, float64 SVD with the truncation error reported, ConceptGate file.

Stacking separately computed edits (several erasers, each gated per prompt) is **not** the same
as one joint solve: every closed-form edit is anchored on the weights it was computed on, and the
edits of different concepts share the EoT/padding token rows (old-UCE convention) or nearby
directions. When only one concept's gate fires, only its own delta acts (exactly the separate
edit); when several fire, the sum of deltas differs from the joint solve.
:func:`stacked_interference` measures the difference on the host's own text vectors.
"""
from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from . import closed_form as cf
from ..eraser import Eraser
from ..lowrank import ModuleDelta
from ..prompts import prompt_pairs, sentence_pairs
from .hosts import EditHost
from .text import _convention

__all__ = [
    "PUBLISHED_FULL_UNET_BYTES", "METHODS", "CONCEPT_TYPES", "EditSpec", "EditOutcome", "EditCache",
    "DEFAULT_EDIT_CACHE", "compute_edit", "edit_to_eraser", "save_edit", "stacked_interference", "gated_stack_effect",
    "is_cross_attention_kv",
]

#: RECE publishes ``torch.save(unet.state_dict())`` of SD v1.4: 859,520,964 fp32 parameters.
PUBLISHED_FULL_UNET_BYTES = 859_520_964 * 4
METHODS = ("uce", "rece")
CONCEPT_TYPES = ("object", "object_hard", "style", "nudity", "unsafe")


def is_cross_attention_kv(name: str) -> bool:
    return "attn2" in name and name.endswith((".to_k", ".to_v"))


# the edit
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class EditSpec:
    """Everything that determines an edit besides the model (the cache key's text half).

    ``guide=None``: the type's target (``' '`` for objects/nudity/unsafe, ``'art'`` for style).
    ``epochs`` / ``lam_reg`` ``None``: RECE's per-type defaults. ``preserve_scale`` ``None``: the
    old-UCE rule ``max(0.1, 1/#preserve prompts)``. ``rece_lam`` / ``rece_preserve_scale``: RECE's
    lam2 / lam1 (0.1 / 0.1). ``convention``: ``aligned_tail`` (old UCE / RECE start: last word +
    EoT + padding, and ``''`` always preserved) or ``last_token`` (new UCE).
    """

    method: str
    concepts: tuple
    guide: str | None = None
    preserve: tuple = ()
    concept_type: str = "object"
    epochs: int | None = None
    lam: float = 0.5
    erase_scale: float = 1.0
    preserve_scale: float | None = None
    lam_reg: float | None = None
    rece_lam: float = 0.1
    rece_preserve_scale: float = 0.1
    convention: str = "aligned_tail"
    #: ConceptGate's expansion (not in the papers, issue 17): more names of the concept (``synonyms``:
    #: user-given), and a prompt context (:mod:`..prompts`: ``generic``, ``toy`` or another registered one)
    #: whose sentences erase every name in context and keep every preserve word in context
    #: (:func:`~.text.span_aligned_vectors`); ``()`` / ``""`` = the published edit
    synonyms: tuple = ()
    context: str = ""

    def __post_init__(self):
        method = str(self.method).lower()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        object.__setattr__(self, "method", method)
        concepts = tuple(str(c) for c in ([self.concepts] if isinstance(self.concepts, str) else self.concepts))
        concepts = tuple(c for c in concepts if c.strip())
        if not concepts:
            raise ValueError("no concept to erase")
        object.__setattr__(self, "concepts", concepts)
        object.__setattr__(self, "preserve", tuple(str(p) for p in self.preserve))
        object.__setattr__(self, "synonyms", tuple(str(c) for c in self.synonyms if str(c).strip()
                                                   and str(c) not in concepts))
        object.__setattr__(self, "context", "" if self.context in (None, "bare") else str(self.context))
        cf.rece_defaults(self.concept_type)  # validates the type

    @property
    def type_defaults(self) -> cf.ReceTypeDefaults:
        return cf.rece_defaults(self.concept_type)

    def resolved(self) -> dict:
        """The effective settings (defaults filled in), as stored in the file's metadata."""
        td = self.type_defaults
        guide = td.target if self.guide is None else self.guide
        uce_preserve = list(self.preserve)
        if _convention(self.convention) == "aligned_tail" and "" not in uce_preserve:
            uce_preserve = [""] + uce_preserve      # the old UCE code always preserves ''
        out = {"method": self.method, "concepts": list(self.concepts), "guide": guide,
               "concept_type": self.concept_type, "convention": _convention(self.convention),
               "uce": {"lam": float(self.lam), "erase_scale": float(self.erase_scale),
                       "preserve_scale": self.preserve_scale, "preserve": uce_preserve}}
        if self.synonyms:
            out["synonyms"] = list(self.synonyms)
        if self.context:
            out["context"] = self.context
            # the preserve words in the context's sentences, kept like the bare words (all their tokens)
            out["uce"]["preserve"] = uce_preserve + [e for p in self.preserve if p.strip()
                                                     for e, _ in prompt_pairs(p, "", self.context)]
        if self.method == "rece":
            key = self.concept_type.lower()
            if td.preserve and all(p == " " for p in td.preserve):   # nudity / unsafe: ' ' once per concept
                rece_preserve = [" "] * len(self.concepts)
            else:
                rece_preserve = [p for p in td.preserve if p != "ARTIST_LIST"]
            rece_preserve += [p for p in self.preserve if p not in rece_preserve]
            out["rece"] = {"epochs": int(td.epochs if self.epochs is None else self.epochs),
                           "lam_reg": float(td.lam_reg if self.lam_reg is None else self.lam_reg),
                           "lam": float(self.rece_lam), "preserve_scale": float(self.rece_preserve_scale),
                           "erase_scale": float(self.erase_scale), "target": guide, "preserve": rece_preserve,
                           "type_key": key}
        return out

    def key(self) -> str:
        return json.dumps(self.resolved(), sort_keys=True)


@dataclass
class EditOutcome:
    spec: EditSpec
    result: cf.EditResult
    eraser: Eraser
    report: dict
    hyperparameters: dict
    cached: bool = False

    def text(self) -> str:
        r = self.report
        lines = [f"{r['method'].upper()} on {r['host']}: concepts {', '.join(r['concepts'])} -> guide {r['guide']!r}",
                 f"  {r['modules']} attn2 to_k/to_v matrices, rank {r['rank']}"
                 + (f" ({r['epochs']} RECE epochs)" if r.get("epochs") else ""),
                 f"  reconstruction error of the exported factors: {r['rel_error_max']:.2e} (max over modules, "
                 f"relative Frobenius, vs the float64 construction)",
                 f"  time: {r['seconds_total']:.2f} s" + (" (cached)" if self.cached else
                                                          f" (encode {r['seconds_encode']:.2f}, solve "
                                                          f"{r['seconds_solve']:.2f}, export {r['seconds_export']:.2f})"),
                 f"  size: {r['factor_bytes'] / 1e6:.2f} MB of factors ({r['store_dtype']}) vs "
                 f"{r['full_delta_bytes'] / 1e6:.2f} MB for the {r['modules']} edited matrices stored dense"
                 # the published RECE checkpoints are full SD1.5 UNets: a comparison only for that base
                 + (f", {PUBLISHED_FULL_UNET_BYTES / 1e9:.2f} GB for a published full-UNet RECE checkpoint"
                    if self.eraser.base_family == "sd1" else "")]
        if r.get("file_bytes"):
            lines.append(f"  file: {r['file']} ({r['file_bytes'] / 1e6:.2f} MB)")
        return "\n".join(lines)


class EditCache:
    """LRU of :class:`EditOutcome` keyed by (UNet fingerprint, text fingerprint, spec, store dtype)."""

    def __init__(self, size: int = 8):
        self.size = int(size)
        self._d: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key):
        with self._lock:
            hit = self._d.get(key)
            if hit is not None:
                self._d.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
            return hit

    def put(self, key, value):
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.size:
                self._d.popitem(last=False)

    def clear(self):
        with self._lock:
            self._d.clear()
            self.hits = self.misses = 0

    def __len__(self):
        return len(self._d)


DEFAULT_EDIT_CACHE = EditCache()


def _encoder_fn(host: EditHost):
    def encode(texts):
        return host.encode(texts)
    return encode


def compute_edit(host: EditHost, spec: EditSpec | None = None, *, cache: EditCache | None = DEFAULT_EDIT_CACHE,
                 progress: Callable[[int, int], None] | None = None, name: str | None = None,
                 store_dtype: torch.dtype = torch.float32, log: Callable[[str], None] | None = None,
                 **spec_kw) -> EditOutcome:
    """UCE or RECE on ``host``'s current weights; one joint solve for all of ``spec.concepts``.

    ``spec`` or the :class:`EditSpec` fields as keywords. ``progress(done, total)`` is called
    after the UCE solve and after every RECE epoch (total = 1 + epochs). ``log`` receives
    progress lines (the CLI prints them). Results are cached in ``cache`` (``None``: no cache).
    """
    spec = spec or EditSpec(**spec_kw)
    say = log or (lambda s: None)
    t0 = time.perf_counter()
    weights = host.cross_attention_weights()
    ufp = host.unet_fingerprint(weights)
    tfp = host.text_fingerprint()
    t_fp = time.perf_counter() - t0
    cfg = spec.resolved()
    key = (ufp, tfp, spec.key(), str(store_dtype), name)
    if cache is not None:
        hit = cache.get(key)
        if hit is not None:
            out = EditOutcome(hit.spec, hit.result, hit.eraser, dict(hit.report, seconds_total=time.perf_counter() - t0,
                                                                       seconds_fingerprint=t_fp),
                              hit.hyperparameters, cached=True)
            say(f"cache hit (model {ufp}, text encoder {tfp})")
            if progress is not None:
                total = 1 + cfg.get("rece", {}).get("epochs", 0)
                progress(total, total)
            return out

    encode = _encoder_fn(host)
    ekey = ("conceptgate.uce_rece", host.kind, tfp)
    total = 1 + cfg.get("rece", {}).get("epochs", 0)
    say(f"encoding {len(spec.concepts)} concept(s), guide {cfg['guide']!r}, "
        f"{len(cfg['uce']['preserve'])} UCE preserve prompt(s)")
    t1 = time.perf_counter()
    names = list(spec.concepts) + list(spec.synonyms)
    vs = cf.uce_vectors(encode, names, cfg["guide"], cfg["uce"]["preserve"], cfg["convention"], encoder_key=ekey)
    if spec.context:
        vs = _with_context(vs, encode, names, cfg["guide"], spec.context, ekey)
    rece_inputs = None
    if spec.method == "rece":
        concept_emb, target_emb = cf.rece_prompt_embeddings(encode, names, cfg["guide"], encoder_key=ekey)
        rpres = cfg["rece"]["preserve"]
        pg = cf.preserve_gram_from_prompts(encode, rpres, "aligned_tail", encoder_key=ekey) if rpres else None
        rece_inputs = (concept_emb, target_emb, pg)
    t2 = time.perf_counter()
    dev = next(iter(weights.values())).device
    say(f"UCE solve on {len(weights)} matrices ({len(vs.erase)} erase vectors)")
    start = cf.uce_edit(weights, vs.erase.to(dev), vs.guide.to(dev), vs.preserve, lam=spec.lam,
                        erase_scale=spec.erase_scale, preserve_scale=spec.preserve_scale)
    if progress is not None:
        progress(1, total)
    result = start
    if rece_inputs is not None:
        concept_emb, target_emb, pg = rece_inputs
        r = cfg["rece"]

        def epoch_done(k, n):
            say(f"RECE epoch {k}/{n}")
            if progress is not None:
                progress(1 + k, total)

        result = cf.rece_edit(weights, concept_emb.to(dev), target_emb.to(dev), pg, start=start, epochs=r["epochs"],
                              lam_reg=r["lam_reg"], lam=r["lam"], preserve_scale=r["preserve_scale"],
                              erase_scale=r["erase_scale"], progress=epoch_done)
    t3 = time.perf_counter()
    eraser, info = edit_to_eraser(result, spec, name=name, store_dtype=store_dtype)
    t4 = time.perf_counter()
    eraser.base_family = host.base_family
    eraser.base_fingerprint = ufp
    eraser.text_fingerprint = tfp
    hyper = {"method": spec.method, **{k: v for k, v in result.params.items() if k != "method"},
             "uce": start.params, "rank": info["rank"], "rel_error_max": info["rel_error_max"],
             "store_dtype": str(store_dtype).replace("torch.", ""), "host": host.kind,
             "base_fingerprint": ufp, "text_fingerprint": tfp}
    report = {"method": spec.method, "host": host.kind, "concepts": list(spec.concepts), "guide": cfg["guide"],
              "modules": len(eraser.modules), "rank": info["rank"], "rel_error_max": info["rel_error_max"],
              "epochs": cfg.get("rece", {}).get("epochs", 0), "factor_bytes": info["factor_bytes"],
              "full_delta_bytes": info["full_delta_bytes"], "store_dtype": hyper["store_dtype"],
              "published_full_unet_bytes": PUBLISHED_FULL_UNET_BYTES, "base_fingerprint": ufp,
              "text_fingerprint": tfp, "seconds_fingerprint": t_fp, "seconds_encode": t2 - t1,
              "seconds_solve": t3 - t2, "seconds_export": t4 - t3, "seconds_total": t4 - t0}
    out = EditOutcome(spec, result, eraser, report, hyper)
    if cache is not None:
        cache.put(key, out)
    return out


def _with_context(vs, encode, names, guide: str, context: str, encoder_key):
    """``vs`` plus every name in the context's sentences, each paired with the same sentence holding the
    guide (span-aligned rows)."""
    pairs = dict(pair for n in names for pair in sentence_pairs(n, guide.strip(), context))
    erase, guides = list(pairs), list(pairs.values())
    eh, ei, _ = cf.encode_texts(encode, erase, encoder_key=encoder_key)
    gh, gi, _ = cf.encode_texts(encode, guides, encoder_key=encoder_key)
    er, gr = cf.span_aligned_vectors(eh, ei, gh, gi)
    return cf.VectorSet(torch.cat([vs.erase, er.to(vs.erase)]), torch.cat([vs.guide, gr.to(vs.guide)]), vs.preserve,
                        vs.convention + "+templates", vs.n_erase_prompts + len(erase))


def edit_to_eraser(result: cf.EditResult, spec: EditSpec, name: str | None = None,
                   store_dtype: torch.dtype = torch.float32) -> tuple[Eraser, dict]:
    """An :class:`Eraser` from an edit's exact construction factors (``alpha = rank``: scale 1).

    The factors are compressed to a balanced orthogonal form (:func:`~.closed_form.factor_delta`
    with ``factors=``; exact, no truncation). Returns the eraser and ``{rank, rel_error_max,
    rel_errors, factor_bytes, full_delta_bytes}``; ``rel_error`` compares the stored factors' product
    (computed in float64) with the float64 product of the construction factors.
    """
    facs = result.factors
    if not facs:
        raise ValueError("this edit has no construction factors (a dense start?); use factor_delta with SVD")
    modules, errs = {}, {}
    elem = torch.empty((), dtype=store_dtype).element_size()
    factor_bytes = full_bytes = 0
    for mod, delta in result.items():
        up64, down64 = (t.to(torch.float64) for t in facs[mod])
        up, down, info = cf.factor_delta(delta, factors=(up64, down64), dtype=store_dtype)
        exact = up64 @ down64
        ref = float(torch.linalg.norm(exact))
        err = float(torch.linalg.norm(exact - up.to(torch.float64) @ down.to(torch.float64)))
        errs[mod] = err / ref if ref > 0 else err
        modules[mod] = ModuleDelta(up=up.contiguous(), down=down.contiguous(), alpha=float(up.shape[1]))
        factor_bytes += (up.numel() + down.numel()) * elem
        full_bytes += delta.numel() * elem
    cfg = spec.resolved()
    label = name or f"{spec.method}-" + "-".join(re.sub(r"[^a-z0-9]+", "_", c.lower()).strip("_") for c in spec.concepts)
    # synonyms are names of the concept: the gate fires on them too
    eraser = Eraser(name=label[:80], kind="weight", concepts=list(spec.concepts) + list(spec.synonyms), method=spec.method,
                    modules=modules, settings=cfg)
    rank = max(d.rank for d in modules.values())
    return eraser, {"rank": rank, "rel_error_max": max(errs.values()), "rel_errors": errs,
                    "factor_bytes": factor_bytes, "full_delta_bytes": full_bytes}


def save_edit(outcome: EditOutcome, path, dtype: torch.dtype | None = None) -> str:
    """Write ``outcome.eraser`` (kohya keys + ``conceptgate.*`` metadata); returns the path.

    Sets the eraser's ``source`` / ``sha256`` and the report's ``file`` / ``file_bytes``.
    """
    from ..files import save_eraser

    path = str(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    sha = save_eraser(outcome.eraser, path, hyperparameters=outcome.hyperparameters, dtype=dtype)
    outcome.eraser.source, outcome.eraser.sha256 = path, sha
    outcome.report["file"] = path
    outcome.report["file_bytes"] = os.path.getsize(path)
    return path


# ---------------------------------------------------------------------------
# stacked separate edits vs the joint solve
# ---------------------------------------------------------------------------

def stacked_interference(host: EditHost, concepts: Sequence[str], method: str = "uce", **spec_kw) -> dict:
    """Separately computed edits of ``concepts``, stacked (all gates 1), vs their joint solve.

    Measured with :func:`~.closed_form.measure_interference` on the host's own erase / guide
    vectors (UCE convention of the spec): ``output_rel_diff`` (how far the stacked edit's outputs on
    the erased vectors are from the joint edit's), ``target_rel_err_stacked`` / ``_joint`` (distance
    of the erased outputs to the guide outputs, relative to the unedited distance), plus the
    preservation error of both on the preserve prompts (``preserve_rel_change_*``: output change
    relative to the output norm). With gates, only the concepts whose gate fires are summed: a
    prompt naming one concept gets exactly that concept's separate edit.
    """
    concepts = list(concepts)
    if len(concepts) < 2:
        raise ValueError("interference needs at least two concepts")
    weights = host.cross_attention_weights()
    separate = [compute_edit(host, method=method, concepts=(c,), **spec_kw) for c in concepts]
    joint = compute_edit(host, method=method, concepts=tuple(concepts), **spec_kw)
    cfg = joint.spec.resolved()
    vs = cf.uce_vectors(_encoder_fn(host), concepts, cfg["guide"], (), cfg["convention"], cache=None)
    out = cf.measure_interference(weights, [s.result for s in separate], joint.result, vs.erase, vs.guide)
    out.pop("per_layer", None)
    pres = cfg["uce"]["preserve"]
    if pres:
        hid, _ = host.encode(pres)
        rows = hid.reshape(-1, hid.shape[-1]).to(torch.float64)
        stacked = cf.sum_deltas(*[s.result for s in separate])
        num_s = num_j = den = 0.0
        for mod, w in weights.items():
            base = w.to(torch.float64) @ rows.T
            den += float(torch.linalg.norm(base)) ** 2
            num_s += float(torch.linalg.norm(stacked[mod].to(torch.float64) @ rows.T)) ** 2
            num_j += float(torch.linalg.norm(joint.result[mod].to(torch.float64) @ rows.T)) ** 2
        out["preserve_rel_change_stacked"] = math.sqrt(num_s / den)
        out["preserve_rel_change_joint"] = math.sqrt(num_j / den)
    out["concepts"] = concepts
    out["method"] = method
    return out


def gated_stack_effect(host: EditHost, outcomes: Sequence[EditOutcome], prompts: Sequence[str],
                       gate=None) -> list[dict]:
    """What a stack of separately computed edits does to each prompt once gated.

    For every prompt: the gate each eraser takes (default: the official Facilitated Transport rule,
    computed with the host's own encoder as the samplers do) and ``rel_change`` =
    ``||sum_i m_i d_i C_p|| / ||W C_p||`` over all layers, with ``C_p`` the prompt's 77 context rows:
    how much the gated stack moves this prompt's keys/values (an unrelated prompt should stay near
    0; the FT cosine half of the gate is rarely 0, so some of every eraser leaks into every prompt).
    """
    from ..gate import GateSettings
    from ..stack import EraserStack

    gate = gate or GateSettings()
    enc = host.gate_encoder()
    stack = EraserStack()
    for o in outcomes:
        stack = stack.with_eraser(o.eraser, gate=gate)
    coeffs, _ = stack.gates(enc(list(prompts)), encoder=enc)
    weights = host.cross_attention_weights()
    hidden, _ = host.encode(list(prompts))
    rows = []
    for i, p in enumerate(prompts):
        ct = hidden[i].to(torch.float64).T
        num = den = 0.0
        for mod, w in weights.items():
            ct_d = ct.to(w.device)
            d = sum(float(coeffs[i, j]) * o.result[mod].to(torch.float64) for j, o in enumerate(outcomes))
            num += float(torch.linalg.norm(d @ ct_d)) ** 2
            den += float(torch.linalg.norm(w.to(torch.float64) @ ct_d)) ** 2
        rows.append({"prompt": p, "gates": [round(float(g), 4) for g in coeffs[i]], "rel_change": math.sqrt(num / den)})
    return rows

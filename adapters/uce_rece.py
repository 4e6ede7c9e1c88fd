"""UCE / RECE on the user's loaded model (issue 5): hosts, cache, export as erasers, import.

The closed-form math lives in :mod:`.closed_form`; this module binds it to a host:

* a **host** gives the current ``attn2.to_k`` / ``attn2.to_v`` weights under canonical (diffusers)
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
* :func:`import_published` converts UCE's safetensors of edited ``attn2`` weights and RECE's
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

import hashlib
import json
import math
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from . import closed_form as cf
from .errors import EraserFileError
from .eraser import Eraser
from .files import sha256_file
from .lowrank import ModuleDelta

__all__ = [
    "PUBLISHED_FULL_UNET_BYTES", "METHODS", "CONCEPT_TYPES", "EditHost", "DiffusersEditHost",
    "DiffusersSDXLTextEncoder", "EditSpec", "EditOutcome", "EditCache", "DEFAULT_EDIT_CACHE",
    "weights_fingerprint", "compute_edit", "edit_to_eraser", "save_edit", "stacked_interference",
    "gated_stack_effect",
    "read_published_weights", "base_cross_attention_weights", "import_published", "ImportOutcome",
    "is_cross_attention_kv",
]

#: RECE publishes ``torch.save(unet.state_dict())`` of SD v1.4: 859,520,964 fp32 parameters.
PUBLISHED_FULL_UNET_BYTES = 859_520_964 * 4
METHODS = ("uce", "rece")
CONCEPT_TYPES = ("object", "object_hard", "style", "nudity", "unsafe")


def is_cross_attention_kv(name: str) -> bool:
    return "attn2" in name and name.endswith((".to_k", ".to_v"))


# ---------------------------------------------------------------------------
# fingerprints
# ---------------------------------------------------------------------------

def _tensor_digest(h, name: str, w: torch.Tensor, samples: int, with_sum: bool) -> None:
    w = w.detach()
    flat = w.reshape(-1)
    step = max(1, flat.numel() // max(1, samples))
    sample = flat[::step].to(device="cpu", dtype=torch.float32).contiguous()
    h.update(name.encode())
    h.update(repr((tuple(w.shape), str(w.dtype).replace("torch.", ""))).encode())
    h.update(sample.numpy().tobytes())
    if with_sum and flat.numel() and w.is_floating_point():
        # catches sparse edits between the sampled elements; 9 significant digits are far above
        # the reduction-order noise of a float64 sum, so the value is stable across thread counts
        h.update(f"{float(torch.sum(w, dtype=torch.float64)):.9e}".encode())


def weights_fingerprint(weights: Mapping[str, torch.Tensor], samples_per_tensor: int = 4096,
                        with_sums: bool = True) -> str:
    """Cheap, stable fingerprint of a set of weights (hex, 16 chars).

    sha256 over each tensor's name, shape, dtype, a strided sample of ``samples_per_tensor``
    values (as float32) and its float64 sum printed to 9 significant digits. Independent of
    device, storage and process; any fine-tune, merge or LoRA on these weights changes it.
    SD1.5's 32 attn2 matrices take a few milliseconds.
    """
    h = hashlib.sha256()
    for name in sorted(weights):
        _tensor_digest(h, name, weights[name], samples_per_tensor, with_sums)
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------
# hosts
# ---------------------------------------------------------------------------

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
        from .gate import EncodedText

        def enc(texts):
            hidden, ids = self.encode(list(texts))
            toks = []
            for row in ids.tolist():
                end = next((i for i, t in enumerate(row[1:], 1) if t == cf.CLIP_EOS_TOKEN_ID), len(row))
                toks.append({t for t in row[1:end] if t >= 0})
            return EncodedText(hidden.float(), toks)
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
        from .diffusers_host import DiffusersTextEncoder
        from .naming import layout_from_diffusers_config

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
        return super().gate_encoder() if self.sdxl else self._encoder     # what GatedPipeline uses

    def text_fingerprint(self) -> str:
        extra = f"diffusers|sdxl={self.sdxl}|clip_skip={self.clip_skip}"
        return hashlib.sha256("|".join([extra] + [_module_digest(m, "") for m in self._text_modules])
                              .encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------
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
        cf.rece_defaults(self.concept_type)  # validates the type

    @property
    def type_defaults(self) -> cf.ReceTypeDefaults:
        return cf.rece_defaults(self.concept_type)

    def resolved(self) -> dict:
        """The effective settings (defaults filled in), as stored in the file's metadata."""
        td = self.type_defaults
        guide = td.target if self.guide is None else self.guide
        uce_preserve = list(self.preserve)
        if cf._convention(self.convention) == "aligned_tail" and "" not in uce_preserve:
            uce_preserve = [""] + uce_preserve      # the old UCE code always preserves ''
        out = {"method": self.method, "concepts": list(self.concepts), "guide": guide,
               "concept_type": self.concept_type, "convention": cf._convention(self.convention),
               "uce": {"lam": float(self.lam), "erase_scale": float(self.erase_scale),
                       "preserve_scale": self.preserve_scale, "preserve": uce_preserve}}
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
                 f"{PUBLISHED_FULL_UNET_BYTES / 1e9:.2f} GB for a published full-UNet RECE checkpoint"]
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
    vs = cf.uce_vectors(encode, list(spec.concepts), cfg["guide"], cfg["uce"]["preserve"], cfg["convention"],
                        encoder_key=ekey)
    rece_inputs = None
    if spec.method == "rece":
        concept_emb, target_emb = cf.rece_prompt_embeddings(encode, list(spec.concepts), cfg["guide"], encoder_key=ekey)
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
    eraser = Eraser(name=label[:80], kind="weight", concepts=list(spec.concepts), method=spec.method,
                    modules=modules, settings=cfg)
    rank = max(d.rank for d in modules.values())
    return eraser, {"rank": rank, "rel_error_max": max(errs.values()), "rel_errors": errs,
                    "factor_bytes": factor_bytes, "full_delta_bytes": full_bytes}


def save_edit(outcome: EditOutcome, path, dtype: torch.dtype | None = None) -> str:
    """Write ``outcome.eraser`` (kohya keys + ``conceptgate.*`` metadata); returns the path.

    Sets the eraser's ``source`` / ``sha256`` and the report's ``file`` / ``file_bytes``.
    """
    from .files import save_eraser

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
    from .gate import GateSettings
    from .stack import EraserStack

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


# ---------------------------------------------------------------------------
# import of published artifacts
# ---------------------------------------------------------------------------

def _normalise_keys(sd: Mapping[str, torch.Tensor]) -> dict:
    """Strip a ``unet.`` prefix (pipeline-level state dicts); other names are kept as they are."""
    return {(k[5:] if k.startswith("unet.") else k): v for k, v in sd.items()}


def read_published_weights(path) -> dict:
    """A published UCE/RECE file as ``{diffusers state-dict key: tensor}``.

    ``.safetensors`` (UCE's edited ``attn2`` weights) through safetensors; anything else (RECE's
    ``torch.save(unet.state_dict())`` ``.pt``) only with ``torch.load(weights_only=True)``, which
    refuses pickles that would construct arbitrary objects.
    """
    path = str(path)
    if not os.path.exists(path):
        raise EraserFileError(path, "file not found")
    if path.lower().endswith(".safetensors"):
        from .files import read_safetensors

        sd, _ = read_safetensors(path)
    else:
        try:
            try:   # zip-format checkpoints are memory-mapped (a full SD UNet is 3.4 GB)
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise EraserFileError(path, f"cannot be read safely (torch.load weights_only=True refused it: "
                                        f"{str(e).splitlines()[0][:200]})") from None
        if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
            sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not sd:
        raise EraserFileError(path, "not a (non-empty) dictionary of tensors")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise EraserFileError(path, f"entry {bad[0]!r} is not a tensor")
    sd = _normalise_keys(sd)
    if any(k.startswith(("model.diffusion_model.", "diffusion_model.")) for k in sd):
        raise EraserFileError(path, "LDM/A1111 key names (model.diffusion_model.*); this converter reads the "
                                    "diffusers UNet key names that UCE and RECE publish")
    return sd


def base_cross_attention_weights(base) -> dict:
    """``{module name: W}`` of a base model's attn2 to_k/to_v.

    ``base``: a diffusers model folder (``unet/`` inside) or UNet folder (only the needed tensors are
    read from its ``.safetensors``), a ``UNet2DConditionModel``, a pipeline, an :class:`EditHost`,
    or a state dict / ``{name: W}`` mapping. ``"toy"``: the embedded toy model.
    """
    if isinstance(base, EditHost):
        return base.cross_attention_weights()
    if isinstance(base, torch.nn.Module):
        return cf.collect_cross_attention_weights(base)
    if hasattr(base, "unet") and isinstance(getattr(base, "unet"), torch.nn.Module):
        return cf.collect_cross_attention_weights(base.unet)
    if isinstance(base, Mapping):
        return cf.collect_cross_attention_weights(_normalise_keys(base))
    path = resolve_model_path(str(base))
    folder = os.path.join(path, "unet") if os.path.isdir(os.path.join(path, "unet")) else path
    if os.path.isdir(folder):
        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        if files:
            from safetensors import safe_open

            out = {}
            preferred = [f for f in files if f == "diffusion_pytorch_model.safetensors"] or files
            with safe_open(os.path.join(folder, preferred[0]), framework="pt", device="cpu") as f:
                for k in f.keys():
                    n = k[:-7] if k.endswith(".weight") else k
                    if is_cross_attention_kv(n) and k.endswith(".weight"):
                        out[n] = f.get_tensor(k)
            if out:
                return out
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet" if folder != path else None,
                                                    local_files_only=True)
        return cf.collect_cross_attention_weights(unet)
    if os.path.isfile(path):
        return cf.collect_cross_attention_weights(read_published_weights(path))
    raise FileNotFoundError(f"base model not found: {base}")


def resolve_model_path(model: str) -> str:
    """``"toy"`` -> the embedded toy model's diffusers folder (error if not present yet)."""
    if model != "toy":
        return model
    from ..toyworld import WEIGHTS_DIR

    if not os.path.isfile(os.path.join(WEIGHTS_DIR, "model_index.json")):
        raise FileNotFoundError(f"the toy model is not present yet ({WEIGHTS_DIR} has no model_index.json)")
    return WEIGHTS_DIR


@dataclass
class ImportOutcome:
    eraser: Eraser
    report: dict
    hyperparameters: dict = field(default_factory=dict)


def _guess_concepts(path: str) -> list[str]:
    base = os.path.splitext(os.path.basename(path))[0]
    m = re.match(r"erased-(.+?)-towards_", base)
    if m:
        return [c.strip() for c in m.group(1).replace("_", " ").split(",") if c.strip()]
    m = re.match(r"([A-Za-z][A-Za-z _-]*?)_ep\d+$", base)
    if m:
        return [m.group(1).replace("_", " ")]
    return []


def _guess_method(path: str, full_unet: bool) -> str:
    """UCE's old code names files ``erased-...-method_replace...``; RECE's are ``<concept>_ep<k>.pt``;
    the new UCE code writes safetensors of the edited weights only."""
    base = os.path.basename(path)
    if base.startswith("erased-") or path.lower().endswith(".safetensors"):
        return "uce"
    if re.search(r"_ep\d+\.", base) or full_unet:
        return "rece"
    return "uce"


def import_published(path, base, concepts: Sequence[str] | None = None, *, method: str | None = None,
                     name: str | None = None, rank: int | None = None, tol: float = 1e-3,
                     full: bool = False, store_dtype: torch.dtype = torch.float32,
                     check_other_keys: bool = True, log: Callable[[str], None] | None = None) -> ImportOutcome:
    """Published UCE/RECE weights -> a ConceptGate :class:`Eraser` (delta vs ``base``, factored).

    Every ``attn2.to_k`` / ``to_v`` weight in the file minus the base's; zero deltas are dropped.
    ``full=True`` stores the exact dense deltas (``.diff``); otherwise a float64 SVD truncated to
    ``rank`` or to the smallest rank with relative Frobenius error ``<= tol`` (reported per
    module and as the maximum). A full-UNet file whose *other* weights differ from the base is
    reported (``other_keys_changed``): the base is probably not the model the edit was made from.
    """
    say = log or (lambda s: None)
    path = str(path)
    t0 = time.perf_counter()
    sd = read_published_weights(path)
    edited = {k[:-7]: v for k, v in sd.items() if k.endswith(".weight") and is_cross_attention_kv(k[:-7])}
    if not edited:
        raise EraserFileError(path, "no attn2 to_k/to_v weights (diffusers key names) in this file")
    say(f"read {len(sd)} tensors ({len(edited)} attn2 to_k/to_v) from {os.path.basename(path)}")
    base_w = base_cross_attention_weights(base)
    missing = [k for k in edited if k not in base_w]
    if missing:
        raise EraserFileError(path, f"module {missing[0]!r} is not in the base model (wrong base?)")
    for k, v in edited.items():
        if tuple(v.shape) != tuple(base_w[k].shape):
            raise EraserFileError(path, f"shape mismatch at {k}: file {tuple(v.shape)}, base {tuple(base_w[k].shape)}")
    other_changed = []
    if check_other_keys and len(sd) > len(edited) and not isinstance(base, (Mapping,)):
        other_changed = _other_keys_changed(sd, base, set(edited))
    method = method or _guess_method(path, len(sd) > 2 * len(edited))
    concepts = [c for c in (concepts or _guess_concepts(path)) if c.strip()]
    if not concepts:
        raise EraserFileError(path, "no concept list: pass the erased concept(s) (--concept)")
    modules, report_mod = {}, {}
    elem = torch.empty((), dtype=store_dtype).element_size()
    nbytes = 0
    for k in sorted(edited):
        delta = edited[k].to(torch.float64) - base_w[k].to(torch.float64)
        if not bool(delta.any()):
            continue
        if full:
            modules[k] = ModuleDelta(diff=delta.to(store_dtype))
            report_mod[k] = {"rank": min(delta.shape), "rel_error": 0.0}
            nbytes += delta.numel() * elem
            continue
        up, down, info = cf.factor_delta(delta, rank=rank, tol=None if rank is not None else tol, dtype=store_dtype)
        modules[k] = ModuleDelta(up=up.contiguous(), down=down.contiguous(), alpha=float(up.shape[1]))
        report_mod[k] = {"rank": info["rank"], "rel_error": info["rel_error"],
                         "singular_values": info["singular_values"][:8]}
        nbytes += (up.numel() + down.numel()) * elem
    if not modules:
        raise EraserFileError(path, "the file's attn2 weights equal the base's: nothing to import (wrong base?)")
    ranks = [m["rank"] for m in report_mod.values()]
    errs = [m["rel_error"] for m in report_mod.values()]
    shapes = {k: tuple(base_w[k].shape) for k in modules}
    not_low_rank = [k for k, m in report_mod.items() if not full and m["rank"] > 0.5 * min(shapes[k])]
    report = {"file": path, "method": method, "concepts": concepts, "modules": len(modules),
              "rank_max": max(ranks), "rank_min": min(ranks), "truncation_rel_error_max": max(errs),
              "tol": None if (full or rank is not None) else tol, "rank_requested": rank, "full": full,
              "factor_bytes": nbytes, "source_bytes": os.path.getsize(path),
              "other_keys_changed": other_changed, "not_low_rank": not_low_rank, "per_module": report_mod,
              "seconds": time.perf_counter() - t0}
    warnings = []
    if other_changed:
        warnings.append(f"{len(other_changed)} weight(s) outside attn2 to_k/to_v differ from the base "
                        f"(e.g. {other_changed[0]}): is the base the model this edit was made from?")
    if not_low_rank:
        warnings.append(f"{len(not_low_rank)} delta(s) need a rank above half their size: the base is probably "
                        f"not the model the edit was computed on")
    report["warnings"] = warnings
    settings = {"imported_from": os.path.basename(path), "source_sha256": sha256_file(path),
                "method": method, "concepts": concepts}
    label = name or os.path.splitext(os.path.basename(path))[0]
    eraser = Eraser(name=label[:80], kind="weight", concepts=concepts, method=method, modules=modules,
                    settings=settings, base_fingerprint=weights_fingerprint(base_w))
    fam = None
    try:
        from .files import family_from_modules

        fam = family_from_modules(modules)
    except Exception:  # pragma: no cover - defensive
        pass
    eraser.base_family = None if fam in (None, "custom") else fam
    hyper = {"import": {k: v for k, v in report.items() if k not in ("per_module", "file")}}
    return ImportOutcome(eraser, report, hyper)


def _other_keys_changed(sd: Mapping[str, torch.Tensor], base, skip: set) -> list[str]:
    """Keys of a full-UNet file (other than the edited modules) that differ from the base."""
    ref = None
    if isinstance(base, torch.nn.Module):
        ref = base.state_dict()
    elif hasattr(base, "unet") and isinstance(getattr(base, "unet"), torch.nn.Module):
        ref = base.unet.state_dict()
    elif isinstance(base, DiffusersEditHost):
        ref = base.unet.state_dict()
    changed = []
    if ref is not None:
        for k, v in sd.items():
            n = k[:-7] if k.endswith(".weight") else k
            if n in skip or k not in ref:
                continue
            if tuple(ref[k].shape) != tuple(v.shape) or not torch.equal(ref[k].to(v.dtype), v):
                changed.append(k)
        return changed
    if isinstance(base, (str, os.PathLike)):
        path = resolve_model_path(str(base))
        folder = os.path.join(path, "unet") if os.path.isdir(os.path.join(path, "unet")) else path
        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")) if os.path.isdir(folder) else []
        if files:
            from safetensors import safe_open

            with safe_open(os.path.join(folder, files[0]), framework="pt", device="cpu") as f:
                keys = set(f.keys())
                for k, v in sd.items():
                    n = k[:-7] if k.endswith(".weight") else k
                    if n in skip or k not in keys:
                        continue
                    t = f.get_tensor(k)
                    if tuple(t.shape) != tuple(v.shape) or not torch.equal(t.to(v.dtype), v):
                        changed.append(k)
    return changed


def save_import(outcome: ImportOutcome, path, dtype: torch.dtype | None = None) -> str:
    from .files import save_eraser

    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sha = save_eraser(outcome.eraser, path, hyperparameters=outcome.hyperparameters, dtype=dtype)
    outcome.eraser.source, outcome.eraser.sha256 = path, sha
    outcome.report["out"] = path
    outcome.report["out_bytes"] = os.path.getsize(path)
    return path

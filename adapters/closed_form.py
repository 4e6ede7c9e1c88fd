"""Closed-form cross-attention edits: UCE and RECE (issue 5), host-agnostic math.

Everything here works on plain tensors: a mapping ``{module_name: W}`` of the
``attn2.to_k`` / ``attn2.to_v`` weight matrices (``out x ctx_dim``, diffusers
module paths as names) and text vectors (rows of the text encoder's final
output, exactly as the sampler feeds it to the UNet).  No diffusers / ComfyUI
import happens at module level; the text encoder is called through a
caller-supplied ``encode(texts) -> (hidden[B, L, D], token_ids[B, L][, mask])``.

Formulas (see ``shared/reference/rece-uce-geom-erasing.md``, sections 1-2):

UCE, per matrix ``W`` (``E`` erased vectors ``c_i`` with guide vectors ``c*_i``,
``P`` preserved vectors ``c_j``)::

    W_new = (lam W + a_e sum_E (W c*_i) c_i^T + a_p sum_P (W c_j) c_j^T)
          @ (lam I + a_e sum_E c_i c_i^T  + a_p sum_P c_j c_j^T)^-1

Because the preserve targets are ``W c_j`` (identity), this is *exactly*::

    dW = W_new - W = U @ D,   U = a_e W (C* - C)^T   (out x n),
                              D = C M^-1 = solve(M, C^T)^T   (n x ctx_dim)

with ``M`` the right-hand bracket.  ``M`` only depends on the text vectors, so
it is shared by every layer of the same ``ctx_dim``: one float64 ``solve`` per
edit, then two thin matrix products per layer.  ``method="full"`` evaluates the
bracket form literally (one batched solve for all layers) and serves as a
reference; both agree to float64 round-off.

RECE, with ``W_l`` the original and ``W'_l`` the current (edited) matrices::

    c' = (lam_reg I + sum_l W'_l^T W'_l)^-1 (sum_l W'_l^T W_l) c     (shared by all layers)

then a UCE-style edit of the *current* weights mapping ``c'_t -> n_t`` (all
token positions of the target prompt) with ``lam = lam2 = 0.1`` and
``preserve_scale = lam1 = 0.1``, for K epochs; deltas accumulate.

All solves are float64 ``torch.linalg.solve`` (never an explicit inverse) and
the ridge term is mandatory (``lam > 0``): without it every direction outside
the edited vectors collapses.  Results are cast back to each weight's dtype.
"""
from __future__ import annotations

import math
import os
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping, Sequence

import torch

__all__ = [
    "PreserveGram",
    "VectorSet",
    "EditResult",
    "RECEResult",
    "ReceTypeDefaults",
    "RECE_TYPE_DEFAULTS",
    "RECE_EDIT_DEFAULTS",
    "UCE_DEFAULTS",
    "CLIP_BOS_TOKEN_ID",
    "CLIP_EOS_TOKEN_ID",
    "default_preserve_scale",
    "rece_defaults",
    "uce_edit",
    "uce_edit_vectors",
    "rece_adversarial_embedding",
    "rece_edit",
    "clear_gram_cache",
    "factor_delta",
    "factor_edit",
    "stack_vector_sets",
    "sum_deltas",
    "apply_deltas",
    "measure_interference",
    "EncodingCache",
    "DEFAULT_ENCODING_CACHE",
    "encode_texts",
    "last_word_index",
    "aligned_tail_vectors",
    "last_token_vectors",
    "uce_vectors",
    "preserve_gram_from_prompts",
    "rece_prompt_embeddings",
    "collect_cross_attention_weights",
    "cross_attention_shapes",
    "random_cross_attention_weights",
    "benchmark_speed",
]

_F64 = torch.float64

# CLIP BPE vocabulary (SD1.x / SD2.x / SDXL): <|startoftext|>, <|endoftext|>.
CLIP_BOS_TOKEN_ID = 49406
CLIP_EOS_TOKEN_ID = 49407

# ---------------------------------------------------------------------------
# defaults
# ---------------------------------------------------------------------------

#: UCE defaults of both published implementations (lam 0.5, erase scale 1).
#: ``preserve_scale=None`` means: apply :func:`default_preserve_scale`.
UCE_DEFAULTS = MappingProxyType({"lam": 0.5, "erase_scale": 1.0, "preserve_scale": None})

#: RECE's per-epoch model edit (paper Eq. 3; README "lambda1 = 0.1 and lambda2 = 0.1").
RECE_EDIT_DEFAULTS = MappingProxyType({"lam": 0.1, "preserve_scale": 0.1, "erase_scale": 1.0})


def default_preserve_scale(n_preserve_prompts: int) -> float:
    """Default ``a_p``: the rule of the old UCE code that produced RECE's start checkpoints.

    ``a_p = max(0.1, 1 / n_preserve_prompts)`` counted in *prompts* (not token
    vectors): 1.0 for the usual single ``''``/``' '`` preserve prompt, 0.1 for
    long lists (10 prompts or more, e.g. the ~1,733-artist list), in between
    for 2-9 prompts.  With no preserve prompts the value is irrelevant (1.0).
    """
    n = int(n_preserve_prompts)
    if n <= 0:
        return 1.0
    return max(0.1, 1.0 / n)


@dataclass(frozen=True)
class ReceTypeDefaults:
    """RECE settings per erasure type (reference note, section 2.4)."""

    lam_reg: float          #: ``--regular_scale`` of the adversarial-embedding solve
    epochs: int             #: RECE epochs K
    target: str             #: target/guide prompt of the RECE edits (and of the UCE start)
    preserve: tuple         #: preserve prompts (``ARTIST_LIST`` = every other artist of the list)
    uce_preserve_scale: float  #: a_p of the UCE start checkpoint (lam 0.5, a_e 1)
    note: str = ""


#: Per-type defaults as data.  Objects come in the note's two flavours; the
#: plain ``"object"`` key is the "easy" setting (lam_reg 0.1), see ``rece_defaults``.
RECE_TYPE_DEFAULTS: Mapping[str, ReceTypeDefaults] = MappingProxyType({
    "nudity": ReceTypeDefaults(0.1, 3, " ", (" ",), 1.0,
                               "UCE nudity->' ' (a_p 1.0); select by NudeNet rate per epoch"),
    "unsafe": ReceTypeDefaults(0.1, 2, " ", (" ",) * 11, 1.0,
                               "11 I2P concepts, ' ' preserved once per concept; Q16 selection"),
    "style": ReceTypeDefaults(1e-3, 1, "art", ("", "ARTIST_LIST"), 0.1,
                              "UCE artist->'art' with '' + ~1,733 other artists preserved"),
    "object_hard": ReceTypeDefaults(1e-3, 1, " ", ("",), 1.0,
                                    "objects UCE does not erase well (church, garbage truck)"),
    "object_easy": ReceTypeDefaults(0.1, 1, " ", ("",), 1.0,
                                    "objects like English springer, golf ball, parachute"),
})

_TYPE_ALIASES = {"art": "style", "artist": "style", "artistic_style": "style",
                 "nsfw": "nudity", "nude": "nudity", "i2p": "unsafe",
                 "object": "object_easy", "objects": "object_easy"}


def rece_defaults(concept_type: str) -> ReceTypeDefaults:
    """Look up :data:`RECE_TYPE_DEFAULTS` (aliases: art/artist -> style, object -> object_easy)."""
    key = str(concept_type).strip().lower().replace(" ", "_").replace("-", "_")
    key = _TYPE_ALIASES.get(key, key)
    if key not in RECE_TYPE_DEFAULTS:
        raise ValueError(f"unknown RECE concept type {concept_type!r}; known: "
                         f"{sorted(RECE_TYPE_DEFAULTS) + sorted(_TYPE_ALIASES)}")
    return RECE_TYPE_DEFAULTS[key]


# ---------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------

def _check_finite(t: torch.Tensor, what: str) -> None:
    # A finite sum implies every element is finite (any NaN/Inf poisons the sum);
    # the sum is a cheap reduction, the element-wise test only runs when it is not.
    if t.numel() == 0:
        return
    if math.isfinite(float(t.sum())):
        return
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} contains NaN or Inf values")


def _rows(t, what: str, d: int | None = None) -> torch.Tensor:
    """Return a 2-D ``(n, d)`` view of vectors given as ``(d,)``, ``(n, d)`` or ``(..., d)``."""
    if not isinstance(t, torch.Tensor):
        try:
            t = torch.as_tensor(t)
        except Exception as exc:  # pragma: no cover - defensive
            raise ValueError(f"{what} must be a tensor, got {type(t).__name__}") from exc
    if t.dim() == 0:
        raise ValueError(f"{what} must have at least one dimension (got a scalar)")
    if not (t.is_floating_point()):
        raise ValueError(f"{what} must be a floating-point tensor, got {t.dtype}")
    t = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    if d is not None and t.shape[-1] != d:
        raise ValueError(f"{what} has vector dimension {t.shape[-1]}, expected ctx_dim {d}")
    _check_finite(t, what)
    return t


def _check_scalar(x, what: str, positive: bool = True) -> float:
    try:
        v = float(x)
    except Exception as exc:
        raise ValueError(f"{what} must be a number, got {x!r}") from exc
    if not math.isfinite(v):
        raise ValueError(f"{what} must be finite, got {v}")
    if positive and v <= 0:
        raise ValueError(f"{what} must be > 0, got {v} (the ridge term may never be dropped)"
                         if what.startswith("lam") else f"{what} must be > 0, got {v}")
    if not positive and v < 0:
        raise ValueError(f"{what} must be >= 0, got {v}")
    return v


def _validate_weights(weights: Mapping[str, torch.Tensor], what: str = "weights",
                      check_finite: bool = True) -> dict:
    if not isinstance(weights, Mapping) or len(weights) == 0:
        raise ValueError(f"{what} must be a non-empty mapping {{module_name: W}}")
    out = {}
    for name, w in weights.items():
        if not isinstance(w, torch.Tensor):
            raise ValueError(f"{what}[{name!r}] must be a torch.Tensor, got {type(w).__name__}")
        if w.dim() != 2:
            raise ValueError(f"{what}[{name!r}] must be a 2-D (out x ctx_dim) matrix, "
                             f"got shape {tuple(w.shape)}")
        if not w.is_floating_point():
            raise ValueError(f"{what}[{name!r}] must be floating point, got {w.dtype}")
        if check_finite:
            _check_finite(w, f"{what}[{name!r}]")
        out[name] = w
    return out


def _ctx_groups(weights: Mapping[str, torch.Tensor]) -> "OrderedDict[tuple, list]":
    groups: OrderedDict = OrderedDict()
    for name, w in weights.items():
        groups.setdefault((int(w.shape[1]), w.device), []).append(name)
    return groups


def _single_ctx_dim(weights: Mapping[str, torch.Tensor], what: str) -> int:
    dims = {int(w.shape[1]) for w in weights.values()}
    if len(dims) != 1:
        raise ValueError(f"{what}: all matrices must share one ctx_dim, got {sorted(dims)}")
    return dims.pop()


def _check_vectors_match(weights, d_vec: int, what: str) -> None:
    for name, w in weights.items():
        if int(w.shape[1]) != d_vec:
            raise ValueError(f"shape mismatch: {what} have dimension {d_vec} but weight "
                             f"{name!r} has shape {tuple(w.shape)} (ctx_dim {w.shape[1]})")


# ---------------------------------------------------------------------------
# vector sets
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class PreserveGram:
    """Preserved vectors, kept only as their Gram matrix ``sum_j c_j c_j^T`` (float64).

    Because UCE/RECE preserve targets are the weights' own outputs, preserved
    vectors enter the closed form only through this ``ctx_dim x ctx_dim`` sum:
    a long preserve list (e.g. 1,733 prompts x 77 tokens) costs one matrix.
    """

    gram: torch.Tensor
    n_vectors: int
    n_prompts: int

    @classmethod
    def from_vectors(cls, vectors, n_prompts: int | None = None) -> "PreserveGram":
        rows = _rows(vectors, "preserve vectors").to(_F64)
        return cls(rows.T @ rows, int(rows.shape[0]),
                   int(rows.shape[0] if n_prompts is None else n_prompts))

    @property
    def dim(self) -> int:
        return int(self.gram.shape[0])

    def __add__(self, other: "PreserveGram") -> "PreserveGram":
        if not isinstance(other, PreserveGram):
            return NotImplemented
        if other.dim != self.dim:
            raise ValueError(f"cannot add preserve sets of dimension {self.dim} and {other.dim}")
        return PreserveGram(self.gram + other.gram.to(self.gram.device),
                            self.n_vectors + other.n_vectors, self.n_prompts + other.n_prompts)


def _as_preserve(preserve, d: int, n_prompts: int | None = None) -> PreserveGram | None:
    if preserve is None:
        return None
    if isinstance(preserve, PreserveGram):
        if preserve.dim != d:
            raise ValueError(f"shape mismatch: preserve Gram is {preserve.dim}x{preserve.dim}, "
                             f"expected ctx_dim {d}")
        _check_finite(preserve.gram, "preserve Gram matrix")
        return preserve
    rows = _rows(preserve, "preserve vectors", d)
    if rows.shape[0] == 0:
        return None
    return PreserveGram.from_vectors(rows, n_prompts)


@dataclass(frozen=True)
class VectorSet:
    """Erase/guide vector pairs plus a preserve set, ready for :func:`uce_edit`.

    ``erase[i]`` is mapped onto the outputs of ``guide[i]``.  Several concepts
    are combined (for one joint solve) with :func:`stack_vector_sets`.
    """

    erase: torch.Tensor
    guide: torch.Tensor
    preserve: PreserveGram | None = None
    convention: str = ""
    n_erase_prompts: int = 0

    @property
    def n_preserve_prompts(self) -> int:
        return 0 if self.preserve is None else self.preserve.n_prompts


def stack_vector_sets(*sets: VectorSet) -> VectorSet:
    """Concatenate several concepts' vector sets for one joint solve (preserve sets are summed)."""
    if len(sets) == 1 and not isinstance(sets[0], VectorSet):
        sets = tuple(sets[0])
    if not sets:
        raise ValueError("stack_vector_sets needs at least one VectorSet")
    dims = {int(s.erase.shape[-1]) for s in sets}
    if len(dims) != 1:
        raise ValueError(f"cannot stack vector sets of different dimensions {sorted(dims)}")
    preserve = None
    for s in sets:
        if s.preserve is not None:
            preserve = s.preserve if preserve is None else preserve + s.preserve
    convs = sorted({s.convention for s in sets})
    return VectorSet(torch.cat([s.erase for s in sets]), torch.cat([s.guide for s in sets]),
                     preserve, "+".join(convs), sum(s.n_erase_prompts for s in sets))


# ---------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------

class EditResult(dict):
    """``{module_name: delta}`` (``W_new - W``, in each weight's dtype) plus construction data.

    ``factors[name] = (up, down)`` are float64 with ``delta == (up @ down).to(dtype)``;
    ``down`` is one tensor shared by all layers of the same ctx_dim.  ``rank`` is
    the number of edited token vectors (the delta's rank for generic vectors).
    """

    def __init__(self, deltas=(), *, factors=None, rank=None, params=None):
        super().__init__(deltas)
        self.factors = factors
        self.rank = rank
        self.params = dict(params or {})


class RECEResult(EditResult):
    """Accumulated RECE deltas relative to the *original* weights (start delta included).

    Extra attributes: ``embeddings`` (the adversarial ``c'_k`` of every epoch,
    float64, shaped like the concept embedding), ``epoch_factors`` (per epoch
    ``{name: (up, down)}``), ``start`` (the start deltas or ``None``).
    ``factors`` concatenates start factors (when the start was an
    :class:`EditResult`) and epoch factors; ``None`` if the start was unfactored.
    """

    def __init__(self, deltas=(), *, embeddings=(), epoch_factors=(), start=None, **kw):
        super().__init__(deltas, **kw)
        self.embeddings = list(embeddings)
        self.epoch_factors = list(epoch_factors)
        self.start = start

    def deltas_after(self, k: int) -> dict:
        """Deltas (vs the original weights) after ``k`` epochs; 0 = the start checkpoint.

        RECE keeps an epoch's checkpoint only if a validation metric improved; a
        caller that evaluates each epoch picks ``k`` here.
        """
        k = int(k)
        if not 0 <= k <= len(self.epoch_factors):
            raise ValueError(f"k must be in 0..{len(self.epoch_factors)}, got {k}")
        out = {}
        for name, full in self.items():
            acc = torch.zeros(full.shape, dtype=_F64, device=full.device)
            if self.start is not None and name in self.start:
                acc += self.start[name].to(_F64)
            for ef in self.epoch_factors[:k]:
                up, down = ef[name]
                acc.addmm_(up, down)
            out[name] = acc.to(full.dtype)
        return out


def sum_deltas(*deltas: Mapping[str, torch.Tensor]) -> dict:
    """Sum several delta dicts (missing keys count as zero), i.e. naive stacking of edits."""
    if len(deltas) == 1 and not isinstance(deltas[0], Mapping):
        deltas = tuple(deltas[0])
    out: dict = {}
    for d in deltas:
        for k, v in d.items():
            out[k] = v.clone() if k not in out else out[k] + v
    return out


def apply_deltas(weights: Mapping[str, torch.Tensor], deltas: Mapping[str, torch.Tensor],
                 scale: float = 1.0) -> dict:
    """``{name: W + scale * delta}`` (out of place; names without delta are passed through)."""
    return {k: (w + scale * deltas[k].to(w.dtype) if k in deltas else w) for k, w in weights.items()}


# ---------------------------------------------------------------------------
# UCE
# ---------------------------------------------------------------------------

def _uce_shared_solve(erase64, preserve: PreserveGram | None, lam, a_e, a_p):
    """``D = C M^-1`` with ``M = lam I + a_e C^T C + a_p G_P`` (float64, solve)."""
    d = erase64.shape[1]
    m = a_e * (erase64.T @ erase64)
    m.diagonal().add_(lam)
    if preserve is not None:
        m += a_p * preserve.gram.to(device=m.device, dtype=_F64)
    # M is symmetric, so (C M^-1)^T = M^-1 C^T.
    return torch.linalg.solve(m, erase64.T).T.contiguous(), m


def uce_edit(weights: Mapping[str, torch.Tensor], erase, guide, preserve=None,
             lam: float = 0.5, erase_scale: float = 1.0, preserve_scale: float | None = None,
             *, n_preserve_prompts: int | None = None, method: str = "lowrank") -> EditResult:
    """UCE closed-form edit of every matrix in ``weights``; returns ``{name: W_new - W}``.

    Args:
        weights: ``{module_name: W}`` with ``W`` of shape ``out x ctx_dim``.
        erase: erased vectors ``c_i`` (``n x ctx_dim``; any ``(..., ctx_dim)`` is flattened).
        guide: guide vectors ``c*_i``, same number of rows; targets ``v*_i = W c*_i``.
        preserve: preserved vectors (rows) or a :class:`PreserveGram`; targets ``W c_j``.
        lam: ridge ``lam`` (> 0, default 0.5).  erase_scale: ``a_e`` (default 1).
        preserve_scale: ``a_p``; ``None`` -> :func:`default_preserve_scale` of the number
            of preserve *prompts* (``n_preserve_prompts``, the Gram's ``n_prompts``, or
            the number of preserve rows when raw rows are given).
        method: ``"lowrank"`` (default: ``dW = a_e W (C*-C)^T (C M^-1)``, exact) or
            ``"full"`` (the bracket form solved literally, batched over layers).

    The result also carries ``factors`` (exact float64 ``up``/``down``) and ``rank``.
    """
    weights = _validate_weights(weights)
    e_raw = erase if isinstance(erase, torch.Tensor) else torch.as_tensor(erase)
    g_raw = guide if isinstance(guide, torch.Tensor) else torch.as_tensor(guide)
    e_rows = _rows(e_raw, "erase vectors")
    g_rows = _rows(g_raw, "guide vectors")
    d = int(e_rows.shape[1])
    _check_vectors_match(weights, d, "erase vectors")
    if g_rows.shape[1] != d:
        raise ValueError(f"shape mismatch: guide vectors have dimension {g_rows.shape[1]}, "
                         f"erase vectors {d}")
    if g_rows.shape[0] != e_rows.shape[0]:
        raise ValueError(f"erase and guide must have the same number of vectors "
                         f"({e_rows.shape[0]} vs {g_rows.shape[0]}); align them first "
                         f"(see aligned_tail_vectors / last_token_vectors)")
    if e_rows.shape[0] == 0:
        raise ValueError("no erase vectors given")
    lam = _check_scalar(lam, "lam")
    a_e = _check_scalar(erase_scale, "erase_scale")
    pres = _as_preserve(preserve, d, n_preserve_prompts)
    if preserve_scale is None:
        n_p = 0 if pres is None else (pres.n_prompts if n_preserve_prompts is None
                                      else int(n_preserve_prompts))
        a_p = default_preserve_scale(n_p)
    else:
        a_p = _check_scalar(preserve_scale, "preserve_scale", positive=False)
    if method not in ("lowrank", "full"):
        raise ValueError(f"method must be 'lowrank' or 'full', got {method!r}")

    deltas, factors = {}, {}
    for (_, device), names in _ctx_groups(weights).items():
        c = e_rows.to(device=device, dtype=_F64)
        cg = g_rows.to(device=device, dtype=_F64)
        down, m = _uce_shared_solve(c, pres, lam, a_e, a_p)
        diff_t = (cg - c).T.contiguous()                                # d x n
        if method == "lowrank":
            for name in names:
                w = weights[name]
                up = (w.to(_F64) @ diff_t).mul_(a_e)                    # out x n
                deltas[name] = (up @ down).to(w.dtype)
                factors[name] = (up, down)
        else:
            # Literal bracket form: W_new^T = M^-1 (lam W^T + a_e C^T C* W^T + a_p G W^T),
            # one solve with all layers' columns stacked as right-hand sides.
            w64 = torch.cat([weights[n].to(_F64) for n in names], 0)   # N x d
            rhs = lam * w64.T + a_e * (c.T @ (cg @ w64.T))
            if pres is not None:
                rhs += a_p * (pres.gram.to(device=device, dtype=_F64) @ w64.T)
            w_new = torch.linalg.solve(m, rhs).T                        # N x d
            off = 0
            for name in names:
                w = weights[name]
                n_out = w.shape[0]
                deltas[name] = (w_new[off:off + n_out] - w64[off:off + n_out]).to(w.dtype)
                up = (w64[off:off + n_out] @ diff_t).mul_(a_e)
                factors[name] = (up, down)
                off += n_out
    return EditResult(deltas, factors=factors, rank=int(e_rows.shape[0]),
                      params={"method": "uce", "lam": lam, "erase_scale": a_e,
                              "preserve_scale": a_p, "n_erase_vectors": int(e_rows.shape[0]),
                              "n_preserve_vectors": 0 if pres is None else pres.n_vectors,
                              "n_preserve_prompts": 0 if pres is None else pres.n_prompts})


def uce_edit_vectors(weights: Mapping[str, torch.Tensor], vectors: VectorSet, **kw) -> EditResult:
    """:func:`uce_edit` on a :class:`VectorSet` (one concept or several stacked ones)."""
    return uce_edit(weights, vectors.erase, vectors.guide, vectors.preserve, **kw)


# ---------------------------------------------------------------------------
# RECE
# ---------------------------------------------------------------------------

def _check_pair(weights_orig, weights_edited):
    if set(weights_orig) != set(weights_edited):
        missing = sorted(set(weights_orig) ^ set(weights_edited))
        raise ValueError(f"original and edited weights must hold the same modules; "
                         f"differing: {missing[:5]}{'...' if len(missing) > 5 else ''}")
    for k in weights_orig:
        if weights_orig[k].shape != weights_edited[k].shape:
            raise ValueError(f"shape mismatch for {k!r}: original {tuple(weights_orig[k].shape)} "
                             f"vs edited {tuple(weights_edited[k].shape)}")


def rece_adversarial_embedding(weights_orig: Mapping[str, torch.Tensor],
                               weights_edited: Mapping[str, torch.Tensor],
                               concept_emb, lam_reg: float) -> torch.Tensor:
    """RECE's closed-form adversarial embedding (``close_regzero``), shared by all layers.

    ``c' = (lam_reg I + sum_l W'_l^T W'_l)^-1 (sum_l W'_l^T W_l) c``, applied to
    every row (token) of ``concept_emb`` (``(..., ctx_dim)``, typically the
    prompt's full ``77 x ctx_dim`` encoding).  Returns float64, same shape.
    Dense reference implementation; :func:`rece_edit` uses an equivalent
    low-rank-updated form.
    """
    wo = _validate_weights(weights_orig, "weights_orig")
    we = _validate_weights(weights_edited, "weights_edited")
    _check_pair(wo, we)
    d = _single_ctx_dim(wo, "rece_adversarial_embedding")
    c_raw = concept_emb if isinstance(concept_emb, torch.Tensor) else torch.as_tensor(concept_emb)
    rows = _rows(c_raw, "concept embedding")
    _check_vectors_match(wo, int(rows.shape[1]), "concept embedding vectors")
    lam_reg = _check_scalar(lam_reg, "lam_reg")
    dev = next(iter(wo.values())).device
    c64 = rows.to(device=dev, dtype=_F64)
    a = torch.zeros(d, d, dtype=_F64, device=dev)
    rhs = torch.zeros(d, c64.shape[0], dtype=_F64, device=dev)
    for name in wo:
        w = wo[name].to(device=dev, dtype=_F64)
        wp = we[name].to(device=dev, dtype=_F64)
        a.addmm_(wp.T, wp)
        rhs.addmm_(wp.T, w @ c64.T)
    a.diagonal().add_(lam_reg)
    out = torch.linalg.solve(a, rhs).T
    return out.reshape(c_raw.shape)


def _shared_start_blocks(start, names):
    """Start factors as ``[(ups, down)]`` blocks whose ``down`` is shared by every layer.

    ``None`` when the start has no factors for every layer or they are not of that form
    (then the start is treated as dense).  A RECE result as start yields several blocks.
    """
    facs = getattr(start, "factors", None)
    if not facs or set(start) != set(names) or set(facs) != set(names):
        return None
    downs = [facs[n][1] for n in names]
    ref = downs[0]
    if all(dn is ref for dn in downs):
        return [({n: facs[n][0].to(_F64) for n in names}, ref.to(_F64))]
    if all(dn.shape == ref.shape and torch.equal(dn, ref) for dn in downs):
        return [({n: facs[n][0].to(_F64) for n in names}, ref.to(_F64))]
    return None


_GRAM_CACHE: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_GRAM_CACHE_SIZE = 4
_GRAM_LOCK = threading.Lock()


def _weights_fingerprint(wo, names) -> tuple:
    # inference tensors (ComfyUI runs nodes under torch.inference_mode) have no version counter;
    # the checksums below still tell changed contents apart
    return tuple((n, w.data_ptr(), -1 if w.is_inference() else w._version, tuple(w.shape), w.dtype, str(w.device),
                  float(w.sum()), float(w[0].sum()), float(w[-1].sum()))
                 for n, w in ((n, wo[n]) for n in names))


def _orig_gram(wo, names, dev, cast, use_cache=True) -> torch.Tensor:
    """``sum_l W_l^T W_l`` (float64) of the original weights, memoised (LRU of 4)."""
    key = _weights_fingerprint(wo, names) if use_cache else None
    if key is not None:
        with _GRAM_LOCK:
            hit = _GRAM_CACHE.get(key)
            if hit is not None:
                _GRAM_CACHE.move_to_end(key)
                return hit
    d = int(wo[names[0]].shape[1])
    g = torch.zeros(d, d, dtype=_F64, device=dev)
    for name in names:
        w = cast(name)
        g.addmm_(w.T, w)
    if key is not None:
        with _GRAM_LOCK:
            _GRAM_CACHE[key] = g
            while len(_GRAM_CACHE) > _GRAM_CACHE_SIZE:
                _GRAM_CACHE.popitem(last=False)
    return g


def clear_gram_cache() -> None:
    """Drop the memoised ``sum_l W_l^T W_l`` matrices used by :func:`rece_edit`."""
    with _GRAM_LOCK:
        _GRAM_CACHE.clear()


#: rece_edit keeps float64 copies of the start weights when they hold at most this many
#: elements in total (SD1.x: 19.7 M, i.e. 158 MB; SDXL's 341 M are re-cast per epoch instead).
_RECE_W0_CACHE_ELEMENTS = 64_000_000


def rece_edit(weights_orig: Mapping[str, torch.Tensor], concept_emb, target_emb, preserve=None, *,
              start: Mapping[str, torch.Tensor] | None = None, epochs: int | None = None,
              lam_reg: float | None = None, concept_type: str | None = None,
              lam: float = RECE_EDIT_DEFAULTS["lam"],
              preserve_scale: float = RECE_EDIT_DEFAULTS["preserve_scale"],
              erase_scale: float = RECE_EDIT_DEFAULTS["erase_scale"],
              gram_cache: bool = True,
              progress: Callable[[int, int], None] | None = None) -> RECEResult:
    """RECE: K epochs of (adversarial embedding, closed-form edit of the current weights).

    Args:
        weights_orig: the original (unerased) ``{name: W}``; ``c'`` makes the current
            weights reproduce these on the concept.
        concept_emb: the concept prompt's encoding, ``(77, D)`` (or ``(B, 77, D)`` /
            any ``(..., D)`` rows for several prompts/concepts).
        target_emb: the target prompt's encoding (``' '`` or ``'art'``), either the
            same shape as ``concept_emb`` or one ``(77, D)`` broadcast over the prompts;
            row ``t`` of ``c'`` is mapped onto the current weights' output on row ``t``.
        preserve: preserve vectors (all tokens of every preserve prompt) or a
            :class:`PreserveGram`, targets = the current weights' own outputs.
        start: deltas of the start checkpoint relative to ``weights_orig`` (normally the
            UCE :class:`EditResult`); ``None`` starts from the original weights.
        epochs, lam_reg: default from ``concept_type`` (:data:`RECE_TYPE_DEFAULTS`);
            one of the two routes is required.
        lam, preserve_scale, erase_scale: ``lam2``, ``lam1``, ``a_e`` of the edit
            (0.1, 0.1, 1.0).
        gram_cache: memoise ``sum_l W_l^T W_l`` of the original weights (keyed by the
            tensors' storage, version and a checksum), so repeated RECE runs on the same
            loaded model skip the only dense ``ctx_dim x ctx_dim`` product.
        progress: called as ``progress(k, epochs)`` after epoch ``k`` (1-based), e.g. for a
            host's progress bar; an exception raised there (a user interrupt) aborts the edit.

    Speed: the current weights are kept as ``W_l + Ucat_l @ Dcat`` with ``Dcat`` shared
    by all layers, so ``sum_l W'^T W'`` and ``sum_l W'^T W c`` are updated from thin
    products per epoch instead of being recomputed densely.  A ``start`` that is an
    :class:`EditResult` with factors (as returned by :func:`uce_edit`) is used through
    its exact factors; a plain dict of dense deltas also works (one extra dense pass).
    The RECE preserve set of the paper is all tokens of ``' '`` (nudity/unsafe) or of
    ``''`` + other artists (style): see :func:`preserve_gram_from_prompts`.

    Returns a :class:`RECEResult` with the accumulated deltas ``W^(K) - W_orig``.
    """
    wo = _validate_weights(weights_orig, "weights_orig")
    d = _single_ctx_dim(wo, "rece_edit")
    if concept_type is not None:
        td = rece_defaults(concept_type)
        epochs = td.epochs if epochs is None else epochs
        lam_reg = td.lam_reg if lam_reg is None else lam_reg
    if epochs is None or lam_reg is None:
        raise ValueError("rece_edit needs epochs and lam_reg, or a concept_type for the defaults")
    epochs = int(epochs)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    lam_reg = _check_scalar(lam_reg, "lam_reg")
    lam = _check_scalar(lam, "lam")
    a_e = _check_scalar(erase_scale, "erase_scale")
    a_p = _check_scalar(preserve_scale, "preserve_scale", positive=False)

    c_raw = concept_emb if isinstance(concept_emb, torch.Tensor) else torch.as_tensor(concept_emb)
    t_raw = target_emb if isinstance(target_emb, torch.Tensor) else torch.as_tensor(target_emb)
    if c_raw.dim() == 0 or c_raw.shape[-1] != d:
        raise ValueError(f"shape mismatch: concept embedding has shape {tuple(c_raw.shape)}, "
                         f"weights have ctx_dim {d}")
    if t_raw.shape != c_raw.shape:
        try:
            t_raw = torch.broadcast_to(t_raw, c_raw.shape)
        except RuntimeError as exc:
            raise ValueError(f"shape mismatch: target embedding {tuple(target_emb.shape)} cannot "
                             f"be aligned with concept embedding {tuple(c_raw.shape)}") from exc
    c_rows = _rows(c_raw, "concept embedding", d)
    n_rows = _rows(t_raw, "target embedding", d)
    pres = _as_preserve(preserve, d)

    names = list(wo)
    dev = wo[names[0]].device
    if any(w.device != dev for w in wo.values()):
        raise ValueError("rece_edit: all weights must live on one device")
    if start is not None:
        missing = [k for k in start if k not in wo]
        if missing:
            raise ValueError(f"start deltas hold unknown modules: {missing[:5]}")
        for k, v in start.items():
            if tuple(v.shape) != tuple(wo[k].shape):
                raise ValueError(f"shape mismatch: start delta {k!r} {tuple(v.shape)} vs "
                                 f"weight {tuple(wo[k].shape)}")
            _check_finite(v, f"start delta {k!r}")

    c64 = c_rows.to(device=dev, dtype=_F64)
    n64 = n_rows.to(device=dev, dtype=_F64)
    ct = c64.T.contiguous()

    # Structured form: current weights W^(k)_l = B_l + Ucat_l @ Dcat, where Dcat (R x d) is
    # shared by all layers (each block's M only depends on text vectors).  With the base B
    # equal to the original weights, the start's exact factors (a uce_edit result) become
    # block 0 and sum_l W_l^T W_l is the only dense d x d product (optionally cached).
    blocks0 = _shared_start_blocks(start, names) if start is not None else []
    base_is_orig = start is None or blocks0 is not None
    w0_cache = {}
    cache_w0 = sum(w.numel() for w in wo.values()) <= _RECE_W0_CACHE_ELEMENTS

    def w0_64(name):
        w = w0_cache.get(name)
        if w is None:
            w = wo[name].to(_F64)
            if not base_is_orig and name in start:
                w = w + start[name].to(device=dev, dtype=_F64)
            if cache_w0:
                w0_cache[name] = w
        return w

    ys = {}
    if base_is_orig:
        g00 = _orig_gram(wo, names, dev, w0_64, use_cache=gram_cache)
        z0 = g00 @ ct                                   # sum_l W_l^T W_l c^T
    else:
        # dense start without shared factors: base = start weights, one pass for
        # G00 = sum W0^T W0 and Z0 = sum W0^T (W c^T); keep Y_l = W_l c^T.
        g00 = torch.zeros(d, d, dtype=_F64, device=dev)
        z0 = torch.zeros(d, c64.shape[0], dtype=_F64, device=dev)
        for name in names:
            y = wo[name].to(_F64) @ ct
            w0 = w0_64(name)
            g00.addmm_(w0.T, w0)
            z0.addmm_(w0.T, y)
            ys[name] = y
    g00 = g00.clone()
    g00.diagonal().add_(lam_reg)

    ups = {name: [] for name in names}
    downs: list = []
    p_rows = []                                        # sum_l U_l^T B_l      (R x d), per block
    s_rows = []                                        # sum_l U_l^T W_l c^T  (R x m)
    state = {"q": torch.zeros(0, 0, dtype=_F64, device=dev)}   # sum_l Ucat_l^T Ucat_l

    def append_block(new_up, down):
        r_new = down.shape[0]
        q = state["q"]
        p_new = torch.zeros(r_new, d, dtype=_F64, device=dev)
        q_cross = torch.zeros(q.shape[0], r_new, dtype=_F64, device=dev)
        q_new = torch.zeros(r_new, r_new, dtype=_F64, device=dev)
        s_new = None if base_is_orig else torch.zeros(r_new, c64.shape[0], dtype=_F64, device=dev)
        for name in names:
            u = new_up[name]
            p_new.addmm_(u.T, w0_64(name))
            if ups[name]:
                q_cross.addmm_(torch.cat(ups[name], 1).T, u)
            q_new.addmm_(u.T, u)
            if s_new is not None:
                s_new.addmm_(u.T, ys[name])
            ups[name].append(u)
        state["q"] = torch.cat([torch.cat([q, q_cross], 1), torch.cat([q_cross.T, q_new], 1)], 0)
        downs.append(down)
        p_rows.append(p_new)
        s_rows.append(p_new @ ct if base_is_orig else s_new)

    for new_up, down in blocks0 or []:
        append_block(new_up, down)
    n_start_blocks = len(downs)

    embeddings, epoch_factors = [], []
    for _k in range(epochs):
        if downs:
            dcat = torch.cat(downs, 0)                 # R x d
            pmat = torch.cat(p_rows, 0)                # R x d
            smat = torch.cat(s_rows, 0)                # R x m
            cross = dcat.T @ pmat
            a = g00 + cross + cross.T + dcat.T @ (state["q"] @ dcat)
            rhs = z0 + dcat.T @ smat
        else:
            dcat = None
            a, rhs = g00, z0
        cprime = torch.linalg.solve(a, rhs).T.contiguous()          # m x d
        embeddings.append(cprime.reshape(c_raw.shape))
        # closed-form edit of the current weights: c'_t -> (W^(k) n_t), ridge toward W^(k).
        down, _ = _uce_shared_solve(cprime, pres, lam, a_e, a_p)   # m x d
        diff_t = (n64 - cprime).T.contiguous()                      # d x m
        dd = None if dcat is None else dcat @ diff_t                # R x m
        new_up = {}
        for name in names:
            u = w0_64(name) @ diff_t
            if dd is not None:
                u.addmm_(torch.cat(ups[name], 1), dd)
            new_up[name] = u.mul_(a_e)
        append_block(new_up, down)
        epoch_factors.append({name: (new_up[name], down) for name in names})
        if progress is not None:
            progress(_k + 1, epochs)

    dcat = torch.cat(downs, 0)
    d_ep = torch.cat(downs[n_start_blocks:], 0)
    deltas, factors = {}, {}
    for name in names:
        w = wo[name]
        ucat = torch.cat(ups[name], 1)
        # the start's own delta is already dense: only the epochs' blocks are multiplied out
        total = torch.cat(ups[name][n_start_blocks:], 1) @ d_ep
        if start is not None and name in start:
            total += start[name].to(device=dev, dtype=_F64)
        deltas[name] = total.to(w.dtype)
        factors[name] = (ucat, dcat)
    if not base_is_orig:
        factors = None
    rank = int(dcat.shape[0]) if factors is not None else None
    return RECEResult(deltas, factors=factors, rank=rank,
                      embeddings=embeddings, epoch_factors=epoch_factors, start=start,
                      params={"method": "rece", "epochs": epochs, "lam_reg": lam_reg, "lam": lam,
                              "preserve_scale": a_p, "erase_scale": a_e,
                              "concept_type": concept_type,
                              "n_concept_vectors": int(c64.shape[0])})


# ---------------------------------------------------------------------------
# low-rank export
# ---------------------------------------------------------------------------

def _rel_err(delta64: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    ref = float(torch.linalg.norm(delta64))
    err = float(torch.linalg.norm(delta64 - up.to(_F64) @ down.to(_F64)))
    return err / ref if ref > 0 else err


def factor_delta(delta: torch.Tensor, rank: int | None = None, tol: float | None = None, *,
                 factors: tuple | None = None, dtype: torch.dtype | None = None,
                 max_rank: int | None = None):
    """Factor ``delta`` (``out x in``) as ``up @ down`` (``out x r``, ``r x in``).

    * ``factors=(U, D)`` from the construction (``EditResult.factors[name]``): exact.
      They are compressed to a balanced, orthogonal form through QR of each factor
      and an SVD of the small ``r x r`` core; the rank is the construction's
      (the number of edited vectors), reduced only for exactly dependent directions
      (relative singular value < 1e-12) or an explicit smaller ``rank`` (then reported).
    * otherwise (imported full-weight deltas): float64 SVD, truncated to ``rank`` or,
      if ``rank`` is None, to the smallest rank whose relative Frobenius error is
      ``<= tol`` (default 1e-3), capped by ``max_rank``.

    Returns ``(up, down, info)``; ``up``/``down`` in ``dtype`` (default ``delta``'s),
    ``up`` scaled by ``sqrt(S)`` and ``down`` by ``sqrt(S)`` (balanced).  ``info`` holds
    ``rank``, ``rel_error`` (``||delta - up@down||_F / ||delta||_F`` of the returned,
    cast factors, computed in float64), ``method`` (``"construction"``/``"svd"``),
    ``alpha`` (= rank, i.e. kohya scale 1) and the leading ``singular_values``.
    """
    if not isinstance(delta, torch.Tensor) or delta.dim() != 2:
        raise ValueError("delta must be a 2-D tensor")
    _check_finite(delta, "delta")
    out_dtype = dtype or (delta.dtype if delta.is_floating_point() else torch.float32)
    d64 = delta.to(_F64)
    if rank is not None and int(rank) < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    if factors is not None:
        up, down = factors
        if up.dim() != 2 or down.dim() != 2 or up.shape[0] != delta.shape[0] or \
                down.shape[1] != delta.shape[1] or up.shape[1] != down.shape[0]:
            raise ValueError(f"factors {tuple(up.shape)} @ {tuple(down.shape)} do not match "
                             f"delta {tuple(delta.shape)}")
        u64, dn64 = up.to(device=delta.device, dtype=_F64), down.to(device=delta.device, dtype=_F64)
        qu, ru = torch.linalg.qr(u64)
        qd, rd = torch.linalg.qr(dn64.T)
        p, s, vh = torch.linalg.svd(ru @ rd.T)
        keep = int((s > s[0] * 1e-12).sum()) if s.numel() and s[0] > 0 else 0
        if rank is not None:
            keep = min(keep, int(rank))
        sq = s[:keep].sqrt()
        up_f = (qu @ p[:, :keep]) * sq
        down_f = sq[:, None] * (vh[:keep] @ qd.T)
        method, svals = "construction", s
    else:
        u, s, vh = torch.linalg.svd(d64, full_matrices=False)
        if rank is not None:
            keep = min(int(rank), s.numel())
        else:
            tol_v = 1e-3 if tol is None else float(tol)
            total = float((s * s).sum())
            if total == 0.0:
                keep = 0
            else:
                # tail[r] = ||delta - best rank-r||_F^2 / ||delta||_F^2
                tail = torch.flip(torch.cumsum(torch.flip(s * s, [0]), 0), [0]) / total
                tail = torch.cat([tail, tail.new_zeros(1)])
                ok = (tail.sqrt() <= tol_v).nonzero()
                keep = int(ok[0]) if ok.numel() else s.numel()
        if max_rank is not None:
            keep = min(keep, int(max_rank))
        sq = s[:keep].sqrt()
        up_f = u[:, :keep] * sq
        down_f = sq[:, None] * vh[:keep]
        method, svals = "svd", s
    up_o, down_o = up_f.to(out_dtype), down_f.to(out_dtype)
    info = {"rank": int(up_o.shape[1]), "alpha": float(up_o.shape[1]), "method": method,
            "rel_error": _rel_err(d64, up_o, down_o),
            "rel_error_float64": _rel_err(d64, up_f, down_f),
            "singular_values": svals[: min(16, svals.numel())].tolist(), "tol": tol}
    return up_o, down_o, info


def factor_edit(result: Mapping[str, torch.Tensor], **kw) -> dict:
    """``{name: (up, down, info)}`` for every delta of an edit (uses its exact factors if present)."""
    facs = getattr(result, "factors", None) or {}
    return {name: factor_delta(delta, factors=facs.get(name), **kw) for name, delta in result.items()}


# ---------------------------------------------------------------------------
# multi-concept interference
# ---------------------------------------------------------------------------

def measure_interference(weights: Mapping[str, torch.Tensor],
                         separate: Sequence[Mapping[str, torch.Tensor]],
                         joint: Mapping[str, torch.Tensor], erase, guide=None) -> dict:
    """How far stacked separate edits ``W + d1 + d2 + ...`` are from the joint solve.

    Measured on the erased vectors ``erase`` (all concepts' rows, ``n x ctx_dim``)
    over all layers (Frobenius norms accumulated over layers):

    * ``output_rel_diff``: ``||(sum_i d_i - d_joint) C^T|| / ||d_joint C^T||``
    * ``delta_rel_diff``: ``||sum_i d_i - d_joint|| / ||d_joint||``
    * with ``guide`` (rows aligned with ``erase``): ``target_rel_err_stacked`` /
      ``target_rel_err_joint`` = ``||(W + d) C^T - W C*^T|| / ||W C^T - W C*^T||``
    * ``per_layer``: ``output_rel_diff`` per module.
    """
    weights = _validate_weights(weights)
    c = _rows(erase if isinstance(erase, torch.Tensor) else torch.as_tensor(erase), "erase vectors")
    _check_vectors_match(weights, int(c.shape[1]), "erase vectors")
    g = None
    if guide is not None:
        g = _rows(guide if isinstance(guide, torch.Tensor) else torch.as_tensor(guide),
                  "guide vectors", int(c.shape[1]))
        if g.shape[0] != c.shape[0]:
            raise ValueError("erase and guide must have the same number of rows")
    stacked = sum_deltas(*separate)
    acc = dict.fromkeys(["num", "den", "dnum", "dden", "ts", "tj", "t0"], 0.0)
    per_layer = {}
    for name, w in weights.items():
        if name not in joint and name not in stacked:
            continue
        ct = c.to(device=w.device, dtype=_F64).T
        dj = joint[name].to(_F64) if name in joint else torch.zeros_like(w, dtype=_F64)
        ds = stacked[name].to(_F64) if name in stacked else torch.zeros_like(w, dtype=_F64)
        num = float(torch.linalg.norm((ds - dj) @ ct)) ** 2
        den = float(torch.linalg.norm(dj @ ct)) ** 2
        acc["num"] += num
        acc["den"] += den
        acc["dnum"] += float(torch.linalg.norm(ds - dj)) ** 2
        acc["dden"] += float(torch.linalg.norm(dj)) ** 2
        per_layer[name] = math.sqrt(num / den) if den > 0 else math.sqrt(num)
        if g is not None:
            w64 = w.to(_F64)
            tgt = w64 @ g.to(device=w.device, dtype=_F64).T
            base = w64 @ ct
            acc["ts"] += float(torch.linalg.norm(base + ds @ ct - tgt)) ** 2
            acc["tj"] += float(torch.linalg.norm(base + dj @ ct - tgt)) ** 2
            acc["t0"] += float(torch.linalg.norm(base - tgt)) ** 2

    def ratio(a, b):
        return math.sqrt(a / b) if b > 0 else math.sqrt(a)

    out = {"output_rel_diff": ratio(acc["num"], acc["den"]),
           "delta_rel_diff": ratio(acc["dnum"], acc["dden"]), "per_layer": per_layer}
    if g is not None:
        out["target_rel_err_stacked"] = ratio(acc["ts"], acc["t0"])
        out["target_rel_err_joint"] = ratio(acc["tj"], acc["t0"])
    return out


# ---------------------------------------------------------------------------
# text encodings: caching and token conventions
# ---------------------------------------------------------------------------

def _encoder_identity(encode, encoder_key):
    """(key, owner) for the cache: an explicit key, else the callable (bound methods by owner)."""
    if encoder_key is not None:
        return ("key", encoder_key), None
    owner = getattr(encode, "__self__", None)
    func = getattr(encode, "__func__", None)
    if owner is not None and func is not None:
        return ("bound", id(owner), id(func)), owner
    return ("callable", id(encode)), encode


class EncodingCache:
    """Memoises text encodings per (encoder identity, text), LRU-bounded per encoder.

    Entries are the encoder's own tensors (dtype and device as returned), one
    ``L x D`` hidden state per text: an SD1.x fp32 prompt is ~236 KB, so the
    default bound of 4,096 texts is at most ~1 GB (SDXL: ~2.5 GB); lower
    ``max_texts_per_encoder`` where memory is tight.  Per-text entries let a
    preserve list that changes by one prompt (e.g. "all other artists") reuse
    every other encoding.

    Encoder identity: ``encoder_key`` when given (recommended: e.g. a model
    fingerprint + CLIP-skip setting), else the callable itself (for bound methods
    its owner object + function).  Entries keyed by object identity are dropped
    when that object is garbage-collected, and objects that cannot be
    weak-referenced are not cached unless an ``encoder_key`` is given.
    Also memoises preserve-list Gram matrices (:func:`preserve_gram_from_prompts`).
    """

    def __init__(self, max_texts_per_encoder: int = 4096):
        self.max_texts = int(max_texts_per_encoder)
        self._store: dict = {}
        self._grams: dict = {}
        self._lock = threading.RLock()

    def clear(self) -> None:
        with self._lock:
            self._store.clear()
            self._grams.clear()

    def _bucket(self, key, owner, create=True):
        with self._lock:
            b = self._store.get(key)
            if b is None and create:
                if owner is not None:
                    try:
                        weakref.finalize(owner, self._drop, key)
                    except TypeError:
                        return None                # cannot track lifetime: do not cache
                b = self._store[key] = OrderedDict()
            return b

    def _drop(self, key) -> None:
        with self._lock:
            self._store.pop(key, None)
            for gk in [gk for gk in self._grams if gk[0] == key]:
                self._grams.pop(gk, None)

    def __len__(self) -> int:
        return sum(len(b) for b in self._store.values())


DEFAULT_ENCODING_CACHE = EncodingCache()


def _call_encoder(encode, texts):
    out = encode(list(texts))
    if not isinstance(out, (tuple, list)) or len(out) not in (2, 3):
        raise ValueError("encode(texts) must return (hidden[B, L, D], token_ids[B, L]) "
                         "or (hidden, token_ids, attention_mask)")
    hidden, ids = out[0], out[1]
    mask = out[2] if len(out) == 3 else None
    if hidden.dim() != 3 or ids.dim() != 2 or hidden.shape[:2] != ids.shape \
            or hidden.shape[0] != len(texts):
        raise ValueError(f"encode returned hidden {tuple(hidden.shape)} and token_ids "
                         f"{tuple(ids.shape)} for {len(texts)} texts; expected [B, L, D] and [B, L]")
    if mask is not None and tuple(mask.shape) != tuple(ids.shape):
        raise ValueError("attention_mask must have the shape of token_ids")
    return hidden, ids, mask


def encode_texts(encode: Callable, texts: Sequence[str], *, cache: EncodingCache | None = DEFAULT_ENCODING_CACHE,
                 encoder_key=None, batch_size: int = 64):
    """Encode ``texts`` with ``encode``, reusing cached encodings; returns ``(hidden, ids, mask)``.

    ``mask`` is ``None`` unless the encoder returns one.  Only texts missing from
    the cache are encoded, in batches of ``batch_size``.  Pass ``cache=None`` to
    disable caching.
    """
    texts = [str(t) for t in texts]
    if not texts:
        raise ValueError("no texts to encode")
    key, owner = _encoder_identity(encode, encoder_key)
    bucket = cache._bucket(key, owner) if cache is not None else None
    found: dict = {}
    if bucket is not None:
        with cache._lock:
            for t in texts:
                if t in bucket:
                    bucket.move_to_end(t)
                    found[t] = bucket[t]
    todo = list(OrderedDict.fromkeys(t for t in texts if t not in found))
    for i in range(0, len(todo), max(1, int(batch_size))):
        chunk = todo[i:i + batch_size]
        with torch.no_grad():
            hidden, ids, mask = _call_encoder(encode, chunk)
        for j, t in enumerate(chunk):
            found[t] = (hidden[j].detach().clone(), ids[j].detach().clone(),
                        None if mask is None else mask[j].detach().clone())
        if bucket is not None:
            with cache._lock:
                for t in chunk:
                    bucket[t] = found[t]
                while len(bucket) > cache.max_texts:
                    bucket.popitem(last=False)
    hid = torch.stack([found[t][0] for t in texts])
    ids = torch.stack([found[t][1] for t in texts])
    masks = [found[t][2] for t in texts]
    mask = None if any(m is None for m in masks) else torch.stack(masks)
    return hid, ids, mask


def last_word_index(token_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    eos_token_id: int = CLIP_EOS_TOKEN_ID) -> torch.Tensor:
    """Index of the last word token: ``attention_mask.sum() - 2`` as in both UCE codes.

    Without a mask, the first ``eos_token_id`` after position 0 marks the end
    (works for SD1.x's EoT padding and SD2.x's id-0 padding alike); the index is
    the position before it, i.e. 0 (BOS) for the empty prompt.
    """
    ids = token_ids if token_ids.dim() == 2 else token_ids[None]
    if attention_mask is not None:
        m = attention_mask if attention_mask.dim() == 2 else attention_mask[None]
        k = m.to(torch.long).sum(-1) - 2
    else:
        is_eos = ids == eos_token_id
        is_eos[:, 0] = False
        if not bool(is_eos.any(-1).all()):
            raise ValueError(f"token ids without an end-of-text token ({eos_token_id}); pass "
                             f"attention_mask or the tokenizer's eos_token_id")
        k = is_eos.to(torch.int8).argmax(-1).to(torch.long) - 1
    if bool((k < 0).any()):
        raise ValueError("invalid token layout: last word index < 0")
    return k if token_ids.dim() == 2 else k[0]


def _seq_args(hidden, ids, mask, what):
    if hidden.dim() == 2:
        hidden, ids = hidden[None], ids[None]
        mask = None if mask is None else mask[None]
    if hidden.dim() != 3 or ids.shape != hidden.shape[:2]:
        raise ValueError(f"{what}: hidden must be [B, L, D] (or [L, D]) with token_ids [B, L], got "
                         f"{tuple(hidden.shape)} and {tuple(ids.shape)}")
    _check_finite(hidden, f"{what} hidden states")
    return hidden, ids, mask


def aligned_tail_vectors(erase_hidden, erase_ids, guide_hidden, guide_ids, *, erase_mask=None,
                         guide_mask=None, eos_token_id: int = CLIP_EOS_TOKEN_ID):
    """Old-UCE convention (RECE's start checkpoints): last word + EoT + padding, aligned.

    For each prompt pair, with ``k`` = last-word index of each sequence, the
    concept's rows ``k_e ..`` and the guide's rows ``k_g ..`` are paired position
    by position and right-truncated to equal length ``L - max(k_e, k_g)``
    (for guide ``' '``/``''``: concept's last word -> guide BOS, EoT -> EoT,
    pad -> pad).  A single guide sequence is broadcast over all erase prompts.
    Returns ``(erase_rows, guide_rows)`` concatenated over prompts.
    """
    eh, ei, em = _seq_args(erase_hidden, erase_ids, erase_mask, "erase")
    gh, gi, gm = _seq_args(guide_hidden, guide_ids, guide_mask, "guide")
    if gh.shape[0] == 1 and eh.shape[0] > 1:
        gh, gi = gh.expand(eh.shape[0], -1, -1), gi.expand(eh.shape[0], -1)
        gm = None if gm is None else gm.expand(eh.shape[0], -1)
    if gh.shape[0] != eh.shape[0] or gh.shape[1] != eh.shape[1] or gh.shape[2] != eh.shape[2]:
        raise ValueError(f"erase {tuple(eh.shape)} and guide {tuple(gh.shape)} encodings do not align")
    ke = last_word_index(ei, em, eos_token_id)
    kg = last_word_index(gi, gm, eos_token_id)
    length = eh.shape[1]
    er, gr = [], []
    for b in range(eh.shape[0]):
        a, g = int(ke[b]), int(kg[b])
        n = length - max(a, g)
        er.append(eh[b, a:a + n])
        gr.append(gh[b, g:g + n])
    return torch.cat(er), torch.cat(gr)


def last_token_vectors(hidden, token_ids, attention_mask=None, *,
                       eos_token_id: int = CLIP_EOS_TOKEN_ID) -> torch.Tensor:
    """New-UCE convention: one row per prompt, the last word token (BOS for ``''``)."""
    h, ids, m = _seq_args(hidden, token_ids, attention_mask, "last_token_vectors")
    k = last_word_index(ids, m, eos_token_id)
    return h[torch.arange(h.shape[0]), k]


_CONVENTIONS = {"aligned_tail": "aligned_tail", "old": "aligned_tail", "rece": "aligned_tail",
                "last_token": "last_token", "new": "last_token"}


def _convention(name: str) -> str:
    try:
        return _CONVENTIONS[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown token convention {name!r}; use 'aligned_tail' (old UCE / "
                         f"RECE start) or 'last_token' (new UCE)") from None


def preserve_gram_from_prompts(encode: Callable, prompts: Sequence[str], convention: str = "aligned_tail",
                               *, cache: EncodingCache | None = DEFAULT_ENCODING_CACHE,
                               encoder_key=None, eos_token_id: int = CLIP_EOS_TOKEN_ID,
                               batch_size: int = 64) -> PreserveGram:
    """Preserve set of a prompt list as a :class:`PreserveGram` (memoised in ``cache``).

    ``aligned_tail`` (old UCE, also RECE's preserve set) uses every token row of
    each prompt; ``last_token`` one row per prompt.
    """
    conv = _convention(convention)
    prompts = [str(p) for p in prompts]
    if not prompts:
        raise ValueError("empty preserve list")
    key, owner = _encoder_identity(encode, encoder_key)
    gkey = (key, conv, int(eos_token_id), tuple(prompts))
    if cache is not None and cache._bucket(key, owner) is not None:
        with cache._lock:
            hit = cache._grams.get(gkey)
        if hit is not None:
            return hit
    gram, n_vec = None, 0
    for i in range(0, len(prompts), max(1, int(batch_size))):
        h, ids, m = encode_texts(encode, prompts[i:i + batch_size], cache=cache,
                                 encoder_key=encoder_key, batch_size=batch_size)
        _check_finite(h, "preserve encodings")
        rows = h.reshape(-1, h.shape[-1]) if conv == "aligned_tail" else \
            last_token_vectors(h, ids, m, eos_token_id=eos_token_id)
        rows = rows.to(_F64)
        gram = rows.T @ rows if gram is None else gram.addmm_(rows.T, rows)
        n_vec += rows.shape[0]
    pg = PreserveGram(gram, n_vec, len(prompts))
    if cache is not None and cache._bucket(key, owner, create=False) is not None:
        with cache._lock:
            cache._grams[gkey] = pg
    return pg


def uce_vectors(encode: Callable, erase_prompts: Sequence[str] | str, guide: Sequence[str] | str = " ",
                preserve_prompts: Sequence[str] = (), convention: str = "aligned_tail", *,
                cache: EncodingCache | None = DEFAULT_ENCODING_CACHE, encoder_key=None,
                eos_token_id: int = CLIP_EOS_TOKEN_ID) -> VectorSet:
    """Build a :class:`VectorSet` for :func:`uce_edit` from prompts.

    ``convention``: ``"aligned_tail"`` (old UCE code / RECE start checkpoints:
    last word + EoT + padding aligned onto the guide, all tokens of every
    preserve prompt) or ``"last_token"`` (new UCE code: one vector per prompt).
    ``guide`` is one prompt for all erase prompts or one per erase prompt
    (``' '``/``''`` = towards unconditional, or a named concept such as ``'art'``).
    """
    conv = _convention(convention)
    erase_prompts = [erase_prompts] if isinstance(erase_prompts, str) else list(erase_prompts)
    if not erase_prompts:
        raise ValueError("no erase prompts")
    guides = [guide] * len(erase_prompts) if isinstance(guide, str) else list(guide)
    if len(guides) != len(erase_prompts):
        raise ValueError(f"{len(erase_prompts)} erase prompts but {len(guides)} guide prompts")
    kw = dict(cache=cache, encoder_key=encoder_key)
    eh, ei, em = encode_texts(encode, erase_prompts, **kw)
    gh, gi, gm = encode_texts(encode, guides, **kw)
    if conv == "aligned_tail":
        er, gr = aligned_tail_vectors(eh, ei, gh, gi, erase_mask=em, guide_mask=gm,
                                      eos_token_id=eos_token_id)
    else:
        er = last_token_vectors(eh, ei, em, eos_token_id=eos_token_id)
        gr = last_token_vectors(gh, gi, gm, eos_token_id=eos_token_id)
    pres = None
    preserve_prompts = list(preserve_prompts or [])
    if preserve_prompts:
        pres = preserve_gram_from_prompts(encode, preserve_prompts, conv, eos_token_id=eos_token_id, **kw)
    return VectorSet(er, gr, pres, conv, len(erase_prompts))


def rece_prompt_embeddings(encode: Callable, concept_prompts: Sequence[str] | str, target: str = " ", *,
                           cache: EncodingCache | None = DEFAULT_ENCODING_CACHE, encoder_key=None):
    """``(concept_emb [B, L, D], target_emb [L, D])`` for :func:`rece_edit` (all token positions)."""
    concept_prompts = [concept_prompts] if isinstance(concept_prompts, str) else list(concept_prompts)
    ch, _, _ = encode_texts(encode, concept_prompts, cache=cache, encoder_key=encoder_key)
    th, _, _ = encode_texts(encode, [target], cache=cache, encoder_key=encoder_key)
    return ch, th[0]


# ---------------------------------------------------------------------------
# module collection and benchmark
# ---------------------------------------------------------------------------

def collect_cross_attention_weights(source) -> dict:
    """``{module_name: W}`` of every ``attn2.to_k`` / ``attn2.to_v`` in a module or state dict.

    Accepts a ``torch.nn.Module`` (``named_modules``) or a mapping of state-dict
    keys (a trailing ``.weight`` is stripped).  Tensors are returned as-is
    (not copied); edits never write into them.
    """
    out = {}
    if isinstance(source, torch.nn.Module):
        for name, mod in source.named_modules():
            if "attn2" in name and name.endswith((".to_k", ".to_v")) and hasattr(mod, "weight"):
                out[name] = mod.weight.detach()
    elif isinstance(source, Mapping):
        for key, w in source.items():
            name = key[:-7] if key.endswith(".weight") else key
            if "attn2" in name and name.endswith((".to_k", ".to_v")):
                out[name] = w.detach() if isinstance(w, torch.Tensor) else w
    else:
        raise ValueError("source must be a torch.nn.Module or a state-dict mapping")
    return out


def cross_attention_shapes(arch: str = "sd15") -> dict:
    """``{diffusers module name: (out, ctx_dim)}`` of all attn2 to_k/to_v for the standard configs.

    ``sd15``/``sd14``/``sd1`` (16 blocks, 32 matrices, ctx 768), ``sd2`` (ctx 1024),
    ``sdxl`` (70 transformer blocks, 140 matrices, ctx 2048).
    """
    a = str(arch).lower().replace(".", "").replace("-", "").replace("_", "")
    blocks = []   # (prefix, width, n_transformer_layers)
    if a in ("sd15", "sd14", "sd1", "sd1x", "sd2", "sd21", "sd2x"):
        ctx = 1024 if a.startswith("sd2") else 768
        widths = (320, 640, 1280)
        for i, w in enumerate(widths):
            for j in range(2):
                blocks.append((f"down_blocks.{i}.attentions.{j}", w, 1))
        blocks.append(("mid_block.attentions.0", 1280, 1))
        for i, w in zip((1, 2, 3), (1280, 640, 320)):
            for j in range(3):
                blocks.append((f"up_blocks.{i}.attentions.{j}", w, 1))
    elif a == "sdxl":
        ctx = 2048
        for i, (w, n) in zip((1, 2), ((640, 2), (1280, 10))):
            for j in range(2):
                blocks.append((f"down_blocks.{i}.attentions.{j}", w, n))
        blocks.append(("mid_block.attentions.0", 1280, 10))
        for i, (w, n) in zip((0, 1), ((1280, 10), (640, 2))):
            for j in range(3):
                blocks.append((f"up_blocks.{i}.attentions.{j}", w, n))
    else:
        raise ValueError(f"unknown arch {arch!r}; use 'sd15', 'sd2' or 'sdxl'")
    shapes = {}
    for prefix, w, n in blocks:
        for t in range(n):
            for proj in ("to_k", "to_v"):
                shapes[f"{prefix}.transformer_blocks.{t}.attn2.{proj}"] = (w, ctx)
    return shapes


def random_cross_attention_weights(arch: str = "sd15", *, seed: int = 0,
                                   dtype: torch.dtype = torch.float32) -> dict:
    """Random, realistically scaled attn2 to_k/to_v weights (std ``1/sqrt(ctx_dim)``)."""
    gen = torch.Generator().manual_seed(int(seed))
    return {name: (torch.randn(o, c, generator=gen) / math.sqrt(c)).to(dtype)
            for name, (o, c) in cross_attention_shapes(arch).items()}


def benchmark_speed(arch: str = "sd15", *, n_preserve_prompts: int = 10, epochs: int = 3,
                    tokens: int = 77, seed: int = 0, repeats: int = 1,
                    num_threads: int | None = None) -> dict:
    """Time one-concept UCE and RECE (``epochs``) on random weights shaped like ``arch``.

    Setting: old-UCE convention (1 erase prompt -> ``tokens - 1`` aligned vectors
    onto the ``' '`` guide), ``n_preserve_prompts`` preserve prompts x ``tokens``
    rows (old convention uses every token; a_p by :func:`default_preserve_scale`);
    RECE from that UCE start with ``lam_reg`` 0.1, all ``tokens`` concept rows per
    epoch and a ``' '`` preserve prompt.  Text vectors are random rows with
    CLIP-like per-dimension scale 1.  Returns seconds (best of ``repeats``):
    ``uce`` (vectors -> deltas, including the preserve Gram), ``rece`` (the
    epochs only, from the UCE start, cold Gram cache), ``rece_cached_gram`` (the same
    again with ``sum W^T W`` memoised), ``uce_plus_rece`` and ``preserve_gram``.
    ``loadavg_1min`` is recorded because other processes on the CPUs skew timings.
    """
    prev_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(int(num_threads))
    try:
        weights = random_cross_attention_weights(arch, seed=seed)
        d = next(iter(weights.values())).shape[1]
        gen = torch.Generator().manual_seed(int(seed) + 1)
        concept = torch.randn(tokens, d, generator=gen)          # concept prompt, all tokens
        blank = torch.randn(tokens, d, generator=gen)            # ' ' prompt, all tokens
        preserve_rows = torch.randn(n_preserve_prompts * tokens, d, generator=gen)
        erase, guide = concept[1:], blank[: tokens - 1]          # last word (k=1) .. end -> BOS ..
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # pragma: no cover - platform dependent
            load = None
        res = {"arch": arch, "n_matrices": len(weights), "ctx_dim": d, "loadavg_1min": load,
               "n_erase_vectors": int(erase.shape[0]), "n_preserve_vectors": int(preserve_rows.shape[0]),
               "epochs": epochs, "threads": torch.get_num_threads()}
        best = {"uce": math.inf, "rece": math.inf, "rece_cached_gram": math.inf,
                "preserve_gram": math.inf}
        for _ in range(max(1, int(repeats))):
            clear_gram_cache()
            t0 = time.perf_counter()
            pg = PreserveGram.from_vectors(preserve_rows, n_prompts=n_preserve_prompts)
            t1 = time.perf_counter()
            start = uce_edit(weights, erase, guide, pg)
            t2 = time.perf_counter()
            rece_edit(weights, concept, blank, blank, start=start, epochs=epochs, lam_reg=0.1)
            t3 = time.perf_counter()
            rece_edit(weights, concept, blank, blank, start=start, epochs=epochs, lam_reg=0.1)
            t4 = time.perf_counter()
            best["preserve_gram"] = min(best["preserve_gram"], t1 - t0)
            best["uce"] = min(best["uce"], t2 - t0)
            best["rece"] = min(best["rece"], t3 - t2)
            best["rece_cached_gram"] = min(best["rece_cached_gram"], t4 - t3)
        clear_gram_cache()
        res.update(best)
        res["uce_plus_rece"] = best["uce"] + best["rece"]
        return res
    finally:
        torch.set_num_threads(prev_threads)

"""UCE (Gazi et al.): the closed-form edit of cross-attention key/value weights, the defaults of the
published UCE and RECE code, input validation and the preserve Gram shared by every layer.

The formulas of both methods are written out in :mod:`.closed_form`."""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

import torch


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
        start_factors = getattr(self.start, "factors", None) or {}
        for name, full in self.items():
            acc = torch.zeros(full.shape, dtype=_F64, device=full.device)
            if k and name in start_factors:
                # the start's exact float64 factors: one rounding to the weight's dtype (its dense delta
                # is already rounded to it, adding it would round fp16 / bf16 edits twice)
                up, down = start_factors[name]
                acc += up.to(device=acc.device, dtype=_F64) @ down.to(device=acc.device, dtype=_F64)
            elif self.start is not None and name in self.start:
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
        # more erase vectors than the context width (an edit in context: tens of thousands of rows): the
        # exact factors would be larger than the delta itself, so they become (delta, identity), still exact
        compact = c.shape[0] > c.shape[1]
        eye = torch.eye(c.shape[1], dtype=_F64, device=device) if compact else None
        if method == "lowrank":
            for name in names:
                w = weights[name]
                up = (w.to(_F64) @ diff_t).mul_(a_e)                    # out x n
                full = up @ down
                deltas[name] = full.to(w.dtype)
                factors[name] = (full, eye) if compact else (up, down)
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
                factors[name] = (up @ down, eye) if compact else (up, down)
                off += n_out
    return EditResult(deltas, factors=factors, rank=min(int(e_rows.shape[0]), d),
                      params={"method": "uce", "lam": lam, "erase_scale": a_e,
                              "preserve_scale": a_p, "n_erase_vectors": int(e_rows.shape[0]),
                              "n_preserve_vectors": 0 if pres is None else pres.n_vectors,
                              "n_preserve_prompts": 0 if pres is None else pres.n_prompts})


def uce_edit_vectors(weights: Mapping[str, torch.Tensor], vectors: VectorSet, **kw) -> EditResult:
    """:func:`uce_edit` on a :class:`VectorSet` (one concept or several stacked ones)."""
    return uce_edit(weights, vectors.erase, vectors.guide, vectors.preserve, **kw)

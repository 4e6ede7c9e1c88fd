"""Exact low-rank factors of closed-form edits, and the interference of separately computed edits."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from .solve import _F64, _check_finite, _check_vectors_match, _rows, _validate_weights, sum_deltas

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

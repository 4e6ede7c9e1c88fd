"""RECE (Gong et al., ECCV 2024): the adversarial embedding that regenerates an erased concept, and the
per-epoch edit of the current weights against it (closed form, float64). See :mod:`.solve` for UCE."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Mapping

import torch

from .solve import (_F64, RECE_EDIT_DEFAULTS, RECEResult, _as_preserve, _check_finite, _check_scalar, _rows,
                    _check_vectors_match, _single_ctx_dim, _uce_shared_solve, _validate_weights,
                    rece_defaults)

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
        if blocks0:
            # the start's exact float64 factors are in ucat/dcat: multiply everything out in float64 and
            # round to the weight's dtype once (the start's dense delta is already rounded to it: adding it
            # would round fp16 / bf16 edits twice)
            total = ucat @ dcat
        else:
            # a dense start: only the epochs' blocks are multiplied out
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

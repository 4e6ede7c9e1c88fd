"""The quality bench's metrics (UnlearnCanvas' UA / IRA / CRA adapted to the toy world), prompt-cluster
bootstrap intervals, the Fréchet distance in judge features and gate fire rates."""

from __future__ import annotations

import math

import numpy as np

from .prompts import KINDS, Target, kind_names

GATE_THRESHOLD = 0.5

# -------------------------------------------------------------------------------------- metrics


def cluster_bootstrap(num, den, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05):
    """Ratio ``sum(num) / sum(den)`` over clusters (prompts) and its percentile bootstrap interval.

    Returns ``(point, lo, hi, replicates)``; clusters with ``den == 0`` are dropped; with no cluster
    left everything is NaN. Same seed and cluster count -> the same resampling (joint intervals)."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    keep = den > 0
    num, den = num[keep], den[keep]
    if len(den) == 0:
        nan = float("nan")
        return nan, nan, nan, np.full(n_boot, np.nan)
    point = float(num.sum() / den.sum())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(den), (n_boot, len(den)))
    reps = num[idx].sum(1) / den[idx].sum(1)
    lo, hi = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
    return point, float(lo), float(hi), reps


def crossed_bootstrap(values, prompt_ids, seed_ids, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05):
    """Mean of ``values`` (one per image) and its percentile bootstrap interval resampling prompts **and**
    seeds, independently (a crossed design: every prompt is sampled with the same seeds, so an unlucky seed
    moves every prompt's images at once, which resampling prompts alone does not see). Each replicate weighs
    image (p, s) by how often prompt p and seed s were drawn. Returns ``(point, lo, hi)``."""
    v = np.asarray(values, np.float64)
    pid, sid = np.asarray(prompt_ids), np.asarray(seed_ids)
    if len(v) == 0:
        nan = float("nan")
        return nan, nan, nan
    _, pid = np.unique(pid, return_inverse=True)
    _, sid = np.unique(sid, return_inverse=True)
    n_p, n_s = int(pid.max()) + 1, int(sid.max()) + 1
    rng = np.random.default_rng(seed)
    reps = np.empty(n_boot)
    for b in range(n_boot):
        wp = np.bincount(rng.integers(0, n_p, n_p), minlength=n_p)
        ws = np.bincount(rng.integers(0, n_s, n_s), minlength=n_s)
        w = wp[pid] * ws[sid]
        reps[b] = (w * v).sum() / w.sum() if w.sum() else np.nan
    lo, hi = np.nanquantile(reps, [alpha / 2, 1 - alpha / 2])
    return float(v.mean()), float(lo), float(hi)


def _stat(num, den, n_boot, seed):
    p, lo, hi, reps = cluster_bootstrap(num, den, n_boot, seed)
    return {"value": p, "lo": lo, "hi": hi, "n": int(np.asarray(den).sum())}, reps


def _per_prompt(prompt_ids: np.ndarray, values: np.ndarray, mask: np.ndarray, n_prompts: int):
    """Per-prompt sums of ``values`` over images where ``mask`` (num) and image counts (den)."""
    num = np.bincount(prompt_ids[mask], weights=values[mask].astype(np.float64), minlength=n_prompts)
    den = np.bincount(prompt_ids[mask], minlength=n_prompts).astype(np.float64)
    return num, den


def target_metrics(pred: dict, labels: np.ndarray, prompt_ids: np.ndarray, target: Target,
                   alternative: int | None = None, n_boot: int = 1000, seed: int = 0) -> dict:
    """UA / IRA / CRA / mean, garbage and replacement for one target on one set of judged images.

    ``pred``: judge outputs (``classify``), ``labels``: (n, 3) named (object, style, colour) per image,
    ``prompt_ids``: the prompt (bootstrap cluster) of each image."""
    from ..toyworld.judges import NONE

    labels = np.asarray(labels)
    prompt_ids = np.asarray(prompt_ids)
    n_p = int(prompt_ids.max()) + 1 if len(prompt_ids) else 0
    res = {}
    if target.kind == "watermark":
        p = np.asarray(pred["watermark"])
        is_t = np.ones(len(p), bool)
        ua = (p == 0).astype(float)                       # judged absent (not "none")
        garbage = (p == NONE["watermark"]).astype(float)
        other = KINDS
        cra_v = np.mean([np.asarray(pred[k]) == labels[:, i] for i, k in enumerate(KINDS)], 0)
        ira_mask = np.zeros(len(p), bool)
        ira_v = np.zeros(len(p))
        cra_mask = is_t
        rep_v = None
    else:
        k = KINDS.index(target.kind)
        p = np.asarray(pred[target.kind])
        is_t = labels[:, k] == target.index
        ua = ((p != target.index) & (p != NONE[target.kind])).astype(float)
        garbage = (p == NONE[target.kind]).astype(float)
        ira_v = (p == labels[:, k]).astype(float)
        ira_mask = ~is_t
        other = [kk for kk in KINDS if kk != target.kind]
        cra_v = np.mean([np.asarray(pred[kk]) == labels[:, KINDS.index(kk)] for kk in other], 0)
        cra_mask = ~is_t
        rep_v = (p == alternative).astype(float) if alternative is not None else None
        # the alternative drawn with the prompt's other attributes (All-but-One's "replacement with colour and style")
        kept = np.all([np.asarray(pred[kk]) == labels[:, KINDS.index(kk)] for kk in other], 0)
        rep_full_v = rep_v * kept if rep_v is not None else None
    ua_s, ua_r = _stat(*_per_prompt(prompt_ids, ua, is_t, n_p), n_boot, seed)
    res["ua"] = ua_s
    res["garbage_rate"] = _stat(*_per_prompt(prompt_ids, garbage, is_t, n_p), n_boot, seed)[0]
    ira_s, ira_r = _stat(*_per_prompt(prompt_ids, ira_v, ira_mask, n_p), n_boot, seed + 1)
    cra_s, cra_r = _stat(*_per_prompt(prompt_ids, cra_v, cra_mask, n_p), n_boot, seed + 1)
    res["ira"], res["cra"] = ira_s, cra_s
    parts = [(ua_s, ua_r), (ira_s, ira_r), (cra_s, cra_r)]
    parts = [(s, r) for s, r in parts if not math.isnan(s["value"])]
    if parts:
        reps = np.mean([r for _, r in parts], 0)
        lo, hi = np.quantile(reps, [0.025, 0.975])
        res["mean"] = {"value": float(np.mean([s["value"] for s, _ in parts])), "lo": float(lo), "hi": float(hi),
                       "of": len(parts)}
    if target.kind != "watermark":
        res["retain_on_target"] = _stat(*_per_prompt(prompt_ids, cra_v, is_t, n_p), n_boot, seed)[0]
        res["retain_kinds"] = other
    if rep_v is not None:
        res["replacement_accuracy"] = _stat(*_per_prompt(prompt_ids, rep_v, is_t, n_p), n_boot, seed)[0]
        res["replacement_with_attributes"] = _stat(*_per_prompt(prompt_ids, rep_full_v, is_t, n_p), n_boot, seed)[0]
        res["alternative"] = kind_names(target.kind)[alternative][0]
    res["n_target_images"] = int(is_t.sum())
    res["n_other_images"] = int((~is_t).sum())
    return res


def set_metrics(pred: dict, labels: np.ndarray, prompt_ids: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """Judged accuracy per kind (and all three), garbage (object "none") and watermark rates."""
    from ..toyworld.judges import NONE

    labels = np.asarray(labels)
    prompt_ids = np.asarray(prompt_ids)
    n_p = int(prompt_ids.max()) + 1 if len(prompt_ids) else 0
    allm = np.ones(len(labels), bool)
    out = {}
    hits = []
    for i, k in enumerate(KINDS):
        v = (np.asarray(pred[k]) == labels[:, i]).astype(float)
        hits.append(v)
        out[k] = _stat(*_per_prompt(prompt_ids, v, allm, n_p), n_boot, seed)[0]
    out["all_three"] = _stat(*_per_prompt(prompt_ids, np.prod(hits, 0), allm, n_p), n_boot, seed)[0]
    out["garbage_rate"] = _stat(*_per_prompt(prompt_ids, (np.asarray(pred["object"]) == NONE["object"]).astype(float),
                                             allm, n_p), n_boot, seed)[0]
    out["watermark_rate"] = _stat(*_per_prompt(prompt_ids, (np.asarray(pred["watermark"]) == 1).astype(float),
                                               allm, n_p), n_boot, seed)[0]
    out["n_images"] = int(len(labels))
    out["n_prompts"] = n_p
    return out


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature rows ``a`` and ``b``: the same quantity as
    :func:`conceptgate.toyworld.judges.frechet_distance`, computed exactly through the samples' cross
    Gram matrix when there are fewer samples than feature dimensions (the benchmark's case: 768-d judge
    features, tens of images per set), which avoids two 768 x 768 eigendecompositions.

    ``tr sqrt(S1 S2)`` = nuclear norm of ``A B^T / sqrt((n-1)(m-1))`` for centred rows ``A``, ``B``
    (the non-zero eigenvalues of ``A^T A B^T B`` are those of ``(A B^T)(A B^T)^T``)."""
    from ..toyworld.judges import frechet_distance

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n, m, d = len(a), len(b), a.shape[1]
    if min(n, m) > d:
        return frechet_distance(a, b)
    mu1, mu2 = a.mean(0), b.mean(0)
    A, B = a - mu1, b - mu2
    tr1, tr2 = float((A * A).sum() / (n - 1)), float((B * B).sum() / (m - 1))
    tr_sqrt = float(np.linalg.svd(A @ B.T, compute_uv=False).sum() / math.sqrt((n - 1) * (m - 1)))
    return float(((mu1 - mu2) ** 2).sum() + tr1 + tr2 - 2 * tr_sqrt)


def fire_rates(gates, threshold: float = GATE_THRESHOLD) -> dict:
    """Fire rate (``gate > threshold``), mean gate and its range for one prompt category."""
    g = np.asarray(gates, np.float64)
    if len(g) == 0:
        return {"n": 0, "fire_rate": float("nan"), "mean_gate": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"n": int(len(g)), "fire_rate": float((g > threshold).mean()), "mean_gate": float(g.mean()),
            "min": float(g.min()), "max": float(g.max())}

"""Judges of the toy world: learned classifiers (with an explicit "none" outcome), a hand-crafted
second check (silhouette features + nearest centroid, watermark template matching), their agreement,
and a Fréchet distance in judge features.

All image arguments are float tensors (n, 3, 64, 64) in [0, 1] (or uint8 numpy (n, 64, 64, 3)).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from . import render as R
from .models import JUDGE_HEADS, Judge

NONE = {k: len(v) - 1 for k, v in JUDGE_HEADS.items()}


def _as_tensor(images) -> torch.Tensor:
    if isinstance(images, np.ndarray):
        return R.to_tensor(images)
    return images


# ------------------------------------------------------------------------------- garbage images


def make_garbage(x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    """Unrecognisable images made from a batch of clean renders ``x`` (n,3,64,64 in [0,1]):
    noise, smooth noise, blanks, heavy blur, patch shuffles, blends of two renders, drowned in noise,
    and a render whose object is cut into pieces.  Every judge head must answer "none" on them."""
    n, dev = x.shape[0], x.device

    def rand(*s):
        return torch.rand(*s, generator=gen, device=dev)

    kind = (rand(n) * 8).long()
    out = torch.empty_like(x)
    # 0: white noise
    out[kind == 0] = rand(int((kind == 0).sum()), 3, 64, 64)
    # 1: smooth colour noise
    m = int((kind == 1).sum())
    if m:
        out[kind == 1] = F.interpolate(rand(m, 3, 8, 8), size=64, mode="bilinear", align_corners=False)
    # 2: blank (any flat colour)
    m = int((kind == 2).sum())
    if m:
        out[kind == 2] = rand(m, 3, 1, 1).expand(m, 3, 64, 64)
    # 3: heavy blur (4x4 averages, upsampled)
    m = int((kind == 3).sum())
    if m:
        out[kind == 3] = F.interpolate(F.avg_pool2d(x[kind == 3], 16), size=64, mode="bilinear", align_corners=False)
    # 4: shuffled 8x8 patches
    m = int((kind == 4).sum())
    if m:
        p = x[kind == 4].unfold(2, 8, 8).unfold(3, 8, 8).reshape(m, 3, 64, 8, 8)
        perm = torch.argsort(rand(m, 64), dim=1)
        p = torch.gather(p, 2, perm[:, None, :, None, None].expand_as(p))
        out[kind == 4] = p.reshape(m, 3, 8, 8, 8, 8).permute(0, 1, 2, 4, 3, 5).reshape(m, 3, 64, 64)
    # 5: blend of two different renders
    m = int((kind == 5).sum())
    if m:
        other = x[torch.argsort(rand(n))[:m]]
        out[kind == 5] = 0.5 * x[kind == 5] + 0.5 * other.flip(2)
    # 6: drowned in noise
    m = int((kind == 6).sum())
    if m:
        out[kind == 6] = (x[kind == 6] + 0.6 * torch.randn(m, 3, 64, 64, generator=gen, device=dev)).clamp(0, 1)
    # 7: the object cut into 16x16 tiles that are rotated at random
    m = int((kind == 7).sum())
    if m:
        t = x[kind == 7].unfold(2, 16, 16).unfold(3, 16, 16)  # m,3,4,4,16,16
        k = (rand(1).item() * 3).__int__() + 1
        t = torch.rot90(t, k, dims=(4, 5))
        out[kind == 7] = t.permute(0, 1, 2, 4, 3, 5).reshape(m, 3, 64, 64).flip(3)
    return out


def augment(x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    """Mild photometric noise so judges do not depend on pixel-exact renders: blur, noise, contrast."""
    n, dev = x.shape[0], x.device
    r = torch.rand(n, 3, generator=gen, device=dev)
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
    w = (r[:, 0] * 0.6)[:, None, None, None]
    x = x * (1 - w) + blur * w
    x = x + torch.randn(x.shape, generator=gen, device=dev) * (r[:, 1] * 0.04)[:, None, None, None]
    x = (x - 0.5) * (0.9 + 0.2 * r[:, 2])[:, None, None, None] + 0.5
    return x.clamp(0, 1)


# --------------------------------------------------------------------------------- inference


@torch.no_grad()
def classify(judge: Judge, images, batch: int = 256) -> dict:
    """Predicted class index per head, plus softmax probabilities (keys ``<head>_prob``)."""
    x = _as_tensor(images)
    dev = next(judge.parameters()).device
    judge.eval()
    out: dict = {k: [] for k in JUDGE_HEADS}
    probs: dict = {k: [] for k in JUDGE_HEADS}
    for i in range(0, len(x), batch):
        logits = judge(x[i : i + batch].to(dev, torch.float32))
        for k, v in logits.items():
            p = v.float().softmax(-1).cpu()
            probs[k].append(p)
            out[k].append(p.argmax(-1))
    res = {k: torch.cat(v).numpy() for k, v in out.items()}
    res.update({k + "_prob": torch.cat(v).numpy() for k, v in probs.items()})
    return res


@torch.no_grad()
def judge_features(judge: Judge, images, batch: int = 256) -> np.ndarray:
    """Concatenated penultimate features of all judge towers (for the Fréchet distance)."""
    x = _as_tensor(images)
    dev = next(judge.parameters()).device
    judge.eval()
    feats = []
    for i in range(0, len(x), batch):
        f = judge.features(x[i : i + batch].to(dev, torch.float32))
        feats.append(torch.cat([f[k] for k in JUDGE_HEADS], 1).double().cpu())
    return torch.cat(feats).numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` and ``b`` (rows = samples)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # trace sqrt(s1 s2) via the symmetric form sqrt(s1)^T s2 sqrt(s1)
    w, v = np.linalg.eigh(s1)
    sq1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = sq1 @ s2 @ sq1
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    tr_sqrt = np.sqrt(np.clip(ev, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def accuracy_on_labels(pred: dict, labels: dict) -> dict:
    """Per-head accuracy of judge predictions against renderer labels."""
    wm = np.asarray(labels["wm_loc"]) >= 0
    return {
        "object": float((pred["object"] == labels["object"]).mean()),
        "style": float((pred["style"] == labels["style"]).mean()),
        "colour": float((pred["colour"] == labels["colour"]).mean()),
        "watermark": float((pred["watermark"] == wm.astype(np.int64)).mean()),
    }


# --------------------------------------------------------------------- hand-crafted second check

_WM_BOXES = [(x0, y0, x0 + R.WM_SIZE, y0 + R.WM_SIZE) for x0, y0 in R.WM_LOCATIONS]


def _to_uint8(images) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        return (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    return images


def watermark_scores(images) -> np.ndarray:
    """Template matching: the best normalised cross-correlation of the glyph at the fixed locations
    (searched within +-1 px) with the grey image.  Returns (n,) scores in [-1, 1]."""
    im = _to_uint8(images).astype(np.float32).mean(-1) / 255.0
    g = R.WM_GLYPH - R.WM_GLYPH.mean()
    g /= np.linalg.norm(g)
    best = np.full(len(im), -1.0, np.float32)
    s = R.WM_SIZE
    for x0, y0 in R.WM_LOCATIONS:
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                xa, ya = min(max(x0 + dx, 0), 64 - s), min(max(y0 + dy, 0), 64 - s)
                p = im[:, ya : ya + s, xa : xa + s].reshape(len(im), -1)
                p = p - p.mean(1, keepdims=True)
                nrm = np.linalg.norm(p, axis=1) + 1e-6
                # a dark glyph on a light patch correlates negatively with the glyph mask
                c = -(p @ g.reshape(-1)) / nrm
                best = np.maximum(best, c)
    return best


WM_THRESHOLD = 0.6


def silhouette_mask(images) -> np.ndarray:
    """Foreground mask: pixels far from the background colour (median of the border), with the
    watermark locations blanked out.  (n, 64, 64) bool."""
    im = _to_uint8(images).astype(np.float32) / 255.0
    border = np.concatenate([im[:, 0], im[:, -1], im[:, :, 0], im[:, :, -1]], 1)
    bg = np.median(border, 1)[:, None, None, :]
    d = np.abs(im - bg).max(-1)
    mask = d > 0.12
    for x0, y0, x1, y1 in _WM_BOXES:
        mask[:, max(y0 - 1, 0) : y1 + 1, max(x0 - 1, 0) : x1 + 1] = False
    return mask


def silhouette_features(images) -> np.ndarray:
    """Rotation- and scale-invariant hand-crafted shape features: log Hu moments, fill ratio of the
    bounding circle, number of holes, and the Fourier magnitudes of the radial boundary profile."""
    from scipy import ndimage

    masks = silhouette_mask(images)
    yy, xx = np.mgrid[0:64, 0:64].astype(np.float64)
    feats = []
    for m in masks:
        a = m.sum()
        if a < 20:
            feats.append(np.zeros(7 + 2 + 6))
            continue
        cy, cx = (yy * m).sum() / a, (xx * m).sum() / a
        dy, dx = yy - cy, xx - cx
        mu = {}
        for p in range(4):
            for q in range(4):
                if p + q <= 3:
                    mu[p, q] = (dx**p * dy**q * m).sum()
        eta = {k: v / a ** (1 + (k[0] + k[1]) / 2) for k, v in mu.items()}
        n20, n02, n11 = eta[2, 0], eta[0, 2], eta[1, 1]
        n30, n03, n21, n12 = eta[3, 0], eta[0, 3], eta[2, 1], eta[1, 2]
        hu = [
            n20 + n02,
            (n20 - n02) ** 2 + 4 * n11**2,
            (n30 - 3 * n12) ** 2 + (3 * n21 - n03) ** 2,
            (n30 + n12) ** 2 + (n21 + n03) ** 2,
            (n30 - 3 * n12) * (n30 + n12) * ((n30 + n12) ** 2 - 3 * (n21 + n03) ** 2)
            + (3 * n21 - n03) * (n21 + n03) * (3 * (n30 + n12) ** 2 - (n21 + n03) ** 2),
            (n20 - n02) * ((n30 + n12) ** 2 - (n21 + n03) ** 2) + 4 * n11 * (n30 + n12) * (n21 + n03),
            (3 * n21 - n03) * (n30 + n12) * ((n30 + n12) ** 2 - 3 * (n21 + n03) ** 2)
            - (n30 - 3 * n12) * (n21 + n03) * (3 * (n30 + n12) ** 2 - (n21 + n03) ** 2),
        ]
        hu = [-math.copysign(1, h) * math.log10(abs(h) + 1e-30) for h in hu]
        hu = [max(min(h, 30.0), -30.0) for h in hu]
        r = np.sqrt(dx**2 + dy**2)
        rmax = r[m].max()
        fill_ratio = a / (math.pi * rmax**2 + 1e-6)
        filled = ndimage.binary_fill_holes(m)
        holes = float((filled.sum() - a) / a)
        # radial profile: max radius of the mask in 64 angular bins
        th = np.arctan2(dy[m], dx[m])
        bins = ((th + math.pi) / (2 * math.pi) * 64).astype(int) % 64
        prof = np.zeros(64)
        np.maximum.at(prof, bins, r[m])
        prof = prof / (rmax + 1e-6)
        spec = np.abs(np.fft.rfft(prof))[1:7] / 64
        feats.append(np.array(hu + [fill_ratio, holes] + list(spec)))
    return np.stack(feats)


class HandcraftedChecker:
    """Nearest-centroid object classifier on :func:`silhouette_features`, fitted on renders, plus
    watermark template matching.  Independent of the learned judges."""

    def __init__(self, n_fit: int = 1600, seed: int = 12345):
        imgs, lab = R.render_batch(n_fit, seed, watermark_rate=0.0)
        f = silhouette_features(imgs)
        self.mu = f.mean(0)
        self.sd = f.std(0) + 1e-6
        z = (f - self.mu) / self.sd
        self.centroids = np.stack([z[lab["object"] == k].mean(0) for k in range(len(R.OBJECTS))])

    def objects(self, images) -> np.ndarray:
        z = (silhouette_features(images) - self.mu) / self.sd
        d = ((z[:, None, :] - self.centroids[None]) ** 2).sum(-1)
        return d.argmin(1)

    @staticmethod
    def watermarks(images) -> np.ndarray:
        return (watermark_scores(images) > WM_THRESHOLD).astype(np.int64)


def agreement(judge: Judge, images, checker: HandcraftedChecker | None = None) -> dict:
    """Agreement between the learned judges and the hand-crafted checks on the same images
    (object: over images the learned judge does not call "none")."""
    checker = checker or HandcraftedChecker()
    pred = classify(judge, images)
    obj_h = checker.objects(images)
    wm_h = checker.watermarks(images)
    keep = pred["object"] != NONE["object"]
    keep_w = pred["watermark"] != NONE["watermark"]
    return {
        "object_agreement": float((obj_h[keep] == pred["object"][keep]).mean()) if keep.any() else float("nan"),
        "watermark_agreement": float((wm_h[keep_w] == pred["watermark"][keep_w]).mean()) if keep_w.any() else float("nan"),
        "n": int(len(obj_h)),
    }

"""The toy world's watermark detector for Geom-Erasing training (a Geom-Erasing detector: a callable
``images -> list[Detection]``)."""

from __future__ import annotations

import numpy as np
import torch

from ..adapters.geom.detectors import Detection

class ToyWatermarkDetector:
    """The toy world's watermark detector: existence from the learned watermark judge (the same judge
    the benchmark counts with), location from the hand-crafted check at the renderer's fixed
    watermark places (:data:`~conceptgate.toyworld.render.WM_LOCATIONS`).

    Generated watermarks are blurred dark patches, so the location score is the patch's darkness
    relative to the image border plus the glyph correlation (the template alone, tuned on renders,
    rarely passes its 0.6 threshold on generations). Without a judge (``judge=None``) existence is
    hand-crafted too: darkness > ``min_darkness`` and correlation > ``min_corr``."""

    def __init__(self, judge=None, min_darkness: float = 0.12, min_corr: float = 0.15):
        self.judge = judge
        self.min_darkness = min_darkness
        self.min_corr = min_corr

    def location_scores(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(darkness, correlation), each (n, n_locations)."""
        from . import render as R

        im = images.float().mean(1).cpu().numpy()
        border = np.concatenate([im[:, 0], im[:, -1], im[:, :, 0], im[:, :, -1]], 1)
        bg = np.median(border, 1)
        g = R.WM_GLYPH - R.WM_GLYPH.mean()
        g = (g / np.linalg.norm(g)).reshape(-1)
        s = R.WM_SIZE
        dark = np.zeros((len(im), len(R.WM_LOCATIONS)), np.float32)
        corr = np.zeros_like(dark)
        for j, (x0, y0) in enumerate(R.WM_LOCATIONS):
            p = im[:, y0: y0 + s, x0: x0 + s].reshape(len(im), -1)
            dark[:, j] = bg - p.mean(1)
            pc = p - p.mean(1, keepdims=True)
            corr[:, j] = -(pc @ g) / (np.linalg.norm(pc, axis=1) + 1e-6)  # dark glyph: negative correlation
        return dark, corr

    def __call__(self, images: torch.Tensor) -> list[Detection]:
        from . import render as R

        dark, corr = self.location_scores(images)
        loc_score = corr + 2.0 * dark
        if self.judge is not None:
            from .judges import classify

            pred = classify(self.judge, images)
            exists = pred["watermark"] == 1
            conf = pred["watermark_prob"][:, 1]
        else:
            ok = (dark > self.min_darkness) & (corr > self.min_corr)
            exists = ok.any(1)
            conf = np.clip(loc_score.max(1), 0, 1)
        out = []
        for i in range(len(images)):
            if not exists[i]:
                out.append(Detection())
                continue
            j = int(loc_score[i].argmax())
            x0, y0 = R.WM_LOCATIONS[j]
            out.append(Detection([[x0, y0, x0 + R.WM_SIZE, y0 + R.WM_SIZE]], [float(conf[i])]))
        return out

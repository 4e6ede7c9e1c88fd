"""Geom-Erasing detectors: any callable ``images -> list[Detection]`` labels training images with the
boxes of the implicit concept. :class:`CocoDetector` reads a COCO-style annotation file; the toy
world's watermark detector lives with the toy world (``conceptgate.toyworld.detectors``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import EraserFileError

# ----------------------------------------------------------------------------------- detectors


@dataclass
class Detection:
    """Boxes ``(x0, y0, x1, y1)`` in pixels (exclusive end) and one confidence per box."""

    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    scores: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))

    def __post_init__(self):
        self.boxes = np.asarray(self.boxes, np.float32).reshape(-1, 4)
        self.scores = np.asarray(self.scores, np.float32).reshape(-1)
        if len(self.boxes) != len(self.scores):
            raise ValueError(f"{len(self.boxes)} boxes but {len(self.scores)} scores")

    def __bool__(self):
        return len(self.boxes) > 0

    def keep(self, threshold: float) -> "Detection":
        m = self.scores >= threshold
        return Detection(self.boxes[m], self.scores[m])


Detector = Callable[[torch.Tensor], list]  # images (n,3,H,W) in [0,1] -> list[Detection]


class CocoDetector:
    """Boxes from a COCO-style JSON file (``images`` with ``id``/``file_name``, ``annotations`` with
    ``image_id``/``bbox`` = [x, y, w, h] and optional ``score``/``category_id``, ``categories``).

    Call :meth:`for_files` with image file names (data folders); ``category`` restricts to one
    category name (default: every annotation)."""

    def __init__(self, path, category: str | None = None):
        self.path = str(path)
        try:
            with open(self.path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise EraserFileError(self.path, "annotation file not found") from None
        except json.JSONDecodeError as e:
            raise EraserFileError(self.path, f"not a JSON file: {e}") from None
        if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
            raise EraserFileError(self.path, "not COCO-style: needs 'images' and 'annotations' lists")
        cats = {c.get("id"): c.get("name") for c in data.get("categories", [])}
        if category is not None and category not in cats.values():
            raise EraserFileError(self.path, f"no category named {category!r} (has {sorted(map(str, cats.values()))})")
        names = {}
        for im in data["images"]:
            try:
                names[im["id"]] = os.path.basename(im["file_name"])
            except (KeyError, TypeError):
                raise EraserFileError(self.path, f"image entry without id/file_name: {im!r}") from None
        self.boxes: dict[str, list] = {n: [] for n in names.values()}
        for a in data["annotations"]:
            try:
                x, y, w, h = (float(v) for v in a["bbox"])
                name = names[a["image_id"]]
            except (KeyError, TypeError, ValueError):
                raise EraserFileError(self.path, f"bad annotation {a!r} (needs image_id and bbox [x, y, w, h])") from None
            if category is not None and cats.get(a.get("category_id")) != category:
                continue
            if w <= 0 or h <= 0:
                raise EraserFileError(self.path, f"annotation {a.get('id', '?')}: empty box {a['bbox']}")
            self.boxes[name].append(([x, y, x + w, y + h], float(a.get("score", 1.0))))

    def for_files(self, files: Sequence[str]) -> list[Detection]:
        out = []
        for f in files:
            b = self.boxes.get(os.path.basename(f), [])
            out.append(Detection([x for x, _ in b], [s for _, s in b]) if b else Detection())
        return out

    def __call__(self, images):
        raise TypeError(f"{self.path}: a COCO annotation file labels files of a data folder (--data), not generated images")


def write_coco(path, files: Sequence[str], detections: Sequence[Detection], size: tuple[int, int], category: str) -> None:
    """Write detections as COCO JSON (what :class:`CocoDetector` reads)."""
    images, anns = [], []
    for i, (f, d) in enumerate(zip(files, detections)):
        images.append({"id": i, "file_name": os.path.basename(f), "width": size[0], "height": size[1]})
        for b, s in zip(d.boxes, d.scores):
            anns.append({"id": len(anns), "image_id": i, "category_id": 1, "score": float(s),
                         "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]})
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": [{"id": 1, "name": category}]}, f)

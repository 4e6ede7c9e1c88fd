"""Geom-Erasing (Liu et al., ECCV 2024, "Implicit Concept Removal of Diffusion Models"): the core.

An implicit concept (a watermark, a QR code, text) appears although no prompt asks for it, and the
model does not tie it to its name, so a plain negative prompt barely helps. Geom-Erasing labels
images with a detector, appends the concept name plus one location token ``<l{m,n}>`` for every
grid bin the concept's box covers to the caption, learns those tokens with a spatially re-weighted
diffusion loss (UNet and text encoder frozen: the paper's "model removal" setting), and then uses
the concept + location tokens as the **negative prompt**.

This module holds everything except the training loop (:mod:`.geom_train`):

* detectors: any callable ``images -> list[Detection]`` (:class:`ToyWatermarkDetector` for the toy
  world, :class:`CocoDetector` for a COCO-style annotation file);
* the geometry: :func:`covered_bins` (bins a box covers), :func:`region_weights` (the published
  re-weighting ``T/(K + a(T-K))`` inside, ``a T/(K + a(T-K))`` outside; sums to ``T``);
* text with learned vectors: :class:`VectorOverride` (a temporary forward hook on the text
  encoder's token-embedding table that writes the learned rows at marked positions; the user's
  model is never changed) and :func:`encode_segments`;
* the negative-prompt builder (:func:`plan_negative`): concept + location tokens, token set
  ``all`` / ``observed`` / ``topk``, the 75-token window and what happens when it is exceeded;
* the eraser (``Eraser(kind="conditioning", method="geom", tensors={"concept", "locations"})``),
  its validation, and export / import of standard textual-inversion embedding files that ComfyUI
  (``embedding:name``) and A1111 (``embeddings/``) load natively.

Deviations from the paper (see README, "Geom-Erasing"): the paper's full text was not available;
grid size, ``alpha`` and the inference token set are not published, so they are options with
defaults chosen by measurement in the toy world; the concept-name token is learned (initialised
from the concept word) by default because the toy model never saw the word; the "data removal"
setting also trains tokens only (the paper fine-tunes the UNet jointly there, which would not be a
portable artefact).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from .eraser import Eraser
from .errors import EraserFileError, IncompatibleModelError

METHOD = "geom"
WINDOW = 75  # content tokens per 77-token chunk (BOS + 75 + EOS), the hosts' window
TOKEN_SETS = ("all", "observed", "topk")
OVERFLOW = ("chunk", "drop")
TI_KEY = "emb_params"  # the single tensor of a safetensors TI file (A1111 refuses files with several)
TI_META = "conceptgate_geom"


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
        from ..toyworld import render as R

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
        from ..toyworld import render as R

        dark, corr = self.location_scores(images)
        loc_score = corr + 2.0 * dark
        if self.judge is not None:
            from ..toyworld.judges import classify

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


# ------------------------------------------------------------------------------------ geometry


def covered_bins(box, grid: int, width: int, height: int) -> list[int]:
    """Bins ``m * grid + n`` (row ``m``, column ``n``) that the box ``(x0, y0, x1, y1)`` covers.

    The paper's rule ``A1 = floor(a1 / W_bin) .. A2 = floor(a2 / W_bin)`` with the box's last pixel
    ``x1 - 1`` (exclusive ends) so that a box ending on a bin edge does not spill into the next bin."""
    x0, y0, x1, y1 = (float(v) for v in box)
    wb, hb = width / grid, height / grid
    c0 = min(max(int(math.floor(x0 / wb)), 0), grid - 1)
    c1 = min(max(int(math.floor((max(x1, x0 + 1) - 1) / wb)), 0), grid - 1)
    r0 = min(max(int(math.floor(y0 / hb)), 0), grid - 1)
    r1 = min(max(int(math.floor((max(y1, y0 + 1) - 1) / hb)), 0), grid - 1)
    return [m * grid + n for m in range(r0, r1 + 1) for n in range(c0, c1 + 1)]


def token_name(bin_index: int, grid: int) -> str:
    """The paper's ``<l{m,n}>`` spelling of bin ``m * grid + n``."""
    m, n = divmod(int(bin_index), grid)
    return f"<l{{{m},{n}}}>"


def region_mask(boxes, height: int, width: int, image_size: tuple[int, int]) -> torch.Tensor:
    """[h, w] bool mask of the latent cells the boxes touch (boxes in image pixels)."""
    W, H = image_size
    mask = torch.zeros(height, width, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes:
        c0, c1 = int(math.floor(x0 * width / W)), int(math.ceil(x1 * width / W))
        r0, r1 = int(math.floor(y0 * height / H)), int(math.ceil(y1 * height / H))
        mask[max(r0, 0): min(r1, height), max(c0, 0): min(c1, width)] = True
    return mask


def region_weights(mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """The published spatial re-weighting over the latent grid (same shape as ``mask``):
    ``T / (K + alpha (T - K))`` inside the concept region, ``alpha T / (K + alpha (T - K))`` outside,
    ``T`` positions, ``K`` of them inside; the weights sum to ``T`` (the loss scale is unchanged).
    ``alpha < 1`` up-weights the concept region; ``alpha = 1`` is the plain loss. An empty region
    gives uniform weights 1."""
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    T = mask.numel()
    K = int(mask.sum())
    if K == 0:
        return torch.ones(mask.shape)
    denom = K + alpha * (T - K)
    return torch.where(mask, torch.tensor(T / denom), torch.tensor(alpha * T / denom)).float()


# --------------------------------------------------------------------- text with learned vectors

Segment = "str | torch.Tensor"  # text, or learned vectors [k, D]


def embedding_table(text_encoder) -> torch.nn.Embedding:
    emb = text_encoder.get_input_embeddings()
    if not isinstance(emb, torch.nn.Embedding):
        raise TypeError("the text encoder has no token-embedding table")
    return emb


def text_fingerprint(weight: torch.Tensor) -> str:
    """Fingerprint of a token-embedding table (what learned tokens are tied to): its shape, 256 evenly
    spaced rows and the float64 sum of the whole table, all after rounding to float16, so an fp16 copy
    in ComfyUI gives the same value as the fp32 diffusers weights (the sum catches edits elsewhere)."""
    w = weight.detach()
    rows = torch.linspace(0, w.shape[0] - 1, 256).long()
    h = hashlib.sha256(f"{tuple(w.shape)}".encode())
    w16 = w.to("cpu", torch.float16)
    h.update(w16[rows].numpy().tobytes())
    h.update(f"{float(torch.sum(w16, dtype=torch.float64)):.6e}".encode())
    return h.hexdigest()[:16]


class VectorOverride:
    """Context manager: while active, the token-embedding table's output at positions marked by
    :meth:`set` is replaced by given vectors (autograd flows into them). The table's weights are
    untouched and the hook is removed on exit, so the user's text encoder is never modified."""

    def __init__(self, text_encoder):
        self.table = embedding_table(text_encoder)
        self.mask: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self._handle = None

    def set(self, mask: torch.Tensor | None, values: torch.Tensor | None):
        self.mask, self.values = mask, values

    def _hook(self, module, args, out):
        if self.mask is None or not bool(self.mask.any()):
            return out
        out = out.clone()
        out[self.mask.to(out.device)] = self.values.to(out.device, out.dtype)
        return out

    def __enter__(self):
        self._handle = self.table.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.set(None, None)


def segment_ids(tokenizer, segments: Sequence) -> tuple[list[int], list[torch.Tensor | None]]:
    """Token ids of the content (no BOS/EOS) and, per position, a vector or None (a text token)."""
    ids: list[int] = []
    vecs: list = []
    for s in segments:
        if isinstance(s, torch.Tensor):
            s = s.reshape(-1, s.shape[-1])
            for row in s:
                ids.append(0)  # placeholder id; its embedding is overwritten
                vecs.append(row)
        elif s:
            t = tokenizer(s, add_special_tokens=False).input_ids
            ids += t
            vecs += [None] * len(t)
    return ids, vecs


def chunk_rows(tokenizer, rows: Sequence[Sequence], window: int = WINDOW, max_chunks: int | None = 1):
    """Build [B * chunks, 77] ids and the override mask / values for ``rows`` of segments.

    A row longer than ``window`` content tokens is split every ``window`` tokens into 77-token
    chunks (BOS + up to 75 + EOS + padding), as ComfyUI and A1111 do; ``max_chunks`` (1 for
    diffusers) raises when a row needs more. Returns ``(ids, mask, values, n_chunks)`` with every
    row padded to the same number of chunks (extra chunks are empty prompts)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    parsed = [segment_ids(tokenizer, r) for r in rows]
    n_chunks = max(1, max((math.ceil(len(i) / window) for i, _ in parsed), default=1))
    if max_chunks is not None and n_chunks > max_chunks:
        longest = max(len(i) for i, _ in parsed)
        raise ValueError(f"negative prompt of {longest} tokens exceeds {max_chunks} window(s) of {window} tokens")
    L = window + 2
    ids = torch.full((len(rows) * n_chunks, L), pad, dtype=torch.long)
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    values = []
    for r, (tok, vec) in enumerate(parsed):
        for c in range(n_chunks):
            row = r * n_chunks + c
            part = tok[c * window: (c + 1) * window]
            pv = vec[c * window: (c + 1) * window]
            ids[row, 0] = bos
            ids[row, 1: 1 + len(part)] = torch.tensor(part, dtype=torch.long) if part else ids[row, 1:1]
            ids[row, 1 + len(part)] = eos
            for j, v in enumerate(pv):
                if v is not None:
                    mask[row, 1 + j] = True
                    values.append(v)
    vals = torch.stack(values) if values else None
    return ids, mask, vals, n_chunks


def encode_segments(tokenizer, text_encoder, rows: Sequence[Sequence], window: int = WINDOW,
                    max_chunks: int | None = 1, clip_skip: int | None = None) -> torch.Tensor:
    """Encode rows of segments (text and learned vectors) to [B, 77 * chunks, D] hidden states,
    chunks concatenated along the sequence as ComfyUI/A1111 do for long prompts. Gradients flow
    into the vectors (wrap in ``torch.no_grad()`` for inference)."""
    ids, mask, values, n = chunk_rows(tokenizer, rows, window, max_chunks)
    device = next(text_encoder.parameters()).device
    with VectorOverride(text_encoder) as ov:
        ov.set(mask, values)
        if clip_skip:
            out = text_encoder(ids.to(device), output_hidden_states=True)
            inner = getattr(text_encoder, "text_model", text_encoder)
            hidden = inner.final_layer_norm(out.hidden_states[-(clip_skip + 1)])
        else:
            hidden = text_encoder(ids.to(device))[0]
    B = len(rows)
    return hidden.reshape(B, n * hidden.shape[1], hidden.shape[2])


# -------------------------------------------------------------------------------- the eraser


def make_eraser(concept: str, locations: torch.Tensor, concept_vector: torch.Tensor | None, grid: int,
                bin_counts: Sequence[int], text_fp: str, settings: dict | None = None, name: str | None = None) -> Eraser:
    """A Geom-Erasing conditioning eraser. ``locations`` [grid*grid, D]; ``concept_vector`` [1, D] or
    None (then the concept's own word is used); ``bin_counts`` how often each bin was covered in training."""
    tensors = {"locations": locations.detach().float().cpu().contiguous()}
    if concept_vector is not None:
        tensors["concept"] = concept_vector.detach().float().reshape(1, -1).cpu().contiguous()
    s = {"grid": int(grid), "concept_name": concept, "bin_counts": [int(c) for c in bin_counts],
         "learned_concept": concept_vector is not None, "token_set": "observed", "top_k": 8,
         "overflow": "drop", "dim": int(locations.shape[1])}
    s.update(settings or {})
    return Eraser(name=name or f"geom_{concept}".replace(" ", "_"), kind="conditioning", concepts=[concept],
                  method=METHOD, tensors=tensors, settings=s, text_fingerprint=text_fp)


def validate(eraser: Eraser) -> Eraser:
    """Check a loaded Geom-Erasing eraser (raises :class:`EraserFileError` naming the file)."""
    where = eraser.source or eraser.name
    s = eraser.settings
    loc = eraser.tensors.get("locations")
    if loc is None:
        raise EraserFileError(where, "a geom eraser needs the tensor conceptgate.tensor.locations")
    grid = s.get("grid")
    if not isinstance(grid, int) or grid < 1:
        raise EraserFileError(where, f"settings.grid must be a positive integer, got {grid!r}")
    if loc.dim() != 2 or loc.shape[0] != grid * grid:
        raise EraserFileError(where, f"locations has shape {tuple(loc.shape)}, expected ({grid * grid}, D) for grid {grid}")
    c = eraser.tensors.get("concept")
    if c is not None and (c.dim() != 2 or c.shape[1] != loc.shape[1]):
        raise EraserFileError(where, f"concept vector shape {tuple(c.shape)} does not match locations' width {loc.shape[1]}")
    counts = s.get("bin_counts")
    if counts is not None and len(counts) != grid * grid:
        raise EraserFileError(where, f"settings.bin_counts has {len(counts)} entries, expected {grid * grid}")
    if not s.get("concept_name"):
        raise EraserFileError(where, "settings.concept_name is missing")
    return eraser


def check_text_encoder(eraser: Eraser, weight: torch.Tensor, strict: bool = True) -> None:
    """Refuse an eraser made for another text encoder: width mismatch always, fingerprint mismatch
    when ``strict`` (raises :class:`IncompatibleModelError` naming the file)."""
    where = eraser.source or eraser.name
    dim = eraser.tensors["locations"].shape[1]
    if weight.shape[1] != dim:
        raise IncompatibleModelError(where, f"learned tokens are {dim}-d, this text encoder's embeddings are "
                                            f"{weight.shape[1]}-d (made for another base model)")
    if strict and eraser.text_fingerprint and eraser.text_fingerprint != text_fingerprint(weight):
        raise IncompatibleModelError(where, f"made for another text encoder (fingerprint {eraser.text_fingerprint}, "
                                            f"this one {text_fingerprint(weight)}); retrain the tokens for this model")


# --------------------------------------------------------------------------- negative prompts


def select_bins(eraser: Eraser, token_set: str | None = None, top_k: int | None = None) -> list[int]:
    """Bins whose location tokens go into the negative prompt, most frequently observed first.

    ``all``: every bin; ``observed``: bins covered at least once in training; ``topk``: the
    ``top_k`` most frequently covered bins (ties: lower index first)."""
    s = eraser.settings
    token_set = token_set or s.get("token_set", "observed")
    top_k = int(top_k if top_k is not None else s.get("top_k", 8))
    if token_set not in TOKEN_SETS:
        raise ValueError(f"unknown token set {token_set!r} ({', '.join(TOKEN_SETS)})")
    g = int(s["grid"])
    counts = list(s.get("bin_counts") or [0] * (g * g))
    order = sorted(range(g * g), key=lambda b: (-counts[b], b))
    if token_set == "all":
        return order
    observed = [b for b in order if counts[b] > 0]
    return observed if token_set == "observed" else observed[:top_k]


@dataclass
class NegativePlan:
    """What the builder appends: ``segments`` (text and vectors, the part after the user's negative),
    the bins used and dropped, and token counts. ``host_text`` spells it for a host's text box."""

    segments: list
    bins: list[int]
    dropped: list[int]
    user_tokens: int
    own_tokens: int
    chunks: int
    separator: str = ", "

    def rows(self, user_negative: str = "") -> list:
        return ([user_negative, self.separator] if user_negative else []) + self.segments


def concept_segments(eraser: Eraser) -> list:
    c = eraser.tensors.get("concept")
    return [c] if c is not None else [eraser.settings["concept_name"]]


def plan_negative(eraser: Eraser, tokenizer, user_negative: str = "", token_set: str | None = None,
                  top_k: int | None = None, overflow: str | None = None, window: int = WINDOW,
                  separator: str = ", ") -> NegativePlan:
    """Combine the user's negative prompt with the concept token and location tokens.

    The user's negative comes first, unchanged, then ``separator``, the concept (learned vector,
    or the concept's word), then the selected location tokens, most frequently observed bin first.

    When the whole exceeds the ``window`` (75 tokens per chunk):

    * ``overflow="chunk"`` (the hosts' behaviour): the sequence continues in further 77-token
      chunks whose encodings are concatenated (ComfyUI, A1111). Diffusers pipelines take one
      chunk only: :func:`encode_negative` then raises.
    * ``overflow="drop"``: location tokens of the least observed bins are dropped until the
      negative needs no more chunks than the user's negative plus the concept token alone (so our
      tokens never add a chunk unless the concept token itself does); ``dropped`` lists them.
    """
    overflow = overflow or eraser.settings.get("overflow", "drop")
    if overflow not in OVERFLOW:
        raise ValueError(f"unknown overflow mode {overflow!r} ({', '.join(OVERFLOW)})")
    bins = select_bins(eraser, token_set, top_k)
    loc = eraser.tensors["locations"]
    head = concept_segments(eraser)
    n_user = len(segment_ids(tokenizer, [user_negative, separator] if user_negative else [])[0])
    n_head = len(segment_ids(tokenizer, head)[0])
    dropped: list[int] = []
    if overflow == "drop":
        room = max(1, math.ceil((n_user + n_head) / window)) * window - n_user - n_head
        if len(bins) > room:
            bins, dropped = bins[:max(room, 0)], bins[max(room, 0):]
    segs = head + ([loc[bins]] if bins else [])
    total = n_user + n_head + len(bins)
    return NegativePlan(segs, bins, dropped, n_user, n_head + len(bins), max(1, math.ceil(total / window)), separator)


@torch.no_grad()
def encode_negative(eraser: Eraser, tokenizer, text_encoder, user_negatives: Sequence[str], on: Sequence[bool] | None = None,
                    clip_skip: int | None = None, max_chunks: int | None = 1, **plan_kw) -> torch.Tensor:
    """Negative prompt embeddings [B, 77 * chunks, D] for a batch: row ``i`` is the user's negative
    plus the learned tokens when ``on[i]`` (the gate), the user's negative alone otherwise."""
    check_text_encoder(eraser, embedding_table(text_encoder).weight, strict=plan_kw.pop("strict", True))
    on = [True] * len(user_negatives) if on is None else list(on)
    rows = []
    for neg, o in zip(user_negatives, on):
        rows.append(plan_negative(eraser, tokenizer, neg, **plan_kw).rows(neg) if o else [neg])
    return encode_segments(tokenizer, text_encoder, rows, max_chunks=max_chunks, clip_skip=clip_skip)


# ------------------------------------------------------------------------------ TI export / import


def ti_vectors(eraser: Eraser, bins: Sequence[int] | None = None, with_concept: bool = True) -> torch.Tensor:
    """The vectors of one multi-vector textual-inversion embedding: [concept,] locations of ``bins``."""
    loc = eraser.tensors["locations"]
    bins = select_bins(eraser) if bins is None else list(bins)
    parts = []
    if with_concept and "concept" in eraser.tensors:
        parts.append(eraser.tensors["concept"])
    parts.append(loc[list(bins)])
    return torch.cat(parts, 0)


def ti_metadata(eraser: Eraser, bins: Sequence[int], with_concept: bool, extra: dict | None = None) -> dict:
    s = eraser.settings
    meta = {"concept": s["concept_name"], "grid": int(s["grid"]), "bins": [int(b) for b in bins],
            "tokens": [token_name(b, int(s["grid"])) for b in bins], "with_concept_vector": bool(with_concept and "concept" in eraser.tensors),
            "learned_concept": bool(s.get("learned_concept")), "text_fingerprint": eraser.text_fingerprint,
            "dim": int(eraser.tensors["locations"].shape[1]), "method": METHOD}
    meta.update(extra or {})
    return meta


def prompt_text(eraser: Eraser, embedding_name: str, host: str = "comfyui") -> str:
    """What to type in the host's negative prompt for an exported combined embedding."""
    ref = f"embedding:{embedding_name}" if host == "comfyui" else embedding_name
    if "concept" in eraser.tensors:
        return ref
    return f"{eraser.settings['concept_name']} {ref}"


def export_ti(eraser: Eraser, folder, name: str | None = None, token_set: str | None = None, top_k: int | None = None,
              per_token: bool = False) -> list[str]:
    """Write standard textual-inversion files into ``folder`` (ComfyUI ``models/embeddings``, A1111
    ``embeddings/``): ``<name>.safetensors`` holding [concept,] location tokens of the selected bins as
    one multi-vector embedding (a single tensor ``emb_params`` [n, D], the layout both hosts read), and
    with ``per_token`` one file per bin ``<name>_l<m>_<n>.safetensors`` (plus ``<name>_concept``).
    ConceptGate's metadata (concept, grid, bins, text fingerprint) is in the safetensors header under
    ``conceptgate_geom``. Returns the written paths."""
    from safetensors.torch import save_file

    validate(eraser)
    os.makedirs(folder, exist_ok=True)
    name = name or eraser.name
    bins = select_bins(eraser, token_set, top_k)
    written = []

    def write(fname, vec, b, with_concept):
        path = os.path.join(str(folder), fname + ".safetensors")
        meta = {TI_META: json.dumps(ti_metadata(eraser, b, with_concept, {"name": fname}))}
        save_file({TI_KEY: vec.float().contiguous()}, path, metadata=meta)
        written.append(path)

    write(name, ti_vectors(eraser, bins), bins, True)
    if per_token:
        g = int(eraser.settings["grid"])
        for b in range(g * g):
            m, n = divmod(b, g)
            write(f"{name}_l{m}_{n}", eraser.tensors["locations"][b: b + 1], [b], False)
        if "concept" in eraser.tensors:
            write(f"{name}_concept", eraser.tensors["concept"], [], True)
    return written


def load_ti(path, expect_dim: int | None = None, expect_fingerprint: str | None = None) -> tuple[torch.Tensor, dict]:
    """Read a textual-inversion file (ours or a standard one): vectors [n, D] and our metadata ({} if
    none). Refuses (naming the file) a width other than ``expect_dim`` and, for our files, a text
    fingerprint other than ``expect_fingerprint``. Pickled ``.pt`` files are refused."""
    from .files import read_safetensors

    path = str(path)
    if not path.lower().endswith(".safetensors"):
        raise EraserFileError(path, "only .safetensors embeddings are read (a .pt/.bin is a pickle)")
    tensors, meta = read_safetensors(path)
    if "string_to_param.*" in tensors:
        vec = tensors["string_to_param.*"]
    elif len(tensors) == 1:
        vec = next(iter(tensors.values()))
    elif "clip_l" in tensors:
        vec = tensors["clip_l"]
    else:
        raise EraserFileError(path, f"not a single-vector-set embedding: keys {sorted(tensors)[:4]}")
    vec = vec.reshape(-1, vec.shape[-1]).float()
    if not torch.isfinite(vec).all():
        raise EraserFileError(path, "the embedding holds NaN or infinite values")
    info = {}
    if TI_META in meta:
        try:
            info = json.loads(meta[TI_META])
        except json.JSONDecodeError:
            raise EraserFileError(path, f"unreadable {TI_META} metadata") from None
    if expect_dim is not None and vec.shape[1] != expect_dim:
        raise IncompatibleModelError(path, f"embedding vectors are {vec.shape[1]}-d, this text encoder's are {expect_dim}-d "
                                           "(made for another base model)")
    fp = info.get("text_fingerprint")
    if expect_fingerprint is not None and fp and fp != expect_fingerprint:
        raise IncompatibleModelError(path, f"made for another text encoder (fingerprint {fp}, this one {expect_fingerprint})")
    return vec, info


def eraser_from_ti(path, expect_dim: int | None = None, expect_fingerprint: str | None = None) -> Eraser:
    """A geom eraser from one of our combined TI files (its bins and concept vector from the metadata)."""
    vec, info = load_ti(path, expect_dim, expect_fingerprint)
    if not info:
        raise EraserFileError(str(path), f"a plain textual-inversion file without {TI_META} metadata: "
                                         "use it as embedding:NAME in the host's prompt instead")
    grid, bins = int(info["grid"]), list(info["bins"])
    has_c = bool(info.get("with_concept_vector"))
    if vec.shape[0] != len(bins) + int(has_c):
        raise EraserFileError(str(path), f"{vec.shape[0]} vectors but metadata names {len(bins)} bins"
                                         f"{' + a concept vector' if has_c else ''}")
    loc = torch.zeros(grid * grid, vec.shape[1])
    loc[bins] = vec[int(has_c):]
    counts = [0] * (grid * grid)
    for r, b in enumerate(bins):  # keep the file's order as the frequency order
        counts[b] = len(bins) - r
    e = make_eraser(info["concept"], loc, vec[:1] if has_c else None, grid, counts, info.get("text_fingerprint"),
                    name=info.get("name") or os.path.splitext(os.path.basename(str(path)))[0])
    e.source = str(path)
    return e


# ------------------------------------------------------------------------------ quality bench


def bench_handler(pipe, entries, prompts, gates) -> dict:
    """:func:`conceptgate.bench.quality.register_conditioning` handler: per-row negative prompt
    embeddings, the learned tokens appended where the entry's coefficient (gate x strength) is >= 0.5
    (a conditioning change is on or off per row), the plain empty negative elsewhere. One geom eraser
    per stack in this path (a second one would replace the first one's embeddings)."""
    e = validate(entries[0].eraser)
    on = (torch.as_tensor(gates).reshape(len(prompts), -1)[:, 0] >= 0.5).tolist()
    neg = encode_negative(e, pipe.tokenizer, pipe.text_encoder, [""] * len(prompts), on=on)
    return {"negative_prompt_embeds": neg.to(pipe.unet.dtype)}


def register_bench() -> None:
    from ..bench.quality import register_conditioning

    register_conditioning(METHOD, bench_handler)

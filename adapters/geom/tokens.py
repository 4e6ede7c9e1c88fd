"""Geom-Erasing's tokens: the location grid and its published re-weighting, text encoding with learned
vectors written into the token-embedding table, and the eraser that holds the concept and location
vectors (see the package docstring for the method)."""

from __future__ import annotations

import hashlib
import math
from typing import Sequence

import torch

from ..eraser import Eraser
from ..errors import EraserFileError, IncompatibleModelError

METHOD = "geom"
WINDOW = 75  # content tokens per 77-token chunk (BOS + 75 + EOS), the hosts' window
TOKEN_SETS = ("all", "observed", "topk")
OVERFLOW = ("chunk", "drop")
TI_KEY = "emb_params"  # the single tensor of a safetensors TI file (A1111 refuses files with several)
TI_META = "conceptgate_geom"


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
    # the fingerprint hashes the table rounded to float16; a table stored in a coarser type (bf16) has lost
    # those bits and can never match, so for it only the width is checked
    coarse = weight.is_floating_point() and torch.finfo(weight.dtype).eps > torch.finfo(torch.float16).eps
    if strict and not coarse and eraser.text_fingerprint and eraser.text_fingerprint != text_fingerprint(weight):
        raise IncompatibleModelError(where, f"made for another text encoder (fingerprint {eraser.text_fingerprint}, "
                                            f"this one {text_fingerprint(weight)}); retrain the tokens for this model")

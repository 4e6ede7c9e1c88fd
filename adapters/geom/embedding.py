"""Geom-Erasing tokens as standard textual-inversion embedding files, which ComfyUI (``embedding:NAME``)
and the webuis (``embeddings/``) load natively, and the way back to an eraser."""

from __future__ import annotations

import json
import os
from typing import Sequence

import torch

from ..eraser import Eraser
from ..errors import EraserFileError, IncompatibleModelError
from .negative import select_bins
from .tokens import METHOD, TI_KEY, TI_META, make_eraser, token_name, validate

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
    from ..files import read_safetensors

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

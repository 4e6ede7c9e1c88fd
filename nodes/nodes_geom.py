"""Geom-Erasing in ComfyUI: add the learned concept + location tokens to a negative CONDITIONING.

Graph shape::

    CLIP Text Encode (your negative) --> Geom-Erasing Negative --> KSampler (negative)
    CLIP -----------------------------------^        ^-- a geom eraser (models/conceptgate) or
                                                         an exported embedding (models/embeddings)

The tokens are encoded as their own 77-token chunk and concatenated after the user's negative along
the token axis (ComfyUI's ``ConditioningConcat`` semantics, the same thing ComfyUI does with a prompt
longer than 75 tokens). No extra UNet evaluations: only the negative conditioning changes.
The exported embedding also works without this node: ``embedding:NAME`` in a stock CLIP Text Encode.
"""

from __future__ import annotations

import os

import folder_paths
import torch
from comfy_api.latest import io

from ..adapters import geom as G
from ..adapters.errors import EraserFileError
from .nodes_conceptgate import cached_load, eraser_files, resolve_eraser_path
from .v3 import CATEGORY, Eraser, Stack, check_choices

NONE = "none"


def source_files() -> list[str]:
    """Geom erasers from models/conceptgate and every .safetensors embedding (``embeddings/NAME``)."""
    emb = [f"embeddings/{f}" for f in folder_paths.get_filename_list("embeddings") if f.endswith(".safetensors")]
    return [NONE] + [f for f in eraser_files() if "geom" in os.path.basename(f).lower()] + emb


def load_source(name: str):
    if name.startswith("embeddings/"):
        return G.eraser_from_ti(folder_paths.get_full_path_or_raise("embeddings", name[len("embeddings/"):]))
    return G.validate(cached_load(resolve_eraser_path(name), None))


def comfy_tokens(clip, eraser, token_set=None, top_k=None, overflow=None) -> tuple[dict, G.NegativePlan]:
    """ComfyUI token lists for the eraser's negative part: [BOS, concept (vector or word tokens),
    location vectors, EOS, padding] in 77-token chunks; vectors are ``(tensor_row, 1.0)`` items,
    exactly what ComfyUI's tokenizer makes of ``embedding:NAME``."""
    empty = clip.tokenize("")
    key = next(iter(empty))
    ref = empty[key][0]
    bos, eos, pad = ref[0][0], ref[1][0], ref[-1][0]
    length = len(ref)
    window = length - 2
    tok = clip.tokenizer
    inner = getattr(tok, f"clip_{key}", None) or next(v for k, v in vars(tok).items() if k.startswith("clip_"))
    plan = G.plan_negative(eraser, inner.tokenizer, "", token_set=token_set, top_k=top_k, overflow=overflow, window=window)
    items = []
    for s in plan.segments:
        if isinstance(s, torch.Tensor):
            items += [(row, 1.0) for row in s.reshape(-1, s.shape[-1]).float()]
        else:
            items += [(t, 1.0) for t in inner.tokenizer(s, add_special_tokens=False)["input_ids"]]
    chunks = []
    for i in range(0, max(len(items), 1), window):
        part = items[i: i + window]
        chunk = [(bos, 1.0)] + part + [(eos, 1.0)]
        chunks.append(chunk + [(pad, 1.0)] * (length - len(chunk)))
    return {key: chunks}, plan


def encode_tokens(clip, eraser, token_set=None, top_k=None, overflow=None):
    G.require_prompt_negation(eraser, "ComfyUI's Geom node")
    G.check_text_encoder(eraser, _table(clip))
    tokens, plan = comfy_tokens(clip, eraser, token_set, top_k, overflow)
    return clip.encode_from_tokens_scheduled(tokens), plan


def _table(clip) -> torch.Tensor:
    for name, mod in clip.cond_stage_model.named_modules():
        if isinstance(mod, torch.nn.Embedding) and name.endswith("token_embedding"):
            return mod.weight
    raise ValueError("this CLIP has no token-embedding table")


def concat(negative, ours):
    """``ConditioningConcat``: our first conditioning appended to every entry of ``negative``."""
    add = ours[0][0]
    out = []
    for c, opts in negative:
        out.append([torch.cat((c, add.to(c.device, c.dtype).expand(c.shape[0], -1, -1)), 1), opts.copy()])
    return out


class GeomNegative(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptGateGeomNegative",
            display_name="Geom-Erasing Negative (ConceptGate)",
            category=CATEGORY,
            description=("Geom-Erasing (Liu et al., ECCV 2024): appends the learned concept token and location tokens "
                         "to your negative conditioning, so implicit concepts such as watermarks are steered away from. "
                         "Needs the CLIP the tokens were trained for (checked)."),
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP of the model the tokens were trained on."),
                io.Combo.Input("source", options=source_files(), tooltip="A Geom-Erasing eraser "
                               "(models/conceptgate) or an embedding exported by ConceptGate (models/embeddings). "
                               "Ignored when an eraser is connected."),
                io.Combo.Input("token_set", options=list(G.TOKEN_SETS), default="observed", tooltip="Location "
                               "tokens: all bins, the bins where the concept was observed in training, or the top-k "
                               "most frequent of those."),
                io.Int.Input("top_k", default=8, min=0, max=1024, tooltip="Number of bins for token_set = topk."),
                io.Combo.Input("overflow", options=list(G.OVERFLOW), default="drop", tooltip="drop: keep the tokens "
                               "in one 75-token chunk, dropping the least observed bins; chunk: continue in further "
                               "chunks."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Your own negative prompt; kept, the tokens are appended after it."),
                Eraser.Input("eraser", optional=True, tooltip="A loaded geom eraser (Load Eraser); overrides source."),
                Stack.Input("stack", optional=True, tooltip="An eraser stack: its enabled geom erasers are appended in "
                            "order (gates are not evaluated here: one graph is one prompt, so bypass the node to "
                            "switch it off)."),
            ],
            outputs=[
                io.Conditioning.Output("negative_out", display_name="negative", tooltip="Your negative with the "
                                       "learned tokens appended (or the tokens alone if no negative is connected)."),
                io.String.Output("info", display_name="info", tooltip="Which tokens were used, and any that were dropped."),
            ],
        )

    @classmethod
    def validate_inputs(cls, source=None, token_set=None, overflow=None) -> bool | str:
        return check_choices(cls, source=source, token_set=token_set, overflow=overflow)

    @classmethod
    def execute(cls, clip, source, token_set, top_k, overflow, negative=None, eraser=None, stack=None) -> io.NodeOutput:
        erasers = []
        if eraser is not None:
            erasers.append(eraser)
        if stack is not None:
            erasers += [e.eraser for e in stack.entries if e.enabled and e.eraser.method == G.METHOD]
        if not erasers and source != NONE:
            erasers.append(load_source(source))
        if not erasers:
            raise EraserFileError(source, "no Geom-Erasing tokens: pick a source file or connect an eraser")
        info = []
        out = negative
        for e in erasers:
            if e.kind != "conditioning" or e.method != G.METHOD:
                raise EraserFileError(e.source or e.name, f"not a Geom-Erasing eraser ({e.method}, {e.kind})")
            if out is not None and _already(out, e):  # e.g. Apply Eraser Stack appended it already
                info.append(f"{e.name}: already in this negative, not appended twice")
                continue
            out, line = append_tokens(clip, out, e, token_set, top_k, overflow)
            info.append(line)
        return io.NodeOutput(out, "\n".join(info))


def _already(negative, eraser) -> bool:
    from .nodes_conceptgate import GEOM_KEY

    return bool(eraser.sha256) and all(eraser.sha256 in opts.get(GEOM_KEY, ()) for _, opts in negative)


def append_tokens(clip, negative, eraser, token_set="observed", top_k=8, overflow="drop"):
    """``negative`` (or nothing) with ``eraser``'s tokens appended, and a line saying which; the appended
    eraser is recorded on the conditioning so no node appends it twice."""
    from .nodes_conceptgate import GEOM_KEY

    G.validate(eraser)
    cond, plan = encode_tokens(clip, eraser, token_set, top_k, overflow)
    out = cond if negative is None else concat(negative, cond)
    for _, opts in out:
        opts[GEOM_KEY] = tuple(opts.get(GEOM_KEY, ())) + ((eraser.sha256,) if eraser.sha256 else ())
    grid = int(eraser.settings["grid"])
    line = (f"{eraser.name}: {'learned concept token' if 'concept' in eraser.tensors else repr(eraser.settings['concept_name'])} + "
            f"{len(plan.bins)} location token(s) {' '.join(G.token_name(b, grid) for b in plan.bins[:8])}"
            f"{' ...' if len(plan.bins) > 8 else ''}"
            + (f"; dropped {len(plan.dropped)} (75-token window)" if plan.dropped else ""))
    return out, line


NODES = [GeomNegative]

"""Geom-Erasing in the webuis: the learned concept + location tokens appended to each image's negative
(unconditional) conditioning, gated per prompt, on the conditioning the webui built.

What the webui does with a negative prompt longer than 75 tokens is what happens here: the tokens are
laid out by the core builder (:func:`~conceptgate.adapters.geom.plan_negative`, the same window policy as
ComfyUI's node: concept token first, then the location tokens of the most often observed bins, the least
observed dropped when they would need another 75-token window, ``overflow="chunk"`` continues in further
windows), in 77-token chunks ``[start, up to 75 tokens, end, padding]``
(:func:`~conceptgate.adapters.geom.chunk_rows`), and encoded by the webui's own text encoder
(``encode_with_transformers``: A1111's ``cond_stage_model``, Forge's ``text_processing_engine``), so CLIP
skip is the webui's. The learned vectors are written at their positions by a forward hook on the encoder's
token-embedding table, the way the webui's own textual inversion writes embedding vectors; nothing of the
model is changed and the hook is removed afterwards. The encoded chunks are concatenated after the user's
negative along the token axis (what the webui does with a second 75-token chunk, and what ComfyUI's
``ConditioningConcat`` does).

Per image: the tokens are appended where the entry's coefficient (strength x gate) is >= 0.5 (a conditioning
change is on or off; the core's diffusers handler uses the same threshold). Rows of a batch may then differ in
length; every row is repeated along the token axis to the least common multiple of the lengths, which leaves
cross-attention unchanged (a context repeated ``n`` times gives the same attention output; ComfyUI and Forge
concatenate conditionings of different lengths the same way). When no image fires, the conditioning is not
touched (bit-identical).

Encoding happens before sampling (A1111: ``process_batch``; Forge: ``process_before_every_sampling``, while
the text encoder is loaded); the tokens are appended at every step in ``on_cfg_denoiser``, which A1111 and
Forge both fire before the UNet with a writable ``text_uncond``.

Erasers saved with ``settings["negation"] = "regional"`` (ConceptGate's rule,
:mod:`conceptgate.adapters.geom.regional`) leave the negative alone. Per firing image ``i`` they become a
term of All-but-One's extra-row machinery (:mod:`.abo`, which joins its rows to the webui's CFG batch)::

    d_hat_i = d_cfg_i - k (w - 1) M [d(x_i, n_i + tokens) - d(x_i, n_i)]

with ``n_i`` the image's negative conditioning as the UNet sees it this step (after any prompt-mode tokens),
``d`` the webui's x0 predictions (linear in epsilon at fixed ``x``, ``sigma``: the core's epsilon rule
exactly), ``M`` the cells of the location bins the tokens carry and ``w`` the CFG scale. Where the webui
skips the unconditional branch (CFG 1, NGMS) the term does nothing, as the paper's negative would not.
Cost: two extra rows per firing image (A1111: the webui may skip its own unconditional row, so it is not
reused; Forge: two chunks of ``B`` rows).
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import torch
from torch import nn

from ..adapters import geom as G
from ..adapters.abo.guidance import NEGATIVE_ROW, Term
from ..adapters.errors import IncompatibleModelError
from ..adapters.stack import EraserStack

ON = 0.5  # coefficient from which an image gets the tokens
REGIONAL_KEY = NEGATIVE_ROW + "geom-regional:{name}:{image}"  # private keys of the per-step texts (negatives)
NEGATIVE_KEY = NEGATIVE_ROW + "negative:{image}"


def geom_entries(stack: EraserStack) -> list[tuple[int, object]]:
    return [(i, e) for i, e in enumerate(stack.entries)
            if e.enabled and e.eraser.kind == "conditioning" and e.eraser.method == G.METHOD]


class _Tokenizer:
    """The host tokenizer behind the small interface the core builder uses (``tok(text).input_ids`` without
    start/end tokens, and the special ids)."""

    def __init__(self, tokenize, start: int, end: int, pad: int):
        self._tokenize = tokenize
        self.bos_token_id, self.eos_token_id, self.pad_token_id = start, end, pad

    def __call__(self, text, add_special_tokens=False):
        return SimpleNamespace(input_ids=list(self._tokenize([text])[0]))


def _text_engine(sd_model):
    """The webui object that encodes prompts for an SD1.x/2.x model (A1111 and old Forge:
    ``cond_stage_model``; Forge HEAD: ``text_processing_engine``). SDXL's two encoders are refused."""
    if getattr(sd_model, "is_sdxl", False) or hasattr(sd_model, "text_processing_engine_g") \
            or hasattr(sd_model, "conditioner"):
        raise IncompatibleModelError("Geom-Erasing", "this model has two text encoders (SDXL); Geom-Erasing tokens are "
                                                    "trained for one CLIP text encoder (SD1.x/2.x) and are not applied here")
    for owner in ("text_processing_engine", "cond_stage_model"):
        engine = getattr(sd_model, owner, None)
        if engine is not None and callable(getattr(engine, "encode_with_transformers", None)) \
                and callable(getattr(engine, "tokenize", None)):
            return engine
    raise IncompatibleModelError("Geom-Erasing", "the webui's text encoder was not found (no encode_with_transformers)")


def _token_table(engine) -> nn.Embedding:
    """The innermost token-embedding table (the webui wraps it for textual inversion)."""
    roots = [getattr(engine, a, None) for a in ("text_encoder", "wrapped", "transformer")] + [engine]
    for root in roots:
        if not isinstance(root, nn.Module):
            continue
        found = [(n, m) for n, m in root.named_modules() if isinstance(m, nn.Embedding) and "token_embedding" in n]
        if found:
            return max(found, key=lambda nm: nm[0].count("."))[1]
    raise IncompatibleModelError("Geom-Erasing", "the text encoder's token-embedding table was not found")


class GeomTokens:
    """One generation's Geom-Erasing tokens: encoded once with the webui's text encoder, appended per image
    to the unconditional conditioning at every step."""

    def __init__(self, stack: EraserStack, sd_model):
        self.stack = stack
        self.entries = geom_entries(stack)
        self.encoded: dict[int, torch.Tensor] = {}  # column -> [77 * k, D]
        self.plans: dict[int, G.NegativePlan] = {}
        self.applied: list[list[int]] = []  # per image of the last step: the columns appended (or regional)
        self.regional: set[int] = set()  # columns set to regional negation (not appended to the negative)
        if self.entries:
            self._encode(sd_model)

    def __bool__(self):
        return bool(self.entries)

    @torch.no_grad()
    def _encode(self, sd_model):
        engine = _text_engine(sd_model)
        table = _token_table(engine)
        specials = [getattr(engine, a, None) for a in ("id_start", "id_end", "id_pad")]
        if not all(isinstance(s, int) for s in specials[:2]):
            raise IncompatibleModelError("Geom-Erasing", "the webui's text encoder does not name its start/end tokens")
        start, end = specials[0], specials[1]
        pad = specials[2] if isinstance(specials[2], int) else end
        tok = _Tokenizer(engine.tokenize, start, end, pad)
        device = _device(table)
        for col, entry in self.entries:
            e = G.validate(entry.eraser)
            if G.negation_of(e) == "regional":
                self.regional.add(col)
            G.check_text_encoder(e, table.weight)  # width always; the fingerprint when the file has one
            plan = G.plan_negative(e, tok, "", window=G.WINDOW)
            ids, mask, values, _ = G.chunk_rows(tok, [plan.segments], window=G.WINDOW, max_chunks=None)
            holder = SimpleNamespace(get_input_embeddings=lambda: table)
            _clear_fixes(engine)
            with G.VectorOverride(holder) as ov:
                ov.set(mask, values)
                z = engine.encode_with_transformers(ids.to(device))
            z = z.detach().float().cpu()
            self.encoded[col] = z.reshape(-1, z.shape[-1])  # chunks one after the other along the tokens
            self.plans[col] = plan

    # ------------------------------------------------------------- per step
    def firing(self, per_image: torch.Tensor) -> list[list[int]]:
        """Per image, the geom columns whose coefficient is >= 0.5, in stack order."""
        return [[col for col, _ in self.entries if float(per_image[i, col]) >= ON] for i in range(per_image.shape[0])]

    @property
    def regional_names(self) -> set[str]:
        """The names of the entries set to regional negation (their terms need the unconditional branch)."""
        return {e.eraser.name for col, e in self.entries if col in self.regional}

    def regional_terms(self, per_image: torch.Tensor) -> list[list[Term]]:
        """Per image, one term per firing regional entry, erase = the image's negative + tokens, alternative =
        its negative, under the private keys :meth:`regional_texts` fills each step. ``gamma`` is the strength
        ``k``; the step's CFG scale turns it into ``k (w - 1) / w`` (:func:`.abo.at_cfg_scale`)."""
        out: list[list[Term]] = [[] for _ in range(per_image.shape[0])]
        if not self.regional:
            return out
        names = dict((c, e.eraser) for c, e in self.entries)
        for i, cols in enumerate(self.firing(per_image)):
            for col in cols:
                if col in self.regional:
                    e = names[col]
                    out[i].append(Term(G.regional_strength(e), REGIONAL_KEY.format(name=e.name, image=i),
                                       NEGATIVE_KEY.format(image=i), e.name,
                                       words=(e.settings.get("concept_name", "geom"), "regional"),
                                       region=(int(e.settings["grid"]), tuple(self.plans[col].bins))))
        return out

    def regional_texts(self, uncond, terms: list[list[Term]]) -> dict[str, torch.Tensor]:
        """The ``[L, D]`` conditionings behind the private keys of ``terms``, from this step's negative
        (``text_uncond``: tensor or SDXL dict; None when the webui has none this pass)."""
        if uncond is None or not any(terms):
            return {}
        ctx = uncond["crossattn"] if isinstance(uncond, dict) else uncond
        if ctx.shape[0] != len(terms):
            raise ValueError(f"Geom-Erasing: the negative conditioning has {ctx.shape[0]} rows for {len(terms)} images")
        cols = {e.eraser.name: c for c, e in self.entries}
        out = {}
        for i, row in enumerate(terms):
            for t in row:
                if t.erase in out:
                    continue
                tokens = self.encoded[cols[t.eraser]].to(ctx.device, ctx.dtype)
                if tokens.shape[-1] != ctx.shape[-1]:
                    raise IncompatibleModelError("Geom-Erasing", f"the negative conditioning is {ctx.shape[-1]}-d, "
                                                                f"the tokens {tokens.shape[-1]}-d")
                out[t.erase] = torch.cat([ctx[i], tokens], 0)
                out[t.alternative] = ctx[i]
        return out

    def append(self, uncond, per_image: torch.Tensor):
        """``uncond`` (the webui's ``text_uncond``: a tensor [B, L, D] or SDXL's dict) with the tokens appended
        to the rows whose gate fires; the same object when none fires."""
        on = self.firing(per_image)
        self.applied = on  # regional columns included: the infotext lists them too
        on = [[c for c in cols if c not in self.regional] for cols in on]
        if uncond is None:  # no negative this pass (Forge's hires pass at CFG 1): nothing to append to
            self.applied = [[] for _ in on]
            return uncond
        if not any(on):
            return uncond
        ctx = uncond["crossattn"] if isinstance(uncond, dict) else uncond
        if ctx.shape[0] != len(on):
            raise ValueError(f"Geom-Erasing: the negative conditioning has {ctx.shape[0]} rows for {len(on)} images")
        if ctx.shape[-1] != next(iter(self.encoded.values())).shape[-1]:
            raise IncompatibleModelError("Geom-Erasing", f"the negative conditioning is {ctx.shape[-1]}-d, the tokens "
                                                        f"{next(iter(self.encoded.values())).shape[-1]}-d")
        rows = [torch.cat([ctx[i]] + [self.encoded[c].to(ctx.device, ctx.dtype) for c in cols], 0) if cols else ctx[i]
                for i, cols in enumerate(on)]
        new = torch.stack(repeat_to_common_length(rows))
        if isinstance(uncond, dict):
            out = copy.copy(uncond)  # the webui's own dict type (DictWithShape), not changed in place
            out["crossattn"] = new
            if getattr(out, "_shape", None) is not None:
                out._shape = new.shape
            return out
        return new

    def summary(self, image: int) -> str | None:
        """What image ``image`` got in the last step (for the infotext), or None."""
        if image >= len(self.applied) or not self.applied[image]:
            return None
        names = dict((c, e.eraser.name) for c, e in self.entries)
        return ", ".join(f"{names[c]}:{self.plans[c].own_tokens} tokens" + (" regional" if c in self.regional else "")
                         for c in self.applied[image])


def _device(table: nn.Embedding):
    try:  # A1111 moves the tokens to its device itself in process_tokens (the table may still be offloaded)
        from modules import devices

        return getattr(devices, "device", None) or table.weight.device
    except Exception:
        return table.weight.device


def _clear_fixes(engine):
    """No textual-inversion vectors left over from another encoding may land in our rows."""
    for owner in (getattr(engine, "hijack", None), getattr(engine, "embeddings", None)):
        if owner is not None and hasattr(owner, "fixes"):
            owner.fixes = None


def repeat_to_common_length(rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each [L_i, D] row repeated along the tokens to the least common multiple of the L_i (attention over a
    context repeated n times equals attention over the context)."""
    lengths = {int(r.shape[0]) for r in rows}
    if len(lengths) == 1:
        return rows
    total = 1
    for n in lengths:
        total = total * n // math.gcd(total, n)
    return [r.repeat(total // r.shape[0], 1) for r in rows]

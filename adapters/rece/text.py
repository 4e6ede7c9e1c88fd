"""Text vectors for closed-form edits: encoding through a caller-supplied encoder (cached), the token
conventions of the published UCE/RECE code, and preserve Grams built from prompts."""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Callable, Sequence

import torch

from .solve import _F64, CLIP_EOS_TOKEN_ID, PreserveGram, VectorSet, _check_finite

# ---------------------------------------------------------------------------
# text encodings: caching and token conventions
# ---------------------------------------------------------------------------

def _encoder_identity(encode, encoder_key):
    """(key, owner) for the cache: an explicit key, else the callable (bound methods by owner)."""
    if encoder_key is not None:
        return ("key", encoder_key), None
    owner = getattr(encode, "__self__", None)
    func = getattr(encode, "__func__", None)
    if owner is not None and func is not None:
        return ("bound", id(owner), id(func)), owner
    return ("callable", id(encode)), encode


class EncodingCache:
    """Memoises text encodings per (encoder identity, text), LRU-bounded per encoder.

    Entries are the encoder's own tensors (dtype and device as returned), one
    ``L x D`` hidden state per text: an SD1.x fp32 prompt is ~236 KB, so the
    default bound of 4,096 texts is at most ~1 GB (SDXL: ~2.5 GB); lower
    ``max_texts_per_encoder`` where memory is tight.  Per-text entries let a
    preserve list that changes by one prompt (e.g. "all other artists") reuse
    every other encoding.

    Encoder identity: ``encoder_key`` when given (recommended: e.g. a model
    fingerprint + CLIP-skip setting), else the callable itself (for bound methods
    its owner object + function).  Entries keyed by object identity are dropped
    when that object is garbage-collected, and objects that cannot be
    weak-referenced are not cached unless an ``encoder_key`` is given.
    Also memoises preserve-list Gram matrices (:func:`preserve_gram_from_prompts`).
    """

    def __init__(self, max_texts_per_encoder: int = 4096):
        self.max_texts = int(max_texts_per_encoder)
        self._store: dict = {}
        self._grams: dict = {}
        self._lock = threading.RLock()

    def clear(self) -> None:
        with self._lock:
            self._store.clear()
            self._grams.clear()

    def _bucket(self, key, owner, create=True):
        with self._lock:
            b = self._store.get(key)
            if b is None and create:
                if owner is not None:
                    try:
                        weakref.finalize(owner, self._drop, key)
                    except TypeError:
                        return None                # cannot track lifetime: do not cache
                b = self._store[key] = OrderedDict()
            return b

    def _drop(self, key) -> None:
        with self._lock:
            self._store.pop(key, None)
            for gk in [gk for gk in self._grams if gk[0] == key]:
                self._grams.pop(gk, None)

    def __len__(self) -> int:
        return sum(len(b) for b in self._store.values())


DEFAULT_ENCODING_CACHE = EncodingCache()


def _call_encoder(encode, texts):
    out = encode(list(texts))
    if not isinstance(out, (tuple, list)) or len(out) not in (2, 3):
        raise ValueError("encode(texts) must return (hidden[B, L, D], token_ids[B, L]) "
                         "or (hidden, token_ids, attention_mask)")
    hidden, ids = out[0], out[1]
    mask = out[2] if len(out) == 3 else None
    if hidden.dim() != 3 or ids.dim() != 2 or hidden.shape[:2] != ids.shape \
            or hidden.shape[0] != len(texts):
        raise ValueError(f"encode returned hidden {tuple(hidden.shape)} and token_ids "
                         f"{tuple(ids.shape)} for {len(texts)} texts; expected [B, L, D] and [B, L]")
    if mask is not None and tuple(mask.shape) != tuple(ids.shape):
        raise ValueError("attention_mask must have the shape of token_ids")
    return hidden, ids, mask


def encode_texts(encode: Callable, texts: Sequence[str], *, cache: EncodingCache | None = DEFAULT_ENCODING_CACHE,
                 encoder_key=None, batch_size: int = 64):
    """Encode ``texts`` with ``encode``, reusing cached encodings; returns ``(hidden, ids, mask)``.

    ``mask`` is ``None`` unless the encoder returns one.  Only texts missing from
    the cache are encoded, in batches of ``batch_size``.  Pass ``cache=None`` to
    disable caching.
    """
    texts = [str(t) for t in texts]
    if not texts:
        raise ValueError("no texts to encode")
    key, owner = _encoder_identity(encode, encoder_key)
    bucket = cache._bucket(key, owner) if cache is not None else None
    found: dict = {}
    if bucket is not None:
        with cache._lock:
            for t in texts:
                if t in bucket:
                    bucket.move_to_end(t)
                    found[t] = bucket[t]
    todo = list(OrderedDict.fromkeys(t for t in texts if t not in found))
    for i in range(0, len(todo), max(1, int(batch_size))):
        chunk = todo[i:i + batch_size]
        with torch.no_grad():
            hidden, ids, mask = _call_encoder(encode, chunk)
        for j, t in enumerate(chunk):
            found[t] = (hidden[j].detach().clone(), ids[j].detach().clone(),
                        None if mask is None else mask[j].detach().clone())
        if bucket is not None:
            with cache._lock:
                for t in chunk:
                    bucket[t] = found[t]
                while len(bucket) > cache.max_texts:
                    bucket.popitem(last=False)
    hid = torch.stack([found[t][0] for t in texts])
    ids = torch.stack([found[t][1] for t in texts])
    masks = [found[t][2] for t in texts]
    mask = None if any(m is None for m in masks) else torch.stack(masks)
    return hid, ids, mask


def last_word_index(token_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    eos_token_id: int = CLIP_EOS_TOKEN_ID) -> torch.Tensor:
    """Index of the last word token: ``attention_mask.sum() - 2`` as in both UCE codes.

    Without a mask, the first ``eos_token_id`` after position 0 marks the end
    (works for SD1.x's EoT padding and SD2.x's id-0 padding alike); the index is
    the position before it, i.e. 0 (BOS) for the empty prompt.
    """
    ids = token_ids if token_ids.dim() == 2 else token_ids[None]
    if attention_mask is not None:
        m = attention_mask if attention_mask.dim() == 2 else attention_mask[None]
        k = m.to(torch.long).sum(-1) - 2
    else:
        is_eos = ids == eos_token_id
        is_eos[:, 0] = False
        if not bool(is_eos.any(-1).all()):
            raise ValueError(f"token ids without an end-of-text token ({eos_token_id}); pass "
                             f"attention_mask or the tokenizer's eos_token_id")
        k = is_eos.to(torch.int8).argmax(-1).to(torch.long) - 1
    if bool((k < 0).any()):
        raise ValueError("invalid token layout: last word index < 0")
    return k if token_ids.dim() == 2 else k[0]


def _seq_args(hidden, ids, mask, what):
    if hidden.dim() == 2:
        hidden, ids = hidden[None], ids[None]
        mask = None if mask is None else mask[None]
    if hidden.dim() != 3 or ids.shape != hidden.shape[:2]:
        raise ValueError(f"{what}: hidden must be [B, L, D] (or [L, D]) with token_ids [B, L], got "
                         f"{tuple(hidden.shape)} and {tuple(ids.shape)}")
    _check_finite(hidden, f"{what} hidden states")
    return hidden, ids, mask


def aligned_tail_vectors(erase_hidden, erase_ids, guide_hidden, guide_ids, *, erase_mask=None,
                         guide_mask=None, eos_token_id: int = CLIP_EOS_TOKEN_ID):
    """Old-UCE convention (RECE's start checkpoints): last word + EoT + padding, aligned.

    For each prompt pair, with ``k`` = last-word index of each sequence, the
    concept's rows ``k_e ..`` and the guide's rows ``k_g ..`` are paired position
    by position and right-truncated to equal length ``L - max(k_e, k_g)``
    (for guide ``' '``/``''``: concept's last word -> guide BOS, EoT -> EoT,
    pad -> pad).  A single guide sequence is broadcast over all erase prompts.
    Returns ``(erase_rows, guide_rows)`` concatenated over prompts.
    """
    eh, ei, em = _seq_args(erase_hidden, erase_ids, erase_mask, "erase")
    gh, gi, gm = _seq_args(guide_hidden, guide_ids, guide_mask, "guide")
    if gh.shape[0] == 1 and eh.shape[0] > 1:
        gh, gi = gh.expand(eh.shape[0], -1, -1), gi.expand(eh.shape[0], -1)
        gm = None if gm is None else gm.expand(eh.shape[0], -1)
    if gh.shape[0] != eh.shape[0] or gh.shape[1] != eh.shape[1] or gh.shape[2] != eh.shape[2]:
        raise ValueError(f"erase {tuple(eh.shape)} and guide {tuple(gh.shape)} encodings do not align")
    ke = last_word_index(ei, em, eos_token_id)
    kg = last_word_index(gi, gm, eos_token_id)
    length = eh.shape[1]
    er, gr = [], []
    for b in range(eh.shape[0]):
        a, g = int(ke[b]), int(kg[b])
        n = length - max(a, g)
        er.append(eh[b, a:a + n])
        gr.append(gh[b, g:g + n])
    return torch.cat(er), torch.cat(gr)


def span_aligned_vectors(erase_hidden, erase_ids, guide_hidden, guide_ids, *,
                         eos_token_id: int = CLIP_EOS_TOKEN_ID):
    """ConceptGate's templated convention (not in the UCE/RECE papers; issue 17): each erase prompt and its
    guide prompt are the same sentence with the concept / the guide word in it ("a red triangle in striped
    style" / "a red shape in striped style"). Rows are paired from the first token where the two differ: every
    token of the concept's span onto the guide span's last token (onto the token before the span when the
    guide is empty), then the rest (the later words, EoT and padding, which the causal text encoder computed
    with the concept in view) position by position from the spans' ends, right-truncated to equal length.

    Why: the published conventions take the concept as a bare word (its last token, EoT and padding); in a
    sentence the concept's states are different vectors, and the words after it carry it too, so a bare-word
    edit misses part of what a user's prompt feeds the cross-attention. Returns ``(erase_rows, guide_rows)``.
    Pairs whose two prompts are identical contribute nothing."""
    eh, ei, _ = _seq_args(erase_hidden, erase_ids, None, "erase")
    gh, gi, _ = _seq_args(guide_hidden, guide_ids, None, "guide")
    if eh.shape != gh.shape:
        raise ValueError(f"erase {tuple(eh.shape)} and guide {tuple(gh.shape)} encodings do not align")
    length = eh.shape[1]
    er, gr = [], []
    for b in range(eh.shape[0]):
        te, tg = ei[b].tolist(), gi[b].tolist()
        end_e = te.index(eos_token_id, 1) if eos_token_id in te[1:] else length - 1
        end_g = tg.index(eos_token_id, 1) if eos_token_id in tg[1:] else length - 1
        p = 0
        while p < min(end_e, end_g) and te[p] == tg[p]:
            p += 1
        if te[:end_e + 1] == tg[:end_g + 1]:
            continue
        s = 0  # common suffix of the two sentences before EoT
        while s < min(end_e, end_g) - p and te[end_e - 1 - s] == tg[end_g - 1 - s]:
            s += 1
        ne, ng = end_e - s - p, end_g - s - p
        target = p + ng - 1 if ng > 0 else p - 1
        er.append(eh[b, p:p + ne])
        gr.append(gh[b, target].expand(ne, -1))
        n = length - max(p + ne, p + ng)
        er.append(eh[b, p + ne:p + ne + n])
        gr.append(gh[b, p + ng:p + ng + n])
    if not er:
        raise ValueError("span_aligned_vectors: every erase prompt equals its guide prompt")
    return torch.cat(er), torch.cat(gr)


def last_token_vectors(hidden, token_ids, attention_mask=None, *,
                       eos_token_id: int = CLIP_EOS_TOKEN_ID) -> torch.Tensor:
    """New-UCE convention: one row per prompt, the last word token (BOS for ``''``)."""
    h, ids, m = _seq_args(hidden, token_ids, attention_mask, "last_token_vectors")
    k = last_word_index(ids, m, eos_token_id)
    return h[torch.arange(h.shape[0]), k]


_CONVENTIONS = {"aligned_tail": "aligned_tail", "old": "aligned_tail", "rece": "aligned_tail",
                "last_token": "last_token", "new": "last_token"}


def _convention(name: str) -> str:
    try:
        return _CONVENTIONS[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown token convention {name!r}; use 'aligned_tail' (old UCE / "
                         f"RECE start) or 'last_token' (new UCE)") from None


def preserve_gram_from_prompts(encode: Callable, prompts: Sequence[str], convention: str = "aligned_tail",
                               *, cache: EncodingCache | None = DEFAULT_ENCODING_CACHE,
                               encoder_key=None, eos_token_id: int = CLIP_EOS_TOKEN_ID,
                               batch_size: int = 64) -> PreserveGram:
    """Preserve set of a prompt list as a :class:`PreserveGram` (memoised in ``cache``).

    ``aligned_tail`` (old UCE, also RECE's preserve set) uses every token row of
    each prompt; ``last_token`` one row per prompt.
    """
    conv = _convention(convention)
    prompts = [str(p) for p in prompts]
    if not prompts:
        raise ValueError("empty preserve list")
    key, owner = _encoder_identity(encode, encoder_key)
    gkey = (key, conv, int(eos_token_id), tuple(prompts))
    if cache is not None and cache._bucket(key, owner) is not None:
        with cache._lock:
            hit = cache._grams.get(gkey)
        if hit is not None:
            return hit
    gram, n_vec = None, 0
    for i in range(0, len(prompts), max(1, int(batch_size))):
        h, ids, m = encode_texts(encode, prompts[i:i + batch_size], cache=cache,
                                 encoder_key=encoder_key, batch_size=batch_size)
        _check_finite(h, "preserve encodings")
        rows = h.reshape(-1, h.shape[-1]) if conv == "aligned_tail" else \
            last_token_vectors(h, ids, m, eos_token_id=eos_token_id)
        rows = rows.to(_F64)
        gram = rows.T @ rows if gram is None else gram.addmm_(rows.T, rows)
        n_vec += rows.shape[0]
    pg = PreserveGram(gram, n_vec, len(prompts))
    if cache is not None and cache._bucket(key, owner, create=False) is not None:
        with cache._lock:
            cache._grams[gkey] = pg
    return pg


def uce_vectors(encode: Callable, erase_prompts: Sequence[str] | str, guide: Sequence[str] | str = " ",
                preserve_prompts: Sequence[str] = (), convention: str = "aligned_tail", *,
                cache: EncodingCache | None = DEFAULT_ENCODING_CACHE, encoder_key=None,
                eos_token_id: int = CLIP_EOS_TOKEN_ID) -> VectorSet:
    """Build a :class:`VectorSet` for :func:`uce_edit` from prompts.

    ``convention``: ``"aligned_tail"`` (old UCE code / RECE start checkpoints:
    last word + EoT + padding aligned onto the guide, all tokens of every
    preserve prompt) or ``"last_token"`` (new UCE code: one vector per prompt).
    ``guide`` is one prompt for all erase prompts or one per erase prompt
    (``' '``/``''`` = towards unconditional, or a named concept such as ``'art'``).
    """
    conv = _convention(convention)
    erase_prompts = [erase_prompts] if isinstance(erase_prompts, str) else list(erase_prompts)
    if not erase_prompts:
        raise ValueError("no erase prompts")
    guides = [guide] * len(erase_prompts) if isinstance(guide, str) else list(guide)
    if len(guides) != len(erase_prompts):
        raise ValueError(f"{len(erase_prompts)} erase prompts but {len(guides)} guide prompts")
    kw = dict(cache=cache, encoder_key=encoder_key)
    eh, ei, em = encode_texts(encode, erase_prompts, **kw)
    gh, gi, gm = encode_texts(encode, guides, **kw)
    if conv == "aligned_tail":
        er, gr = aligned_tail_vectors(eh, ei, gh, gi, erase_mask=em, guide_mask=gm,
                                      eos_token_id=eos_token_id)
    else:
        er = last_token_vectors(eh, ei, em, eos_token_id=eos_token_id)
        gr = last_token_vectors(gh, gi, gm, eos_token_id=eos_token_id)
    pres = None
    preserve_prompts = list(preserve_prompts or [])
    if preserve_prompts:
        pres = preserve_gram_from_prompts(encode, preserve_prompts, conv, eos_token_id=eos_token_id, **kw)
    return VectorSet(er, gr, pres, conv, len(erase_prompts))


def rece_prompt_embeddings(encode: Callable, concept_prompts: Sequence[str] | str, target: str = " ", *,
                           cache: EncodingCache | None = DEFAULT_ENCODING_CACHE, encoder_key=None):
    """``(concept_emb [B, L, D], target_emb [L, D])`` for :func:`rece_edit` (all token positions)."""
    concept_prompts = [concept_prompts] if isinstance(concept_prompts, str) else list(concept_prompts)
    ch, _, _ = encode_texts(encode, concept_prompts, cache=cache, encoder_key=encoder_key)
    th, _, _ = encode_texts(encode, [target], cache=cache, encoder_key=encoder_key)
    return ch, th[0]

"""Fitting the ``context`` gate (:mod:`.context`) for one eraser on the host's own text encoder.

Positives: the eraser's concepts and user-given synonyms inside many *carrier* prompts (generic
templates, prompt contexts a model world registers, and random-vocabulary prefixes and suffixes,
because a causal encoder's state for a word depends on what precedes it). Negatives: a *neutral pool*
of prompts that name none of them (random vocabulary words in short and long frames, plus the model
world's own prompts). Two independent draws of each: the first fits the feature space and the probe,
the second the calibration, whose threshold is raised until at most ``max_fpr`` of its neutral prompts
fire. The measured rates travel with the eraser file.
"""

from __future__ import annotations

import os
import re
import time
from typing import Callable, Sequence

import numpy as np
import torch

from .context import Calibration, ContextDetector, FeatureSpace, fit_calibration, fit_probe
from .text import EncodedText, TextEncoderLike, content_mask

HERE = os.path.dirname(os.path.abspath(__file__))
#: a fixed prompt whose content states identify the text encoder a calibration was fitted on
CHECK_PROMPTS = ("a photo of a cat sitting on a wooden table", "an oil painting of a harbour at dawn")
GENERIC_CARRIERS = ("{}", "a {}", "the {}", "a photo of a {}", "a picture of a {}", "a painting of a {}",
                    "a drawing with a {}", "a {} in the corner", "{} style", "in the style of {}",
                    "an image of {}, detailed", "a close-up of a {}", "{} on a page", "a {} and a dog")
NEUTRAL_FRAMES = ("{}", "a {}", "a photo of {}", "{} in the style of a painting")


def neutral_words() -> list[str]:
    """Common English words (from the CLIP BPE vocabulary's whole-word tokens; see ``ATTRIBUTION.md``)."""
    with open(os.path.join(HERE, "neutral_words.txt"), encoding="utf-8") as f:
        return [w.strip() for w in f if w.strip() and not w.startswith("#")]


def mentions(text: str, names: Sequence[str]) -> bool:
    t = " " + re.sub(r"[^a-z\- ]+", " ", text.lower()) + " "
    return any(re.search(r"(?<![a-z\-])" + re.escape(n.lower()) + r"(?![a-z\-])", t) for n in names)


def _sentence(rng, words, n):
    return " ".join(words[int(i)] for i in rng.integers(0, len(words), n))


def neutral_pool(rng, n: int, words: Sequence[str], domain: Callable | None = None) -> list[str]:
    """``n`` prompts: random words in short and long frames; half from ``domain(rng, k)`` when given."""
    k_dom = n // 2 if domain is not None else 0
    out = [NEUTRAL_FRAMES[i % len(NEUTRAL_FRAMES)].format(_sentence(rng, words, int(rng.choice([1, 1, 2, 3, 5, 8, 12, 20, 35]))))
           for i in range(n - k_dom)]
    return out + (list(domain(rng, k_dom)) if k_dom else [])


def carriers(rng, n: int, words: Sequence[str], domain: Callable | None = None, concept: str = "") -> list[str]:
    """Templates with one ``{}``: generic ones, ``domain(rng, n, concept)`` ones, and random-word contexts."""
    out = list(GENERIC_CARRIERS)
    if domain is not None:
        out += list(domain(rng, n, concept))
    for _ in range(n // 2):
        pre, post = _sentence(rng, words, int(rng.integers(2, 30))), _sentence(rng, words, int(rng.integers(0, 8)))
        out.append(f"{pre}, a {{}} {post}".strip())
    return out


def encode_all(encoder: TextEncoderLike, texts: Sequence[str], batch: int = 64) -> EncodedText:
    from ..progress import bar

    shown = bar(len(texts), "gate calibration: encoding", unit="prompt", leave=False)  # minutes on a big CPU model
    parts = []
    for i in range(0, len(texts), batch):
        parts.append(encoder(list(texts[i:i + batch])))
        shown.update(len(parts[-1].tokens))
    shown.close()
    ids = [p.ids for p in parts]
    return EncodedText(torch.cat([p.hidden for p in parts]), [t for p in parts for t in p.tokens],
                       torch.cat(ids) if all(i is not None for i in ids) else None,
                       torch.cat([content_mask(p) for p in parts]))


def _content_rows(enc: EncodedText) -> tuple[torch.Tensor, torch.Tensor]:
    """The content-position states of ``enc`` ([N, D]) and the prompt each belongs to ([N])."""
    owner = torch.arange(enc.hidden.shape[0])[:, None].expand(enc.mask.shape)
    return enc.hidden[enc.mask].float(), owner[enc.mask]


def name_token_ids(encoder: TextEncoderLike, name: str) -> list[int]:
    enc = encoder([name])
    if enc.ids is None:
        raise ValueError("gate calibration needs a text encoder that reports token ids")
    return enc.ids[0][content_mask(enc)[0]].tolist()


def name_states(enc: EncodedText, pattern: Sequence[int]) -> torch.Tensor:
    """States at the last token of every occurrence of ``pattern`` in ``enc`` (rows [N, D])."""
    n, rows = len(pattern), []
    for b, row in enumerate(enc.ids.tolist()):
        for i in range(len(row) - n + 1):
            if row[i:i + n] == list(pattern):
                rows.append(enc.hidden[b, i + n - 1])
    return torch.stack(rows) if rows else enc.hidden.new_zeros(0, enc.hidden.shape[-1])


def check_states(encoder: TextEncoderLike) -> torch.Tensor:
    """Content states of :data:`CHECK_PROMPTS` (``[N, D]``): which encoder a calibration belongs to."""
    enc = encoder(list(CHECK_PROMPTS))
    return enc.hidden[content_mask(enc)].float()


def same_encoder(reference: torch.Tensor | None, encoder: TextEncoderLike, tol: float = 0.995,
                 now: torch.Tensor | None = None) -> bool:
    """Whether ``encoder`` gives (up to half-precision noise) the check states ``reference``
    (``now``: the encoder's check states, when already computed)."""
    if reference is None or reference.numel() == 0:
        return False
    now = check_states(encoder) if now is None else now
    if now.shape != reference.shape:
        return False
    return bool(torch.nn.functional.cosine_similarity(now, reference.to(now), dim=-1).min() >= tol)


class Calibrator:
    """Fits :class:`~.context.ContextDetector` objects for one text encoder. The feature space and the
    neutral pools are built once and shared by every eraser calibrated with this object."""

    def __init__(self, encoder: TextEncoderLike, *, pool_size: int = 600, domain_prompts: Callable | None = None,
                 domain_carriers: Callable | None = None, domain_synonyms: Callable | None = None,
                 alpha: float = 0.3, max_fpr: float = 0.005, seed: int = 0):
        self.encoder = encoder
        self.domain_synonyms = domain_synonyms
        self.words = neutral_words()
        self.domain_carriers = domain_carriers
        self.max_fpr = max_fpr
        self.seed = seed
        self.pools = [neutral_pool(np.random.default_rng(seed + k), pool_size, self.words, domain_prompts)
                      for k in (0, 1)]
        self.rows = [_content_rows(encode_all(encoder, p)) for p in self.pools]  # (states [N, D], prompt [N])
        self.space = FeatureSpace.fit(self.rows[0][0], alpha)
        self.reference = check_states(encoder)

    def _not_naming(self, k: int, names: Sequence[str]) -> torch.Tensor:
        return torch.tensor([not mentions(p, names) for p in self.pools[k]])

    def calibrate(self, concepts: Sequence[str], synonyms: Sequence[str] = (), avoid: Sequence[str] = ()
                  ) -> ContextDetector:
        """``avoid``: names the gate must not fire on although they sit close to the concept, e.g. an
        All-but-One eraser's alternative (steering "circle" toward "square" on a prompt that asks for a square
        changes what the user asked for). Their carrier prompts join the probe's negatives (weighted to a
        quarter of them) and the calibration's."""
        t0 = time.perf_counter()
        if self.domain_synonyms is not None:
            synonyms = [*synonyms, *(s for c in concepts for s in self.domain_synonyms(c))]
        names = list(dict.fromkeys([*concepts, *synonyms]))
        if not names:
            raise ValueError("gate calibration needs at least one concept")
        avoid = [a for a in dict.fromkeys(a.strip() for a in avoid) if a and not mentions(a, names)]
        patterns = {n: name_token_ids(self.encoder, n) for n in names}
        bank_t = carriers(np.random.default_rng(self.seed + 11), 48, self.words, self.domain_carriers, concepts[0])
        cal_t = carriers(np.random.default_rng(self.seed + 12), 48, self.words, self.domain_carriers, concepts[0])
        (rows, owner), (rows2, owner2) = self.rows
        negatives = self.space(rows[self._not_naming(0, names)[owner]])
        if avoid:
            hard = torch.cat([name_states(encode_all(self.encoder, [t.format(a) for t in bank_t]),
                                          name_token_ids(self.encoder, a)) for a in avoid])
            if len(hard):
                repeat = max(1, len(negatives) // (3 * len(hard)))
                negatives = torch.cat([negatives, self.space(hard).repeat(repeat, 1)])
        probes, biases = [], []
        for concept in concepts:
            group = list(dict.fromkeys([concept, *synonyms]))
            pos = torch.cat([name_states(encode_all(self.encoder, [t.format(n) for t in bank_t]), patterns[n])
                             for n in group])
            if not len(pos):
                raise ValueError(f"gate calibration: {concept!r} never appears in its carrier prompts")
            w, b = fit_probe(self.space(pos), negatives)
            probes.append(w)
            biases.append(b)
        detector = ContextDetector(self.space, torch.stack(probes), torch.tensor(biases), Calibration(0.0, 1.0),
                                   names, [frozenset(patterns[n]) for n in names])
        positives = encode_all(self.encoder, [t.format(n) for t in cal_t for n in names])
        s_pos = detector.scores(positives.hidden, positives.mask)
        keep2 = self._not_naming(1, names)
        logits = detector.concept_scores_whitened(self.space(rows2)[:, None], torch.ones(len(rows2), 1, dtype=torch.bool))
        per_prompt = torch.full((len(self.pools[1]),), -1e4).scatter_reduce(0, owner2, logits.max(1).values, "amax")
        s_neg = per_prompt[keep2]
        n_neutral = len(s_neg)
        if avoid:
            hard = encode_all(self.encoder, [t.format(a) for t in cal_t for a in avoid])
            s_neg = torch.cat([s_neg, detector.scores(hard.hidden, hard.mask)])
        detector.calibration = fit_calibration(s_pos, s_neg, max_fpr=self.max_fpr)
        detector.reference = self.reference
        # the carriers name the concept, so the whole gate fires on all of them; the probe half alone is what
        # reaches prompts that never name it (paraphrases, embedding-level attacks)
        detector.rates = {
            "positives": int(len(s_pos)), "negatives": n_neutral,
            "probe_positives_fired": round(float((detector.calibration(s_pos) > 0.5).float().mean()), 4),
            "negatives_fired": round(float((detector.calibration(s_neg[:n_neutral]) > 0.5).float().mean()), 4),
            **({"avoid": avoid, "avoid_fired": round(float((detector.calibration(s_neg[n_neutral:]) > 0.5).float().mean()), 4)}
               if avoid else {}),
            "max_fpr": self.max_fpr, "seconds": round(time.perf_counter() - t0, 2)}
        return detector


def names_to_avoid(eraser) -> list[str]:
    """What an eraser steers toward and so must not gate on: an All-but-One alternative (``settings["alternative"]``)."""
    alt = (getattr(eraser, "settings", None) or {}).get("alternative")
    return [alt.strip()] if isinstance(alt, str) and alt.strip() else []


_SHARED: list[tuple[torch.Tensor, tuple, "Calibrator"]] = []


def shared_calibrator(encoder: TextEncoderLike, now: torch.Tensor | None = None, **options) -> Calibrator:
    """One :class:`Calibrator` per text encoder and options in this process (hosts create a gate cache
    per sampling call; the neutral pools are encoded once). ``now``: the encoder's check states, if known."""
    now = check_states(encoder) if now is None else now
    key = tuple(sorted((k, repr(v)) for k, v in options.items()))
    for reference, k, calibrator in _SHARED:
        if k == key and same_encoder(reference, encoder, now=now):
            calibrator.encoder = encoder
            return calibrator
    calibrator = Calibrator(encoder, **options)
    _SHARED.append((calibrator.reference, key, calibrator))
    del _SHARED[:-4]  # a few encoders at most (a server switching models)
    return calibrator

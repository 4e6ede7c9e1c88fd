"""One gate code path for every host: :func:`entry_gates` computes an eraser's gate for a batch of
prompts under its entry's :class:`~.settings.GateSettings`; :class:`BankCache` keeps what that needs
per text encoder (FT's concept encodings, the ``context`` detectors, their whitened prompt states).

A ``context`` detector stored in an eraser file is used when its reference states match the host's
text encoder (:func:`~.calibrate.same_encoder`); otherwise the eraser is calibrated on this encoder the
first time it is used (seconds on small encoders) and the report says so. When a host cannot tell the
prompt's content positions, the rule acts as if the concept were present: an eraser that was asked for
is never silently skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .context import ContextDetector
from .ft import ConceptBank, facilitated_transport
from .settings import GateSettings
from .text import EncodedText, TextEncoderLike, content_mask


@dataclass
class GateResult:
    """One eraser's gates for P prompts: ``values`` [P] in [0, 1] (before strength), per-concept
    ``scores`` [P, C] (the best-matching concept is ``scores.argmax(1)``) and a ``details`` line per
    prompt saying which part of the rule fired, on what."""

    values: torch.Tensor
    scores: torch.Tensor
    details: list[str]


class BankCache:
    """Concept encodings and detectors per eraser, computed once per text encoder."""

    def __init__(self, encoder: TextEncoderLike | None, calibrator_options: dict | None = None):
        self.encoder = encoder
        self.calibrator_options = dict(calibrator_options or {})
        self._banks: dict[tuple, tuple] = {}
        self._detectors: dict[tuple, tuple] = {}
        self._calibrator = None
        self._check = None
        self._whitened: tuple | None = None
        self.notes: dict[str, str] = {}  # eraser name -> how its detector was obtained

    def _need_encoder(self):
        if self.encoder is None:
            raise ValueError("a text encoder is needed to encode the erased concepts")
        return self.encoder

    def get(self, eraser) -> ConceptBank:
        """FT's encodings of the eraser's concepts."""
        key = (id(eraser), tuple(eraser.concepts))
        hit = self._banks.get(key)
        if hit is None or hit[0] is not eraser:  # the eraser is held, so its id cannot be reused
            hit = self._banks[key] = (eraser, ConceptBank.encode(eraser.concepts, self._need_encoder()))
        return hit[1]

    def prepare(self, entry) -> None:
        """Do now what the entry's rule needs (encode concepts, load or calibrate a detector), so that
        none of it happens in the middle of sampling."""
        rule = entry.gate.rule
        if rule == "context":
            try:
                self.detector(entry.eraser)
            except ValueError:
                pass  # entry_gates then acts as if the concept were present, and says why
        elif rule != "always":
            self.get(entry.eraser)

    def detector(self, eraser) -> ContextDetector:
        """The eraser's ``context`` detector for this encoder: the file's, or calibrated here."""
        from .calibrate import check_states, same_encoder, shared_calibrator

        key = (id(eraser), tuple(eraser.concepts))
        hit = self._detectors.get(key)
        if hit is not None and hit[0] is eraser:
            return hit[1]
        encoder = self._need_encoder()
        stored = getattr(eraser, "gate", None)
        if self._check is None:
            self._check = check_states(encoder)
        if stored is not None and stored.names[: len(eraser.concepts)] == list(eraser.concepts) \
                and same_encoder(stored.reference, encoder, now=self._check):
            det, note = stored, "stored calibration"
        else:
            if self._calibrator is None:
                self._calibrator = shared_calibrator(encoder, now=self._check, **self.calibrator_options)
            synonyms = [n for n in (stored.names if stored is not None else []) if n not in eraser.concepts]
            from .calibrate import names_to_avoid

            det = self._calibrator.calibrate(eraser.concepts, synonyms, avoid=names_to_avoid(eraser))
            note = ("calibrated on this text encoder (the file's calibration belongs to another one)"
                    if stored is not None else "calibrated on this text encoder (the file has none)")
        det = self._share_space(det)
        self._detectors[key] = (eraser, det)
        self.notes[eraser.name] = note
        return det

    def _share_space(self, det: ContextDetector) -> ContextDetector:
        # detectors fitted on one encoder usually carry the same whitening: whiten a prompt once for all
        for _, other in self._detectors.values():
            if other.space is not det.space and torch.equal(other.space.P, det.space.P) \
                    and torch.equal(other.space.mu, det.space.mu):
                det.space = other.space
                break
        return det

    def whitened(self, det: ContextDetector, hidden: torch.Tensor) -> torch.Tensor:
        last = self._whitened
        if last is not None and last[0] is det.space and last[1] is hidden:
            return last[2]
        z = det.space(hidden)
        self._whitened = (det.space, hidden, z)
        return z


def entry_gates(prompt: EncodedText, eraser, settings: GateSettings | None, banks: BankCache,
                tokens_known: bool = True) -> GateResult:
    """The gate of one eraser for every prompt of ``prompt`` (``tokens_known=False`` when the host gave
    hidden states without token ids: the token/name halves are then skipped and the details say so)."""
    settings = settings or GateSettings()
    n = prompt.hidden.shape[0]
    if settings.rule == "always":
        ones = torch.ones(n)
        return GateResult(ones, ones[:, None].expand(n, len(eraser.concepts)), ["always"] * n)
    if settings.rule != "context":
        gamma, scores = facilitated_transport(prompt, banks.get(eraser), settings, tokens_known)
        half = "" if tokens_known or settings.rule == "cos" else ", token overlap unknown: cosine only"
        return GateResult(gamma, scores, [f"{settings.rule} {float(s):.3f}{half}" for s in scores.max(1).values])
    mask = content_mask(prompt)
    if mask is None:  # fail closed: no positions, no verdict
        ones = torch.ones(n)
        return GateResult(ones, ones[:, None].expand(n, len(eraser.concepts)),
                          ["content positions unknown: acting as if the concept were present"] * n)
    try:
        det = banks.detector(eraser)
    except ValueError as e:  # no usable calibration: erase rather than guess
        ones = torch.ones(n)
        return GateResult(ones, ones[:, None].expand(n, len(eraser.concepts)),
                          [f"context gate unavailable ({e}): acting as if the concept were present"] * n)
    z = banks.whitened(det, prompt.hidden)
    per_concept = det.concept_scores_whitened(z, mask)  # [P, C]
    score = per_concept.max(1).values
    gate = det.calibration(score)
    named = det.name_match(prompt.tokens) if tokens_known else torch.zeros(n)
    # the detector decides: on (1) or off (0). A half-strength edit lets the concept through (measured with
    # `bench attack`), and an exact 0 keeps unrelated prompts bit-identical to the unerased model.
    values = torch.maximum((gate >= 0.5).float(), named)
    if settings.threshold is not None:
        values = torch.tensor([settings.calibrate(float(g)) for g in values])
    details = []
    for i in range(n):
        if named[i] > gate[i]:
            details.append(f"context: listed name ({', '.join(det.names)})")
        else:
            details.append(f"context: probe {float(score[i]):.2f} vs threshold {det.calibration.threshold:.2f}")
    if not tokens_known:
        details = [d + ", names unknown (token ids not given)" for d in details]
    return GateResult(values, per_concept, details)

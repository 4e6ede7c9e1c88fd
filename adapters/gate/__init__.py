"""Gates: how strongly each eraser acts for a given prompt, in [0, 1].

* :mod:`.context`: the default rule ``context``, a calibrated detector on the prompt's content-token
  states plus an exact-name check, fitted per eraser by :mod:`.calibrate` and stored in its file;
* :mod:`.ft`: SPM's published Facilitated Transport (``ft``) and its halves ``cos`` / ``tokens``;
* :mod:`.settings`: per-entry :class:`GateSettings` and the :class:`GateReport`;
* :mod:`.text`: :class:`EncodedText`, what every rule reads (the text as the host's sampler encodes it);
* :mod:`.banks`: :class:`BankCache`, the per-encoder cache of concept encodings and detectors, and
  :func:`entry_gates`, the one function every host calls.
"""

from .banks import BankCache, GateResult, entry_gates
from .context import Calibration, ContextDetector, FeatureSpace
from .ft import ConceptBank, cosine_scores, facilitated_transport, token_scores
from .settings import DEFAULT_RULE, RULES, GateReport, GateSettings
from .text import WINDOW, EncodedText, TextEncoderLike, content_mask, positions_mask, special_token_filter, to_window

__all__ = ["DEFAULT_RULE", "RULES", "WINDOW", "BankCache", "Calibration", "ConceptBank", "ContextDetector",
           "EncodedText", "FeatureSpace", "GateReport", "GateResult", "GateSettings", "TextEncoderLike",
           "content_mask", "cosine_scores", "entry_gates", "facilitated_transport", "positions_mask",
           "special_token_filter", "to_window", "token_scores"]

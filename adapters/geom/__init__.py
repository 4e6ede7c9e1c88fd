"""Geom-Erasing (Liu et al., ECCV 2024, "Implicit Concept Removal of Diffusion Models"): the core.

An implicit concept (a watermark, a QR code, text) appears although no prompt asks for it, and the
model does not tie it to its name, so a plain negative prompt barely helps. Geom-Erasing labels
images with a detector, appends the concept name plus one location token ``<l{m,n}>`` for every
grid bin the concept's box covers to the caption, learns those tokens with a spatially re-weighted
diffusion loss (UNet and text encoder frozen: the paper's "model removal" setting), and then uses
the concept + location tokens as the **negative prompt**.

The package:

* :mod:`.detectors`: any callable ``images -> list[Detection]`` (:class:`CocoDetector` for a COCO-style
  annotation file; the toy world's watermark detector is ``conceptgate.toyworld.detectors``);
* :mod:`.tokens`, the geometry: :func:`covered_bins` (bins a box covers), :func:`region_weights` (the published
  re-weighting ``T/(K + a(T-K))`` inside, ``a T/(K + a(T-K))`` outside; sums to ``T``);
* text with learned vectors: :class:`VectorOverride` (a temporary forward hook on the text
  encoder's token-embedding table that writes the learned rows at marked positions; the user's
  model is never changed) and :func:`encode_segments`;
* :mod:`.negative`, the negative-prompt builder (:func:`plan_negative`): concept + location tokens, token set
  ``all`` / ``observed`` / ``topk``, the 75-token window and what happens when it is exceeded;
* the eraser (``Eraser(kind="conditioning", method="geom", tensors={"concept", "locations"})``),
  its validation; :mod:`.embedding`: export / import of standard textual-inversion embedding files that ComfyUI
  (``embedding:name``) and A1111 (``embeddings/``) load natively;
* :mod:`.trainer`: the training loop (textual-inversion style, checkpoints and resume);
* :mod:`.regional`: ConceptGate's regional negation (not the paper's rule, selectable per eraser): the
  tokens as a separate negation term confined to the cells of their location bins (diffusers, ComfyUI's
  regional node, the webui extension).

Deviations from the paper (see README, "Geom-Erasing"): the paper's full text was not available;
grid size, ``alpha`` and the inference token set are not published, so they are options with
defaults chosen by measurement in the toy world; the concept-name token is learned (initialised
from the concept word) by default because the toy model never saw the word; the "data removal"
setting also trains tokens only (the paper fine-tunes the UNet jointly there, which would not be a
portable artefact).
"""

from ..registry import (Mechanism, register_conditioning, register_default_gate_rule, register_mechanism,
                        register_row_terms)
from .detectors import CocoDetector, Detection, write_coco
from .embedding import eraser_from_ti, export_ti, load_ti, ti_metadata, ti_vectors
from .regional import (DEFAULT_REGIONAL_STRENGTH, NEGATIONS, negation_of, regional_generate, regional_rule, regional_strength,
                       regional_stack_terms, require_prompt_negation, uses_regional_rows, with_negation)
from .negative import NegativePlan, concept_segments, diffusers_handler, encode_negative, plan_negative, select_bins
from .tokens import (METHOD, OVERFLOW, TI_KEY, TI_META, TOKEN_SETS, WINDOW, VectorOverride, check_text_encoder,
                     chunk_rows, covered_bins, embedding_table, encode_segments, make_eraser, region_mask,
                     region_weights, segment_ids, text_fingerprint, token_name, validate)

register_mechanism(Mechanism("geom", "Geom-Erasing (Liu et al., ECCV 2024)", (("conditioning", METHOD),)))
register_conditioning(METHOD, diffusers_handler)
register_row_terms(METHOD, uses_regional_rows, regional_stack_terms)  # regional negation: GatedPipeline's extra rows
# an implicit concept is not asked for by the prompt: its tokens join every negative by default
register_default_gate_rule(METHOD, "always")

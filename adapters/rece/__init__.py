"""UCE (Gandikota et al., WACV 2024) and RECE (Gong et al., ECCV 2024): closed-form edits of the
cross-attention key/value weights, RECE iterating them against derived adversarial embeddings.

* :mod:`.closed_form`: the math on plain tensors, one namespace over :mod:`.solve` (UCE, defaults,
  validation), :mod:`.adversarial` (RECE), :mod:`.factor` (exact low-rank factors, interference),
  :mod:`.text` (token conventions, encoding cache) and :mod:`.weights` (which matrices are edited);
* :mod:`.hosts`: what an edit needs from the model (diffusers here; ComfyUI's host lives in ``nodes/``);
* :mod:`.edit`: :func:`compute_edit` with its cache, export as a low-rank weight eraser, interference of
  separately computed edits;
* :mod:`.published`: import of the published UCE safetensors / RECE ``.pt`` weights.

The erasers are weight erasers (methods ``uce`` and ``rece``) applied by every host's weight path.
"""

from ..registry import Mechanism, register_mechanism
from . import closed_form
from .edit import (CONCEPT_TYPES, DEFAULT_EDIT_CACHE, METHODS, PUBLISHED_FULL_UNET_BYTES, EditCache, EditOutcome,
                   EditSpec, compute_edit, edit_to_eraser, gated_stack_effect, is_cross_attention_kv, save_edit,
                   stacked_interference)
from .hosts import DiffusersEditHost, DiffusersSDXLTextEncoder, EditHost
from .published import (ImportOutcome, base_cross_attention_weights, import_published, read_published_weights,
                        save_import)

register_mechanism(Mechanism("rece", "UCE / RECE closed-form edits (Gandikota et al.; Gong et al., ECCV 2024)",
                             (("weight", "uce"), ("weight", "rece"))))

__all__ = ["CONCEPT_TYPES", "DEFAULT_EDIT_CACHE", "METHODS", "PUBLISHED_FULL_UNET_BYTES", "DiffusersEditHost",
           "DiffusersSDXLTextEncoder", "EditCache", "EditHost", "EditOutcome", "EditSpec", "ImportOutcome",
           "base_cross_attention_weights", "closed_form", "compute_edit", "edit_to_eraser", "gated_stack_effect",
           "import_published", "is_cross_attention_kv", "read_published_weights", "save_edit", "save_import",
           "stacked_interference"]

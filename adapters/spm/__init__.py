"""SPM (Lyu et al., CVPR 2024, "One-dimensional Adapter to Rule Them All"): rank-1 membranes trained with
Latent Anchoring, gated per prompt by Facilitated Transport (:mod:`conceptgate.adapters.gate`).

* :mod:`.membranes`: the adapters, their hooks, the anchor sampling and loss terms;
* :mod:`.trainer`: :class:`SPMConfig` (the reference defaults) and :class:`LatentAnchoringTrainer`.

SPM files are weight erasers (kohya ``lora_unet_*`` keys); official files load unchanged through
:func:`conceptgate.adapters.files.load_eraser`, and every host applies them with the generic weight path.
"""

from ..registry import Mechanism, register_mechanism
from .membranes import (Membranes, anchor_batch, fill_template, latent_anchor_loss, sample_anchors,
                        spm_module_names)
from .trainer import (ANCHOR_MODES, REFERENCE_ITERATIONS, REFERENCE_WARMUP, LatentAnchoringTrainer, SPMConfig,
                      TrainResult, load_diffusers_parts)

register_mechanism(Mechanism("spm", "SPM membranes (Lyu et al., CVPR 2024)", (("weight", "spm"),)))

__all__ = ["ANCHOR_MODES", "REFERENCE_ITERATIONS", "REFERENCE_WARMUP", "LatentAnchoringTrainer", "Membranes",
           "SPMConfig", "TrainResult", "anchor_batch", "fill_template", "latent_anchor_loss", "load_diffusers_parts",
           "sample_anchors", "spm_module_names"]

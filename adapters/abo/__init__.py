"""All-but-One (Hong, Lee, Woo, AAAI 2024): the concept's guidance replaced by a chosen alternative's.
Only the abstract is public: both forms here are reconstructions, documented in their modules.

* :mod:`.guidance`: the sampling-time rule (a ``guidance`` eraser, no weights): the formula, its gates,
  the batch plan that adds the erase / alternative rows to the CFG call;
* :mod:`.pipeline`: the rule on plain diffusers (:class:`AboGuidedPipeline`), also the registry's
  diffusers guidance handler;
* :mod:`.adapter`: the fine-tuned form, a low-rank adapter trained on the reconstructed objective (a
  ``weight`` eraser, method ``abo``, applied by every host's weight path).
"""

from ..registry import (Mechanism, register_check, register_guidance, register_guidance_session, register_mechanism,
                        register_row_session)
from .guidance import (KIND, METHOD, RULE, AboPlan, Term, abo_entries, abo_eraser, abo_rule, alternative_of,
                       check_abo_eraser, denoised_from_eps, encode_texts, eps_from_denoised, guidance_terms,
                       in_prompt_terms, is_abo, load_abo, save_abo, swap_in_prompt, terms_from_gates, uses_prompt)
from .pipeline import AboGuidedPipeline, AboSession, AboUNetHooks, abo_generate, diffusers_handler

register_mechanism(Mechanism("abo", "All-but-One (Hong et al., AAAI 2024; reconstructed)",
                             (("guidance", METHOD), ("weight", METHOD))))
register_check(KIND, METHOD, check_abo_eraser)
register_guidance(METHOD, diffusers_handler)
register_guidance_session(METHOD, AboSession)
register_row_session(METHOD)  # its extra-row hooks also fold Geom regional negation

__all__ = ["KIND", "METHOD", "RULE", "AboGuidedPipeline", "AboPlan", "AboUNetHooks", "Term", "abo_entries",
           "abo_eraser", "abo_generate", "abo_rule", "alternative_of", "check_abo_eraser", "denoised_from_eps",
           "diffusers_handler", "encode_texts", "eps_from_denoised", "guidance_terms", "in_prompt_terms", "is_abo",
           "load_abo", "save_abo", "swap_in_prompt", "terms_from_gates", "uses_prompt"]

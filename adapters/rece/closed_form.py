"""Closed-form cross-attention edits: UCE and RECE (issue 5), host-agnostic math.

Everything here works on plain tensors: a mapping ``{module_name: W}`` of the
``attn2.to_k`` / ``attn2.to_v`` weight matrices (``out x ctx_dim``, diffusers
module paths as names) and text vectors (rows of the text encoder's final
output, exactly as the sampler feeds it to the UNet).  No diffusers / ComfyUI
import happens at module level; the text encoder is called through a
caller-supplied ``encode(texts) -> (hidden[B, L, D], token_ids[B, L][, mask])``.

Formulas (see ``shared/reference/rece-uce-geom-erasing.md``, sections 1-2):

UCE, per matrix ``W`` (``E`` erased vectors ``c_i`` with guide vectors ``c*_i``,
``P`` preserved vectors ``c_j``)::

    W_new = (lam W + a_e sum_E (W c*_i) c_i^T + a_p sum_P (W c_j) c_j^T)
          @ (lam I + a_e sum_E c_i c_i^T  + a_p sum_P c_j c_j^T)^-1

Because the preserve targets are ``W c_j`` (identity), this is *exactly*::

    dW = W_new - W = U @ D,   U = a_e W (C* - C)^T   (out x n),
                              D = C M^-1 = solve(M, C^T)^T   (n x ctx_dim)

with ``M`` the right-hand bracket.  ``M`` only depends on the text vectors, so
it is shared by every layer of the same ``ctx_dim``: one float64 ``solve`` per
edit, then two thin matrix products per layer.  ``method="full"`` evaluates the
bracket form literally (one batched solve for all layers) and serves as a
reference; both agree to float64 round-off.

RECE, with ``W_l`` the original and ``W'_l`` the current (edited) matrices::

    c' = (lam_reg I + sum_l W'_l^T W'_l)^-1 (sum_l W'_l^T W_l) c     (shared by all layers)

then a UCE-style edit of the *current* weights mapping ``c'_t -> n_t`` (all
token positions of the target prompt) with ``lam = lam2 = 0.1`` and
``preserve_scale = lam1 = 0.1``, for K epochs; deltas accumulate.

All solves are float64 ``torch.linalg.solve`` (never an explicit inverse) and
the ridge term is mandatory (``lam > 0``): without it every direction outside
the edited vectors collapses.  Results are cast back to each weight's dtype.
"""

# The math is split by concern; this module is its one namespace (``from ... import closed_form as cf``).
from .adversarial import clear_gram_cache, rece_adversarial_embedding, rece_edit
from .factor import factor_delta, factor_edit, measure_interference
from .solve import (CLIP_BOS_TOKEN_ID, CLIP_EOS_TOKEN_ID, RECE_EDIT_DEFAULTS, RECE_TYPE_DEFAULTS, UCE_DEFAULTS,
                    EditResult, PreserveGram, RECEResult, ReceTypeDefaults, VectorSet, apply_deltas,
                    default_preserve_scale, rece_defaults, stack_vector_sets, sum_deltas, uce_edit, uce_edit_vectors)
from .text import (DEFAULT_ENCODING_CACHE, EncodingCache, aligned_tail_vectors, encode_texts, last_token_vectors,
                   last_word_index, preserve_gram_from_prompts, rece_prompt_embeddings, span_aligned_vectors,
                   uce_vectors)
from .weights import collect_cross_attention_weights, cross_attention_shapes, random_cross_attention_weights

__all__ = [
    "PreserveGram",
    "VectorSet",
    "EditResult",
    "RECEResult",
    "ReceTypeDefaults",
    "RECE_TYPE_DEFAULTS",
    "RECE_EDIT_DEFAULTS",
    "UCE_DEFAULTS",
    "CLIP_BOS_TOKEN_ID",
    "CLIP_EOS_TOKEN_ID",
    "default_preserve_scale",
    "rece_defaults",
    "uce_edit",
    "uce_edit_vectors",
    "rece_adversarial_embedding",
    "rece_edit",
    "clear_gram_cache",
    "factor_delta",
    "factor_edit",
    "stack_vector_sets",
    "sum_deltas",
    "apply_deltas",
    "measure_interference",
    "EncodingCache",
    "DEFAULT_ENCODING_CACHE",
    "encode_texts",
    "last_word_index",
    "aligned_tail_vectors",
    "last_token_vectors",
    "span_aligned_vectors",
    "uce_vectors",
    "preserve_gram_from_prompts",
    "rece_prompt_embeddings",
    "collect_cross_attention_weights",
    "cross_attention_shapes",
    "random_cross_attention_weights",
]

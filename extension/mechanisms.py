"""Which eraser kinds the webui glue applies, and where each one plugs in.

All three kinds are reachable in AUTOMATIC1111, Forge and reForge (accordion, API arguments and
``<erase:...>`` tags), gated per prompt from the same gate computation:

==============  =================================================  =================================================
kind            A1111                                              Forge / reForge
==============  =================================================  =================================================
``weight``      per-row forward hooks, rows from every CFG step    LoRA patches on a clone of ``forge_objects.unet``
(SPM, UCE/RECE, (:mod:`.a1111`, ``process_batch`` +                in ``process_before_every_sampling``
ABO adapters)   ``on_cfg_denoiser``)                               (:mod:`.forge`); one set of weights per batch:
                                                                   each eraser at its strongest gate over the batch
``conditioning`` learned tokens appended to each image's           the same, on Forge's conditioning path (Forge
(Geom-Erasing)  unconditional conditioning in ``on_cfg_denoiser``  fires ``on_cfg_denoiser`` before
                (:mod:`.geom`), per image; a file set to regional  ``sampling_function``), per image; regional:
                negation: two rows per firing image, the           the rows join the guidance chunks below
                guidance path below
``guidance``    erase / alternative rows inserted into the CFG     conditioning modifier + model function wrapper
(All-but-One)   batch in ``on_cfg_denoiser``, their predictions    (rows joined to the batched ``apply_model``
                kept in ``on_cfg_denoised``, the rule in           call) + post-CFG function on the same unet
                ``on_cfg_after_cfg`` (:mod:`.abo`), per image      clone (:mod:`.abo`), per image
==============  =================================================  =================================================

A file of another kind (none exists today) is listed as unavailable and refused by name, never silently
ignored: :func:`reachable_kind` says why.
"""

from __future__ import annotations

KINDS = {
    "weight": "SPM membranes, UCE/RECE edits, All-but-One adapters",
    "conditioning": "Geom-Erasing tokens",
    "guidance": "All-but-One guidance",
}


def reachable_kind(kind: str) -> str | None:
    """None when erasers of ``kind`` work in the webui, otherwise why not."""
    if kind in KINDS:
        return None
    return f"unknown eraser kind {str(kind)[:40]!r} (this webui glue applies: {', '.join(KINDS)})"

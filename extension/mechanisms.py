"""Which eraser kinds the webui glue can apply, and where each one plugs in.

Each mechanism is a small object with one method per host stage. The script calls them in
order for every eraser kind present in the stack:

==================  ==========================================  ===========================================
stage               A1111 call site                             Forge call site
==================  ==========================================  ===========================================
``prepare``         ``Script.process_batch`` (before text       ``Script.process_batch`` (before
                    encoding: the place to edit                 ``setup_conds``)
                    ``p.negative_prompts``)
``before_sampling`` -- (A1111 has no such stage; the weight     ``Script.process_before_every_sampling``
                    mechanism works from the CFG callback)      (patch a clone of ``forge_objects.unet``)
``cfg_denoiser``    ``on_cfg_denoiser`` (rows of this step)     ``on_cfg_denoiser`` (still fired)
``cfg_denoised`` /  ``on_cfg_denoised`` / ``on_cfg_after_cfg``   post-CFG function on the unet clone
``after_cfg``                                                   (Forge never fires ``on_cfg_denoised``)
``finish``          ``Script.postprocess``                      ``Script.postprocess``
==================  ==========================================  ===========================================

Reachable now: ``weight`` (SPM membranes, RECE/UCE edits, All-but-One adapters): per-row forward
hooks in A1111 (:mod:`.a1111`), ``add_patches`` in Forge (:mod:`.forge`).

Not reachable yet from the webui glue: ``conditioning`` (Geom-Erasing tokens, implemented in the core
and for diffusers / ComfyUI: register the vectors as embeddings and append their names to
``p.negative_prompts`` in ``prepare``; meanwhile the exported embedding works natively) and ``guidance`` (All-but-One at sampling time: the CFG callbacks in A1111, a post-CFG
function in Forge). Files of those kinds are listed as unavailable and refused with a message,
never silently ignored. To add one, implement its stages and set ``available = True``.
"""

from __future__ import annotations


class Mechanism:
    kind = ""
    available = False
    reason = ""

    # Stage hooks; each receives the script state. The default does nothing.
    def prepare(self, state, p):
        pass

    def before_sampling(self, state, p, **kwargs):
        pass

    def cfg_denoiser(self, state, params):
        pass

    def cfg_denoised(self, state, params):
        pass

    def after_cfg(self, state, params):
        pass

    def finish(self, state, p):
        pass


class WeightMechanism(Mechanism):
    """Implemented by :mod:`.a1111` and :mod:`.forge`; the script drives them directly."""

    kind = "weight"
    available = True


class ConditioningMechanism(Mechanism):
    kind = "conditioning"
    # the core (adapters/geom/), diffusers and ComfyUI implement it; the webui glue does not append the tokens yet
    reason = ("Geom-Erasing tokens: not implemented in the webui glue yet (the core, diffusers and ComfyUI have "
              "them); export them as an embedding "
              "(python -m conceptgate train geom --export DIR), put the file in embeddings/ and its name in the "
              "negative prompt")


class GuidanceMechanism(Mechanism):
    kind = "guidance"
    # the core (adapters/abo/guidance.py) and the diffusers / ComfyUI glue implement it; the webui glue does not yet
    reason = ("All-but-One guidance erasers work in diffusers and ComfyUI but not in the webui yet "
              "(use the All-but-One adapter, a weight eraser, here)")


MECHANISMS: dict[str, Mechanism] = {m.kind: m for m in (WeightMechanism(), ConditioningMechanism(), GuidanceMechanism())}


def reachable_kind(kind: str) -> str | None:
    """None when erasers of ``kind`` work in the webui, otherwise why not."""
    m = MECHANISMS.get(kind)
    if m is None:
        return f"unknown eraser kind {kind!r}"
    return None if m.available else m.reason

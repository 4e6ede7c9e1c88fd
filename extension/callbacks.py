"""Module-level webui callbacks: the ``<erase:...>`` extra network, the settings entry, the CFG
callbacks (the A1111 row table, Geom-Erasing tokens on both hosts, All-but-One in A1111), and clean-up. Registered once (:func:`register`)."""

from __future__ import annotations

import logging

from modules import extra_networks, script_callbacks, shared

from .library import OPTION, Library, default_folder
from .params import NETWORK, tag_params
from .state import ERROR_ATTR, TAGS_ATTR, clear_poison, fail_closed

log = logging.getLogger("conceptgate")

_registered = False
ACTIVE: dict = {"state": None, "p": None}  # the generation whose hooks are attached (A1111)
LAST: dict = {"text": "ConceptGate: no generation yet"}


_LIBRARIES: dict = {}


def library() -> Library:
    """The eraser folder in use (one :class:`Library`, and its load cache, per folder)."""
    configured = getattr(shared.opts, OPTION, "") if getattr(shared, "opts", None) is not None else ""
    folder = default_folder(getattr(shared, "models_path", None), configured)
    if folder not in _LIBRARIES:
        _LIBRARIES[folder] = Library(folder)
    return _LIBRARIES[folder]


class ExtraNetworkErase(extra_networks.ExtraNetwork):
    """``<erase:name:strength>``: recorded on ``p`` for the script; it never touches other networks
    (the built-in Lora extension keeps its own ``<lora:...>`` list)."""

    def __init__(self):
        super().__init__(NETWORK)

    def activate(self, p, params_list):
        try:
            setattr(p, TAGS_ATTR, [tag_params(list(params.items)) for params in params_list])
        except Exception as e:  # the webui only logs what activate raises: stop the generation instead
            raise fail_closed(p, e, "<erase:...> tag") from None

    def deactivate(self, p):
        pass


def on_before_ui():
    # extra_networks.initialize() clears the registry after scripts load, so register here.
    extra_networks.register_extra_network(ExtraNetworkErase())


def on_ui_settings():
    shared.opts.add_option(OPTION, shared.OptionInfo(
        "", "ConceptGate eraser folder (empty: models/conceptgate; point it at ComfyUI's models/conceptgate to share files)",
        section=("conceptgate", "ConceptGate")))
    shared.opts.add_option("conceptgate_forge_per_row", shared.OptionInfo(
        False, "Forge: apply weight erasers per image of a batch (forward hooks, each image its own gate) instead of "
               "Forge's LoRA merge at the batch's strongest gate", section=("conceptgate", "ConceptGate")))
    shared.opts.add_option("conceptgate_allow_other_base", shared.OptionInfo(
        False, "Apply UCE/RECE edit files to models other than the one they were solved on (an approximation; "
               "refused by default)", section=("conceptgate", "ConceptGate")))


def set_active(state, p):
    ACTIVE["state"], ACTIVE["p"] = state, p


def reset_active():
    """Detach whatever a previous generation left (it may have stopped before ``postprocess``)."""
    state = ACTIVE["state"]
    if state is not None:
        state.release()
    ACTIVE["state"] = ACTIVE["p"] = None
    clear_poison()


def on_cfg_denoiser(params):
    state, p = ACTIVE["state"], ACTIVE["p"]
    if state is None:
        return
    try:
        state.on_cfg_denoiser(p, params, getattr(shared, "sd_model", None))
    except Exception as e:  # the webui only logs callback errors: the next UNet call raises it instead
        raise fail_closed(p, e, "CFG step") from None


def on_cfg_denoised(params):
    state, p = ACTIVE["state"], ACTIVE["p"]
    if state is None:
        return
    try:
        state.on_cfg_denoised(p, params)
    except Exception as e:
        raise fail_closed(p, e, "CFG step (denoised)") from None


def on_cfg_after_cfg(params):
    state, p = ACTIVE["state"], ACTIVE["p"]
    if state is None:
        return
    try:
        state.on_cfg_after_cfg(p, params)
    except Exception as e:
        _spoil(params)
        raise fail_closed(p, e, "CFG step (after CFG)") from None
    if getattr(p, ERROR_ATTR, None) is not None:
        _spoil(params)  # an error earlier in this step: no UNet call may follow to stop the generation


def _spoil(params):
    """The last step's result made NaN: the webui's NaN check after the VAE then stops the generation with
    an error (a failure found after the last UNet call has no other way to stop it)."""
    import torch

    if torch.is_tensor(getattr(params, "x", None)):
        params.x = torch.full_like(params.x, float("nan"))


def on_script_unloaded():
    reset_active()


def register():
    global _registered
    if _registered:
        return
    script_callbacks.on_before_ui(on_before_ui)
    script_callbacks.on_ui_settings(on_ui_settings)
    script_callbacks.on_cfg_denoiser(on_cfg_denoiser)
    script_callbacks.on_cfg_denoised(on_cfg_denoised)
    script_callbacks.on_cfg_after_cfg(on_cfg_after_cfg)
    script_callbacks.on_script_unloaded(on_script_unloaded)
    _registered = True

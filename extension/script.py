"""The ``scripts.Script`` the webui instantiates (entered through ``scripts/conceptgate_webui.py``).

Stages, in ``modules/processing.py::process_images_inner`` order:

* ``process``: read the arguments, load the preset and the selected erasers (errors name the file),
  detach anything a stopped generation left behind.
* (the webui parses ``<erase:...>`` tags and activates extra networks, then) ``process_batch``:
  A1111: attach the per-row hooks for the batch's stack, encode Geom-Erasing tokens and All-but-One
  texts; Forge: nothing yet.
* A1111 sampling, every step (see :mod:`.callbacks`): ``on_cfg_denoiser`` computes the gates, fills the
  row table, appends Geom-Erasing tokens to the unconditional rows and inserts All-but-One rows;
  ``on_cfg_denoised`` keeps those rows' predictions, ``on_cfg_after_cfg`` applies the rule.
* Forge: ``process_before_every_sampling``: gates from the prompts, weight patches and the All-but-One
  functions on a unet clone, Geom-Erasing tokens encoded (again for the hires pass); ``on_cfg_denoiser``
  appends the tokens every step.
* ``postprocess_batch``: gates into the infotext (per image); ``postprocess``: hooks removed.
"""

from __future__ import annotations

import logging

import modules.scripts as scripts

from . import callbacks
from . import host as _host
from .params import NETWORK, TITLE, ScriptArgs
from .state import STATE_ATTR, TAGS_ATTR, GenerationState, fail_closed

log = logging.getLogger("conceptgate")


class ConceptGateScript(scripts.Script):
    sorting_priority = 50

    def title(self):
        return TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        from .ui import build

        return build(self, is_img2img)

    # ------------------------------------------------------------- stages
    # Every stage fails closed: the webui wraps script stages in try/except and only logs, so an error
    # (unknown eraser, bad strength, missing file, wrong model, NaN gate) goes through state.fail_closed,
    # which stops the generation with it instead of letting an unerased image through.
    def process(self, p, *args):
        callbacks.reset_active()
        try:
            state = GenerationState(ScriptArgs.from_args(args), callbacks.library(), _host.HOST)
        except Exception as e:
            raise fail_closed(p, e, "process") from None
        setattr(p, STATE_ATTR, state)

    def before_process_batch(self, p, *args, **kwargs):
        setattr(p, TAGS_ATTR, None)  # set again by the <erase:...> extra network's activate, every batch

    def process_batch(self, p, *args, **kwargs):
        state = getattr(p, STATE_ATTR, None)
        if state is None:
            return
        try:
            _check_tags_activated(p)
            state.report = None
            state.batch_images = None
            if _host.is_forge(state.host):  # Forge: patches in process_before_every_sampling; the CFG callback
                callbacks.set_active(state, p)  # adds the Geom-Erasing tokens
                return
            state.sync_a1111(p)
            if state.runtime is not None:
                state.runtime.first_report = None
                state.runtime.first_images = None
                callbacks.set_active(state, p)
        except Exception as e:
            raise fail_closed(p, e, "process_batch") from None

    def process_before_every_sampling(self, p, *args, **kwargs):  # Forge only; A1111 never calls it
        state = getattr(p, STATE_ATTR, None)
        if state is not None and _host.is_forge(state.host):
            try:
                state.forge_before_sampling(p)
            except Exception as e:
                raise fail_closed(p, e, "process_before_every_sampling") from None

    def postprocess_batch(self, p, *args, **kwargs):
        state = getattr(p, STATE_ATTR, None)
        if state is None:
            return
        state.write_infotext(p, kwargs.get("batch_number"))
        callbacks.LAST["text"] = state.summary()

    def postprocess(self, p, processed, *args):
        state = getattr(p, STATE_ATTR, None)
        if state is None:
            return
        state.release()
        callbacks.reset_active()  # also removes a fail-closed hook that never fired
        callbacks.LAST["text"] = state.summary()
        if state.stack is not None and len(state.stack):
            log.info("%s", callbacks.LAST["text"].replace("\n", "; "))


def _check_tags_activated(p):
    """``<erase:...>`` tags were in the prompt but the extra network never saw them (not registered, e.g.
    another extension reset the registry): refuse rather than ignore them."""
    data = getattr(p, "extra_network_data", None)
    if isinstance(data, dict) and data.get(NETWORK) and getattr(p, TAGS_ATTR, None) is None:
        raise RuntimeError("ConceptGate: the prompt has <erase:...> tags but the 'erase' extra network is not "
                           "registered in this webui session (restart the webui); the generation was stopped")

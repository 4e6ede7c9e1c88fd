"""AUTOMATIC1111 / Forge glue for ConceptGate.

Loaded only inside the webui, through ``scripts/conceptgate_webui.py``. Importing
:mod:`conceptgate.extension` itself imports no host module; the host-specific modules
(:mod:`.script`, :mod:`.callbacks`) import ``modules.*`` and must only be imported by the webui.

Layout:

* :mod:`.host`: which host is running (A1111, old Forge ``ldm_patched``, new Forge ``backend``),
  decided once at import time.
* :mod:`.library`: the shared eraser folder (``models/conceptgate``, ComfyUI's layout) and presets.
* :mod:`.params`: the script arguments, ``<erase:...>`` tags and infotext fields (pure Python).
* :mod:`.ldm`: canonical (diffusers) module names -> the LDM UNet the webui loaded.
* :mod:`.text`: prompt text -> hidden states and token ids, with the loaded model's own encoder.
* :mod:`.mechanisms`: which eraser kinds are reachable and where each one plugs in.
* :mod:`.a1111`: weight erasers as per-row forward hooks, rows from A1111's CFG batch layout.
* :mod:`.forge`: weight erasers as ``add_patches`` on a clone of ``forge_objects.unet``.
* :mod:`.script` / :mod:`.ui` / :mod:`.callbacks`: the ``scripts.Script``, its gradio accordion
  (built lazily) and the module-level callbacks.
"""

"""STAND-IN for the AUTOMATIC1111 / Forge host APIs that ConceptGate's webui glue calls.

Neither webui can be installed here (not on PyPI, no network), so this package provides, under
their real module names, exactly the host surface ``conceptgate/extension`` uses, written from the
host report (``shared/reference/hosts-comfyui-a1111-forge.md`` sections 3-5):

* ``modules.scripts`` (``Script``, ``AlwaysVisible``), ``modules.script_callbacks`` (registration
  lists, ``CFGDenoiserParams``), ``modules.extra_networks`` (A1111's regex, first-prompt-only parse,
  ``activate`` with ``[]`` for unmentioned networks, ``initialize`` clearing the registry),
  ``modules.shared`` (``opts``, ``OptionInfo``, ``models_path``, ``sd_model``), ``modules.devices``,
  ``modules.infotext_utils`` (quote / parse, for the infotext round trip),
  ``modules.sd_samplers_cfg_denoiser`` (``CFGDenoiser.forward``'s batch layout: cond rows per AND
  part, uncond rows last, skipped uncond, chunked / separate calls, SDXL dict conds) and
  ``modules.processing`` (a ``p`` object with the fields the glue reads and ``process_images``
  replaying ``process_images_inner``'s call order, hires pass included);
* Forge HEAD: ``backend.patcher.base.ModelPatcher`` (keyword-only ``add_patches(*, filename,
  patches, strength_patch, strength_model, online_mode)``, identifier-keyed ``lora_patches``,
  ``refresh`` skipped when the key list is unchanged) and ``backend.patcher.lora``;
* old Forge: ``ldm_patched.modules.model_patcher`` / ``ldm_patched.modules.lora`` (ComfyUI's API).

Both ``lora`` modules delegate to the real ComfyUI 0.3.75 ``comfy.lora`` (Forge's key map and patch
format are ComfyUI's, per the report), so the caller must have booted ComfyUI.

Use :func:`installed` as a context manager: it puts the stand-ins on ``sys.modules`` and removes
them (and every ``conceptgate.extension`` module imported meanwhile) afterwards.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

COMMON = [
    ("modules", "modules/__init__.py"),
    ("modules.shared", "modules/shared.py"),
    ("modules.devices", "modules/devices.py"),
    ("modules.script_callbacks", "modules/script_callbacks.py"),
    ("modules.extra_networks", "modules/extra_networks.py"),
    ("modules.scripts", "modules/scripts.py"),
    ("modules.infotext_utils", "modules/infotext_utils.py"),
    ("modules.sd_samplers_cfg_denoiser", "modules/sd_samplers_cfg_denoiser.py"),
    ("modules.processing", "modules/processing.py"),
    ("gradio", "gradio_stub.py"),
]
HOSTS = {
    "a1111": [("modules.sd_samplers_kdiffusion", "modules/sd_samplers_kdiffusion.py")],
    "forge": [("backend", "backend/__init__.py"), ("backend.patcher", "backend/patcher/__init__.py"),
              ("backend.patcher.base", "backend/patcher/base.py"), ("backend.patcher.lora", "backend/patcher/lora.py"),
              ("modules.sd_samplers_kdiffusion", "modules/sd_samplers_kdiffusion.py")],
    "forge-legacy": [("ldm_patched", "ldm_patched/__init__.py"), ("ldm_patched.modules", "ldm_patched/modules/__init__.py"),
                     ("ldm_patched.modules.model_patcher", "ldm_patched/modules/model_patcher.py"),
                     ("ldm_patched.modules.lora", "ldm_patched/modules/lora.py"),
                     ("modules.sd_samplers_kdiffusion", "modules/sd_samplers_kdiffusion.py")],
}
ROOTS = ("modules", "backend", "ldm_patched", "gradio")


def _load(name, rel):
    path = os.path.join(HERE, rel)
    is_pkg = rel.endswith("__init__.py")
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=[os.path.dirname(path)] if is_pkg else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)
    spec.loader.exec_module(module)
    return module


def _ours(name):
    return name.split(".")[0] in ROOTS or name == "conceptgate.extension" or name.startswith("conceptgate.extension.") \
        or name in ("conceptgate_webui", "a1111_stub.forge_sampling")  # binds the stand-in modules at import


@contextlib.contextmanager
def installed(host="a1111"):
    clash = [n for n in sys.modules if n.split(".")[0] in ROOTS]
    if clash:
        raise RuntimeError(f"real modules with host names are loaded: {clash[:3]}")
    try:
        for name, rel in COMMON + HOSTS[host]:
            _load(name, rel)
        yield sys.modules["modules.processing"]
    finally:
        for name in [n for n in sys.modules if _ours(n)]:
            del sys.modules[name]
        pkg = sys.modules.get("conceptgate")
        if pkg is not None and hasattr(pkg, "extension"):
            delattr(pkg, "extension")


def load_entry_script():
    """Import ``scripts/conceptgate_webui.py`` the way the webui does (by file path)."""
    root = os.path.dirname(os.path.dirname(HERE))
    path = os.path.join(root, "scripts", "conceptgate_webui.py")
    spec = importlib.util.spec_from_file_location("conceptgate_webui", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["conceptgate_webui"] = module
    spec.loader.exec_module(module)
    return module

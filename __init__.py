"""ConceptGate: gated concept erasure for diffusers, ComfyUI and AUTOMATIC1111/Forge.

The checkout is three things at once:

* the ``conceptgate`` Python package (``pip install``), whose host-agnostic core lives in
  :mod:`conceptgate.adapters`;
* a ComfyUI custom-node pack (dropped into ``ComfyUI/custom_nodes``): ComfyUI imports this file
  and reads ``NODE_CLASS_MAPPINGS``;
* an AUTOMATIC1111/Forge extension (dropped into ``extensions/``), entered through ``scripts/``.

Importing the package never imports a host: the ComfyUI nodes are only loaded when ComfyUI's own
modules are already imported, i.e. when ComfyUI is loading us.
"""

import sys

__version__ = "0.1.0"

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
WEB_DIRECTORY = None


def _inside_comfyui() -> bool:
    # ComfyUI imports folder_paths and comfy.model_management before it loads custom nodes.
    return "folder_paths" in sys.modules and "comfy.model_management" in sys.modules


if _inside_comfyui():
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811,E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "__version__"]

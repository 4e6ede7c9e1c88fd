"""ConceptGate: gated concept erasure for diffusers, ComfyUI and AUTOMATIC1111/Forge.

The checkout is three things at once:

* the ``conceptgate`` Python package (``pip install``), whose host-agnostic core lives in
  :mod:`conceptgate.adapters`;
* a ComfyUI custom-node pack (dropped into ``ComfyUI/custom_nodes``): ComfyUI imports this file
  and calls ``comfy_entrypoint`` (V3 nodes, ``nodes/``);
* an AUTOMATIC1111/Forge extension (dropped into ``extensions/``), entered through ``scripts/``.

Importing the package never imports a host: the ComfyUI nodes are only loaded when ComfyUI's own
modules are already imported, i.e. when ComfyUI is loading us.
"""

import sys

__version__ = "0.1.0"

WEB_DIRECTORY = None


def _inside_comfyui() -> bool:
    # ComfyUI imports folder_paths and comfy.model_management before it loads custom nodes.
    return "folder_paths" in sys.modules and "comfy.model_management" in sys.modules


if _inside_comfyui():
    # ComfyUI's loader takes a pack's NODE_CLASS_MAPPINGS (V1) when it has one and comfy_entrypoint (V3)
    # only otherwise, so inside ComfyUI there is no NODE_CLASS_MAPPINGS here
    from . import nodes as _nodes  # importing it installs the operator lock

    comfy_entrypoint = _nodes.comfy_entrypoint

    __all__ = ["comfy_entrypoint", "__version__"]
else:
    NODE_CLASS_MAPPINGS: dict = {}  # a plain import registers no nodes
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}
    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "__version__"]

"""ComfyUI nodes of ConceptGate (imported only when ComfyUI loads the pack)."""

from . import lock

lock.install()  # first: the operator lock must be in place even if a node module below fails to import

from . import nodes_abo, nodes_conceptgate, nodes_geom, nodes_toy, nodes_uce  # noqa: E402

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _module in (nodes_conceptgate, nodes_uce, nodes_toy, nodes_geom, nodes_abo):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

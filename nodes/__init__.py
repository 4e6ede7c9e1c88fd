"""ComfyUI nodes of ConceptGate (imported only when ComfyUI loads the pack)."""

from .nodes_conceptgate import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

"""ComfyUI nodes of ConceptGate (imported only when ComfyUI loads the pack)."""

from . import lock

lock.install()  # first: the operator lock must be in place even if a node module below fails to import

from . import nodes_abo, nodes_conceptgate, nodes_geom, nodes_toy, nodes_uce  # noqa: E402
from ..adapters.progress import register_host_bar  # noqa: E402


def _comfy_bar(total):  # long work inside a node (calibration on first use, training) shows on that node
    import comfy.utils

    return comfy.utils.ProgressBar(total)


register_host_bar(_comfy_bar)

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _module in (nodes_conceptgate, nodes_uce, nodes_toy, nodes_geom, nodes_abo):
    for _cls in getattr(_module, "NODES", ()):  # V3 nodes (io.ComfyNode): id and display name from the schema
        _schema = _cls.GET_SCHEMA()
        NODE_CLASS_MAPPINGS[_schema.node_id] = _cls
        NODE_DISPLAY_NAME_MAPPINGS[_schema.node_id] = _schema.display_name
    NODE_CLASS_MAPPINGS.update(getattr(_module, "NODE_CLASS_MAPPINGS", {}))  # V1 nodes
    NODE_DISPLAY_NAME_MAPPINGS.update(getattr(_module, "NODE_DISPLAY_NAME_MAPPINGS", {}))

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

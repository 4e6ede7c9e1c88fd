"""ComfyUI nodes of ConceptGate (imported only when ComfyUI loads the pack), on ComfyUI's V3 schema:
``comfy_entrypoint`` hands ComfyUI's custom-node loader the ``io.ComfyNode`` classes of every node file."""

from . import lock

lock.install()  # first: the operator lock must be in place even if a node module below fails to import

from comfy_api.latest import ComfyExtension, io  # noqa: E402

from . import nodes_abo, nodes_conceptgate, nodes_geom, nodes_geom_regional, nodes_toy, nodes_uce  # noqa: E402
from ..adapters.progress import register_host_bar  # noqa: E402


def _comfy_bar(total):  # long work inside a node (calibration on first use, training) shows on that node
    import comfy.utils

    return comfy.utils.ProgressBar(total)


register_host_bar(_comfy_bar)

NODES = [*nodes_conceptgate.NODES, *nodes_uce.NODES, *nodes_toy.NODES, *nodes_geom.NODES, *nodes_geom_regional.NODES, *nodes_abo.NODES]


class ConceptGateExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> ConceptGateExtension:
    """What ComfyUI's loader (``nodes.load_custom_node``) calls for a pack without ``NODE_CLASS_MAPPINGS``."""
    return ConceptGateExtension()


__all__ = ["NODES", "comfy_entrypoint"]

"""The ConceptGate nodes as ComfyUI lists them (issue 15: ComfyUI's V3 schema, ``comfy_api.latest.io``).

A saved graph (and every file in example_workflows/) stores node ids, widget values by position, and the
socket types of its links; the V3 nodes must show ComfyUI exactly what the V1 nodes did. INTERFACE is
what the V1 nodes listed (node id: display name, output node, inputs in order as (section, name, type,
default), output types, output names), taken from ComfyUI's node info before the move."""

import asyncio

import pytest

import test_comfy_executor
from test_comfy_executor import graph

C = "CONCEPTGATE_ERASER"
S = "CONCEPTGATE_STACK"
INTERFACE = {
    "ConceptGateAboEraser": ("All-but-One Eraser (guidance)", False, [
        ("r", "erase", "STRING", "triangle"), ("r", "alternative", "STRING", "square"), ("o", "save_name", "STRING", ""),
        ("o", "in_prompt", "BOOLEAN", False)],
        [C, "STRING"], ["eraser", "info"]),
    "ConceptGateAboGuidance": ("All-but-One Guidance (KSampler)", True, [
        ("r", "model", "MODEL", None), ("r", "clip", "CLIP", None), ("r", "stack", S, None),
        ("o", "positive", "CONDITIONING", None)],
        ["MODEL", "STRING"], ["model", "gate_report"]),
    "ConceptGateAboGuider": ("All-but-One Guider", False, [
        ("r", "model", "MODEL", None), ("r", "clip", "CLIP", None), ("r", "stack", S, None),
        ("r", "positive", "CONDITIONING", None), ("r", "negative", "CONDITIONING", None), ("r", "cfg", "FLOAT", 8.0)],
        ["GUIDER", "STRING"], ["guider", "gate_report"]),
    "ConceptGateAddToStack": ("Add to Eraser Stack", False, [
        ("r", "eraser", C, None), ("r", "enabled", "BOOLEAN", True), ("r", "strength", "FLOAT", 1.0),
        ("r", "gate", "COMBO", "context"), ("r", "cond_only", "BOOLEAN", False), ("o", "stack", S, None),
        ("o", "threshold", "FLOAT", 0.0), ("o", "best_effort", "BOOLEAN", False)],
        [S], ["stack"]),
    "ConceptGateApplyStack": ("Apply Eraser Stack", True, [
        ("r", "model", "MODEL", None), ("r", "clip", "CLIP", None), ("r", "stack", S, None),
        ("r", "positive", "CONDITIONING", None), ("r", "mode", "COMBO", "per-row"), ("r", "combine", "COMBO", "additive"),
        ("o", "negative", "CONDITIONING", None), ("o", "allow_other_base", "BOOLEAN", False)],
        ["MODEL", "STRING", "CONDITIONING"], ["model", "gate_report", "negative"]),
    "ConceptGateEraseConcepts": ("Erase Concepts (UCE / RECE)", True, [
        ("r", "model", "MODEL", None), ("r", "clip", "CLIP", None), ("r", "method", "COMBO", "UCE"),
        ("r", "concepts", "STRING", ""), ("r", "concept_type", "COMBO", "object"), ("r", "guide", "STRING", ""),
        ("r", "preserve", "STRING", ""), ("r", "epochs", "INT", 0), ("r", "lam", "FLOAT", 0.5),
        ("r", "strength", "FLOAT", 1.0), ("o", "lam_reg", "FLOAT", 0.0), ("o", "erase_scale", "FLOAT", 1.0),
        ("o", "preserve_scale", "FLOAT", 0.0), ("o", "convention", "COMBO", "aligned_tail"),
        ("o", "save_name", "STRING", ""),
        # added after the V1 listing (issue 17's in-context edit), last so saved graphs keep their widget order
        ("o", "synonyms", "STRING", ""), ("o", "context", "COMBO", "bare")],
        ["MODEL", C, "STRING"], ["model", "eraser", "report"]),
    "ConceptGateGeomNegative": ("Geom-Erasing Negative (ConceptGate)", False, [
        ("r", "clip", "CLIP", None), ("r", "source", "COMBO", None), ("r", "token_set", "COMBO", "observed"),
        ("r", "top_k", "INT", 8), ("r", "overflow", "COMBO", "drop"), ("o", "negative", "CONDITIONING", None),
        ("o", "eraser", C, None), ("o", "stack", S, None)],
        ["CONDITIONING", "STRING"], ["negative", "info"]),
    "ConceptGateGeomRegional": ("Geom-Erasing Regional Negation (ConceptGate)", False, [
        ("r", "model", "MODEL", None), ("r", "clip", "CLIP", None), ("r", "source", "COMBO", None),
        ("r", "strength", "FLOAT", 2.0), ("o", "eraser", C, None)],
        ["MODEL", "STRING"], ["model", "info"]),
    "ConceptGateLoadEraser": ("Load Eraser (ConceptGate)", False, [
        ("r", "eraser_name", "COMBO", None), ("o", "concepts", "STRING", "")],
        [C, "STRING"], ["eraser", "info"]),
    "ConceptGateLoadStack": ("Load Eraser Stack (manifest)", False, [("r", "manifest", "COMBO", None)],
                             [S, "STRING"], ["stack", "info"]),
    "ConceptGateTextEncode": ("CLIP Text Encode (ConceptGate)", False, [("r", "text", "STRING", None), ("r", "clip", "CLIP", None)],
                              ["CONDITIONING"], ["CONDITIONING"]),
    "ConceptGateToyModelLoader": ("Load Toy Model (ConceptGate)", False, [], ["MODEL", "CLIP", "VAE"], ["MODEL", "CLIP", "VAE"]),
}
eraser_dir = test_comfy_executor.eraser_dir  # its fixture: tri.safetensors in models/conceptgate

V3_NODES = set(INTERFACE)  # every node is on the V3 schema


def node_info(name):
    """What ComfyUI's server lists for the node (``/object_info``), for a V3 or a V1 class."""
    import nodes
    from comfy_api.internal import _ComfyNodeInternal

    cls = nodes.NODE_CLASS_MAPPINGS[name]
    if issubclass(cls, _ComfyNodeInternal):
        return cls.GET_NODE_INFO_V1()
    return {"input": cls.INPUT_TYPES(), "output": list(cls.RETURN_TYPES),
            "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
            "output_tooltips": list(getattr(cls, "OUTPUT_TOOLTIPS", [])), "category": cls.CATEGORY,
            "display_name": nodes.NODE_DISPLAY_NAME_MAPPINGS[name], "description": cls.DESCRIPTION,
            "output_node": bool(getattr(cls, "OUTPUT_NODE", False))}


@pytest.mark.parametrize("name", sorted(INTERFACE))
def test_saved_graphs_see_the_same_node(executor, name):
    display, output_node, inputs, outputs, output_names = INTERFACE[name]
    info = node_info(name)
    listed = []
    for section in ("required", "optional"):
        for arg, (kind, *opts) in info["input"].get(section, {}).items():
            listed.append((section[0], arg, "COMBO" if isinstance(kind, list) else kind, (opts[0] if opts else {}).get("default")))
    assert listed == inputs
    assert (info["display_name"], info["output_node"], list(info["output"]), list(info["output_name"])) == \
        (display, output_node, outputs, output_names)
    assert info["category"] == "ConceptGate" and info["description"]
    for section in ("required", "optional"):
        for arg, (_, *opts) in info["input"].get(section, {}).items():
            assert opts and opts[0].get("tooltip"), f"{name}.{arg} has no tooltip"
    assert len(info["output_tooltips"]) == len(outputs) and all(info["output_tooltips"]), f"{name}: an output has no tooltip"


def test_nodes_are_v3(executor):
    import nodes
    from comfy_api.latest import io

    for name in sorted(V3_NODES):
        cls = nodes.NODE_CLASS_MAPPINGS[name]
        assert issubclass(cls, io.ComfyNode), name
        assert cls.GET_SCHEMA().node_id == name


def test_comfyui_registers_the_pack_through_comfy_entrypoint(executor):
    """ComfyUI's loader reads NODE_CLASS_MAPPINGS when a pack has one and comfy_entrypoint only otherwise: the
    pack ComfyUI imported offers only the entry point, whose node list is what ComfyUI registered."""
    import sys

    import nodes
    from comfy_host import REPO

    pack = sys.modules[REPO.replace(".", "_x_")]  # the module ComfyUI's loader made of the checkout
    assert getattr(pack, "NODE_CLASS_MAPPINGS", None) is None and callable(pack.comfy_entrypoint)
    listed = asyncio.run(asyncio.run(pack.comfy_entrypoint()).get_node_list())
    assert sorted(cls.GET_SCHEMA().node_id for cls in listed) == sorted(INTERFACE)
    for cls in listed:
        assert nodes.NODE_CLASS_MAPPINGS[cls.GET_SCHEMA().node_id] is cls
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[cls.GET_SCHEMA().node_id] == INTERFACE[cls.GET_SCHEMA().node_id][0]


def rejected(prompt) -> dict:
    """ComfyUI's own validation of an API-format prompt: {node id: [error details]} ({} when it is accepted)."""
    import execution

    valid = asyncio.run(execution.validate_prompt("schema-test", prompt, None))
    return {k: [e["details"] for e in v["errors"]] for k, v in valid[3].items()}


def test_a_file_that_is_not_there_is_refused_before_running(executor):
    """ComfyUI 0.3.75 does not check a V3 dropdown's value itself: the node's validate_inputs does."""
    g = graph()
    g["load"]["inputs"]["eraser_name"] = "missing.safetensors"
    errors = rejected(g)
    assert list(errors) == ["load"] and len(errors["load"]) == 1
    assert errors["load"][0].startswith("eraser_name - eraser_name: 'missing.safetensors' not in ")


@pytest.mark.usefixtures("eraser_dir")
def test_a_value_no_dropdown_offers_is_refused_before_running(executor):
    g = graph()
    g["apply"]["inputs"]["mode"] = "sideways"
    # ComfyUI files the message under every input that validate_inputs takes (mode and combine)
    assert rejected(g) == {"apply": [f"{name} - mode: 'sideways' not in ['per-row', 'batch']" for name in ("mode", "combine")]}
    g["apply"]["inputs"]["combine"] = "multiply"
    assert "combine: 'multiply' not in ['additive', 'official']" in rejected(g)["apply"][0]
    assert rejected(graph()) == {}

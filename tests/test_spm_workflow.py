"""example_workflows/spm_*.json: well-formed ComfyUI UI workflows using the ConceptGate nodes with every widget."""

import glob
import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(glob.glob(os.path.join(REPO, "example_workflows", "spm_*.json")))


def widget_names(cls):
    spec = cls.INPUT_TYPES()
    return [a for s in ("required", "optional") for a, (t, *_) in spec.get(s, {}).items()
            if isinstance(t, (list, tuple)) or t in ("STRING", "INT", "FLOAT", "BOOLEAN", "COMBO")]


def test_spm_workflows_are_consistent_graphs():
    assert FILES
    for f in FILES:
        wf = json.load(open(f))
        by_id = {n["id"]: n for n in wf["nodes"]}
        assert wf["last_node_id"] == max(by_id) and wf["last_link_id"] == max(l[0] for l in wf["links"])
        types = {n["type"] for n in wf["nodes"]}
        assert {"ConceptGateToyModelLoader", "ConceptGateLoadEraser", "ConceptGateAddToStack",
                "ConceptGateApplyStack", "ConceptGateTextEncode"} <= types
        for lid, src, sslot, dst, dslot, typ in wf["links"]:
            out, inp = by_id[src]["outputs"][sslot], by_id[dst]["inputs"][dslot]
            assert lid in out["links"] and inp["link"] == lid and out["type"] == inp["type"] == typ, (f, lid)
        for n in wf["nodes"]:
            for inp in n.get("inputs", []):
                if inp["link"] is not None:
                    assert any(l[0] == inp["link"] for l in wf["links"])


def test_spm_workflows_fill_every_widget(comfy):
    from conceptgate.nodes.nodes_conceptgate import NODES

    classes = {cls.GET_SCHEMA().node_id: cls for cls in NODES}

    for f in FILES:
        wf = json.load(open(f))
        for n in wf["nodes"]:
            cls = classes.get(n["type"])
            if cls is None:
                continue
            assert len(n["widgets_values"]) == len(widget_names(cls)), (f, n["type"], n["widgets_values"])
            required = [k for k, (t, *_) in cls.INPUT_TYPES()["required"].items() if k not in widget_names(cls)]
            linked = {i["name"] for i in n["inputs"] if i["link"] is not None}
            assert set(required) <= linked, (f, n["type"], required)
        loads = [n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "ConceptGateLoadEraser"]
        for name in loads:  # the shipped membranes the workflow names exist
            assert os.path.exists(os.path.join(REPO, "toyworld", "erasers", name)), name

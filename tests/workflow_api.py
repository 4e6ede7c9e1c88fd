"""ComfyUI's UI-format workflow (what the example_workflows/*.json files are) to the API format that
``/prompt`` and ``PromptExecutor`` take, the way the frontend does it on "Queue": widget values are
matched, in order, to the node's widget inputs (seed widgets carry an extra 'control after generate'
value), links become ``[source id, output slot]``; UI-only nodes (notes) are dropped."""

UI_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
CONTROL = {"fixed", "randomize", "increment", "decrement"}
WIDGET_KINDS = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def widget_names(cls) -> list[str]:
    spec = cls.INPUT_TYPES()
    return [name for section in ("required", "optional") for name, (kind, *_) in spec.get(section, {}).items()
            if isinstance(kind, (list, tuple)) or kind in WIDGET_KINDS]


def to_api(workflow: dict, node_classes: dict) -> dict:
    links = {l[0]: l for l in workflow.get("links", [])}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in UI_ONLY or node.get("mode", 0) in (2, 4):  # muted / bypassed
            continue
        cls = node_classes[node["type"]]
        inputs = {}
        linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        names = widget_names(cls)
        i = 0
        for name in names:
            if i >= len(values):
                break
            if name in linked:
                i += 1
                continue
            inputs[name] = values[i]
            i += 1
            if i < len(values) and values[i] in CONTROL and name in ("seed", "noise_seed"):
                i += 1  # the seed widget's 'control after generate' companion
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                _, src, slot = links[inp["link"]][:3]
                inputs[inp["name"]] = [str(src), slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt

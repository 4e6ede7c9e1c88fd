"""Draws an example workflow as ComfyUI's canvas shows it, with the images and gate report it produced, for the
README (``docs/example_graph.png``). The workflow is run first in the vendored ComfyUI's executor on the toy
model; the picture is then drawn from the workflow file (node positions, sizes, sockets, widget values and
links as saved by the frontend) in ComfyUI's dark colours. It is a drawing, not a browser screenshot: no
machine of this project has a browser to run the frontend in.

    python tools/graph_picture.py [example_workflows/toy_one_stack_of_four.json] [docs/example_graph.png]
"""

import json
import os
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

TITLE_H, SLOT_H, PAD = 30, 20, 12
BACKGROUND, GRID, NODE, TITLE, TEXT, DIM = "#202020", "#262626", "#353535", "#222222", "#dddddd", "#999999"
# socket colours of ComfyUI's default palette; ours get their own
TYPE_COLOURS = {"MODEL": "#b39ddb", "CLIP": "#ffd500", "VAE": "#ff6e6e", "CONDITIONING": "#ffa931",
                "LATENT": "#ff9cf9", "IMAGE": "#64b5f6", "STRING": "#77dd77", "CONCEPTGATE_STACK": "#4dd0e1",
                "CONCEPTGATE_ERASER": "#26a69a"}


def _font(size, bold=False):
    from PIL import ImageFont

    for path in (f"/usr/share/fonts/truetype/dejavu/DejaVuSans{'-Bold' if bold else ''}.ttf",
                 f"/usr/share/fonts/truetype/DejaVuSans{'-Bold' if bold else ''}.ttf"):
        if os.path.exists(path):
            return ImageFont.truetype(path, size)
    return ImageFont.load_default(size=size)


def run_workflow(path):
    """The workflow's preview images (PIL) per node id and the text its nodes showed."""
    os.environ.setdefault("CONCEPTGATE_POLICY", "")
    from PIL import Image

    from comfy_host import Executor
    from workflow_api import to_api

    executor = Executor()
    import folder_paths
    import nodes

    outputs = executor.run(to_api(json.load(open(path)), nodes.NODE_CLASS_MAPPINGS))
    images, texts = {}, {}
    for node_id, out in outputs.items():
        for img in out.get("images", []):
            src = os.path.join(folder_paths.get_directory_by_type(img.get("type", "temp")), img.get("subfolder", ""),
                               img["filename"])
            images.setdefault(str(node_id), []).append(Image.open(src).convert("RGB"))
        if out.get("text"):
            texts[str(node_id)] = "\n".join(str(t) for t in out["text"])
    return images, texts, nodes


def draw(workflow, images, texts, node_classes, display_names):
    from PIL import Image, ImageDraw

    from workflow_api import widget_names

    small, body, bold = _font(12), _font(13), _font(14, bold=True)
    boxes = {n["id"]: (n["pos"][0], n["pos"][1] - TITLE_H, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in workflow["nodes"]}
    x0 = min(b[0] for b in boxes.values()) - 40
    y0 = min(b[1] for b in boxes.values()) - 40
    w = int(max(b[2] for b in boxes.values()) - x0 + 40)
    h = int(max(b[3] for b in boxes.values()) - y0 + 40)
    # what nodes showed after the run (the gate report), in a panel under the canvas: the frontend grows the
    # node to fit it, which the saved layout does not know
    panel = [(display_names.get(by_type, by_type), text) for nid, text in texts.items()
             for by_type in [next(n["type"] for n in workflow["nodes"] if str(n["id"]) == nid)]]
    panel_lines = []
    for title, text in panel:
        panel_lines.append(f"{title} shows after the run:")
        panel_lines += ["    " + line for para in text.split("\n") for line in textwrap.wrap(para, 150)]
    panel_h = 20 + 18 * len(panel_lines) if panel_lines else 0
    img = Image.new("RGB", (w, h + panel_h), BACKGROUND)
    d = ImageDraw.Draw(img)
    for gx in range(0, w, 40):
        d.line([(gx, 0), (gx, h)], fill=GRID)
    for gy in range(0, h, 40):
        d.line([(0, gy), (w, gy)], fill=GRID)
    if panel_lines:
        d.rectangle([0, h, w, h + panel_h], fill="#181818")
        d.multiline_text((40, h + 10), "\n".join(panel_lines), font=body, fill="#c8e6c9", spacing=4)

    def at(x, y):
        return (x - x0, y - y0)

    def slot(node, i, out):
        x = node["pos"][0] + (node["size"][0] - 10 if out else 10)
        return at(x, node["pos"][1] + PAD + i * SLOT_H + 6)

    by_id = {n["id"]: n for n in workflow["nodes"]}
    for link in workflow.get("links", []):  # links under the nodes, as bezier curves
        _, src, src_slot, dst, dst_slot, kind = link[:6]
        (ax, ay), (bx, by) = slot(by_id[src], src_slot, True), slot(by_id[dst], dst_slot, False)
        dx = max(40, abs(bx - ax) / 2)
        pts = []
        for k in range(41):
            t = k / 40
            x = (1 - t) ** 3 * ax + 3 * (1 - t) ** 2 * t * (ax + dx) + 3 * (1 - t) * t * t * (bx - dx) + t ** 3 * bx
            y = (1 - t) ** 3 * ay + 3 * (1 - t) ** 2 * t * ay + 3 * (1 - t) * t * t * by + t ** 3 * by
            pts.append((x, y))
        d.line(pts, fill=TYPE_COLOURS.get(kind, "#aaaaaa"), width=3)

    for node in workflow["nodes"]:
        bx0, by0, bx1, by1 = boxes[node["id"]]
        kind = node["type"]
        note = kind in ("Note", "MarkdownNote")
        d.rounded_rectangle([at(bx0, by0), at(bx1, by1)], radius=8, fill="#353520" if note else NODE,
                            outline="#111111")
        d.rounded_rectangle([at(bx0, by0), at(bx1, by0 + TITLE_H)], radius=8, fill="#2a2a18" if note else TITLE)
        d.ellipse([at(bx0 + 10, by0 + 10), at(bx0 + 20, by0 + 20)], fill=DIM)
        d.text(at(bx0 + 28, by0 + 7), node.get("title") or display_names.get(kind, kind), font=bold, fill=TEXT)
        x, y = node["pos"]
        if note:
            width = max(20, int(node["size"][0] / 7.2))
            lines = [line for para in node["widgets_values"][0].split("\n") for line in textwrap.wrap(para, width) or [""]]
            d.multiline_text(at(x + PAD, y + PAD), "\n".join(lines), font=small, fill=TEXT, spacing=3)
            continue
        ins, outs = node.get("inputs", []), node.get("outputs", [])
        for i, s in enumerate(ins):
            cx, cy = slot(node, i, False)
            d.ellipse([cx - 5, cy - 5, cx + 5, cy + 5], fill=TYPE_COLOURS.get(s["type"], "#aaaaaa"))
            d.text((cx + 10, cy - 8), s["name"], font=small, fill=DIM)
        for i, s in enumerate(outs):
            cx, cy = slot(node, i, True)
            d.ellipse([cx - 5, cy - 5, cx + 5, cy + 5], fill=TYPE_COLOURS.get(s["type"], "#aaaaaa"))
            d.text((cx - 10, cy - 8), s["name"], font=small, fill=DIM, anchor="ra")
        row = y + PAD + max(len(ins), len(outs)) * SLOT_H + 4
        values = [v for v in node.get("widgets_values") or [] if v not in ("fixed", "randomize", "increment", "decrement")]
        names = [n for n in widget_names(node_classes[kind]) if n not in {s["name"] for s in ins if s.get("link")}] \
            if kind in node_classes else [""] * len(values)
        for name, value in zip(names, values):  # widgets: a dark pill with name and value, as the canvas draws them
            d.rounded_rectangle([at(x + 10, row), at(x + node["size"][0] - 10, row + 20)], radius=10, fill="#222222")
            d.text(at(x + 20, row + 3), str(name), font=small, fill=DIM)
            text = str(value) if len(str(value)) < 40 else str(value)[:37] + "..."
            d.text(at(x + node["size"][0] - 20, row + 3), text, font=small, fill=TEXT, anchor="ra")
            row += 24
        key = str(node["id"])
        if key in images:  # the previews, fitted into the node body as the frontend shows them
            tiles = images[key]
            side = int(min((node["size"][0] - 20) / 2, (node["size"][1] - 20) / ((len(tiles) + 1) // 2)))
            for k, tile in enumerate(tiles[:4]):
                px, py = at(x + 10 + (k % 2) * side, y + 10 + (k // 2) * side)
                img.paste(tile.resize((side - 4, side - 4), Image.NEAREST), (int(px), int(py)))
    return img


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = argv[0] if argv else os.path.join(ROOT, "example_workflows", "toy_one_stack_of_four.json")
    out = argv[1] if len(argv) > 1 else os.path.join(ROOT, "docs", "example_graph.png")
    images, texts, nodes = run_workflow(path)
    picture = draw(json.load(open(path)), images, texts, nodes.NODE_CLASS_MAPPINGS,
                   getattr(nodes, "NODE_DISPLAY_NAME_MAPPINGS", {}))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    picture.save(out, optimize=True)
    print(f"wrote {out} ({picture.size[0]}x{picture.size[1]}; images from {', '.join(images) or 'no node'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Renders a thumbnail next to every example workflow (``example_workflows/NAME.jpg``, the name ComfyUI's
template browser looks for): each workflow is converted to the API format, run in the vendored ComfyUI's
executor on the toy model, and up to four of its preview images are saved side by side, upscaled 2x.

    python tools/example_thumbnails.py            # from the checkout, with the test extras installed
    python tools/example_thumbnails.py geom_toy_regional   # only these workflows (names without .json)
"""

import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


def main(names=()) -> int:
    os.environ.setdefault("CONCEPTGATE_POLICY", "")
    import numpy as np
    from PIL import Image

    from comfy_host import Executor
    from workflow_api import to_api

    executor = Executor()
    import folder_paths
    import nodes

    paths = sorted(glob.glob(os.path.join(ROOT, "example_workflows", "*.json")))
    if names:
        paths = [p for p in paths if os.path.splitext(os.path.basename(p))[0] in names]
        if len(paths) != len(set(names)):
            print(f"unknown workflow name among {', '.join(names)}", file=sys.stderr)
            return 2
    for path in paths:
        outputs = executor.run(to_api(json.load(open(path)), nodes.NODE_CLASS_MAPPINGS))
        images = [img for o in outputs.values() for img in o.get("images", [])]
        if not images:
            print(f"{os.path.basename(path)}: no image")
            continue
        tiles = []
        for img in images[:4]:  # a batch's previews, side by side
            src = os.path.join(folder_paths.get_directory_by_type(img.get("type", "temp")), img.get("subfolder", ""),
                               img["filename"])
            tiles.append(np.asarray(Image.open(src).convert("RGB")))
        strip = np.concatenate(tiles, axis=1)
        h = strip.shape[0]
        out = os.path.splitext(path)[0] + ".jpg"
        Image.fromarray(strip).resize((strip.shape[1] * 2, h * 2), Image.NEAREST).save(out, quality=90)
        print(f"{os.path.basename(out)}: {len(images)} image(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

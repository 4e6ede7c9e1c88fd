"""Print UA / IRA / CRA / garbage per config from ``bench_spm run`` JSON files (one line each).

    python -m conceptgate.toyworld.erasers.summarise_spm DIR
"""

from __future__ import annotations

import glob
import json
import os
import sys


def lines(out_dir: str) -> list[str]:
    rows = []
    for path in sorted(glob.glob(os.path.join(out_dir, "*.json"))):
        with open(path) as f:
            d = json.load(f)
        if "targets" not in d:
            continue
        cells = []
        for t in d["targets"]:
            for set_name in ("keyword", "synonym", "heldout"):
                s = t["sets"].get(set_name)
                if s:
                    cells.append(f"{t['keyword'][:4]}/{set_name[:3]} UA {s['ua']['value']:.2f} IRA {s['ira']['value']:.2f} "
                                 f"CRA {s['cra']['value']:.2f} garb {s['garbage_rate']['value']:.2f}")
        rows.append(f"{os.path.basename(path)[:-5]:24s} " + " | ".join(cells))
    return rows


if __name__ == "__main__":
    print("\n".join(lines(sys.argv[1])))

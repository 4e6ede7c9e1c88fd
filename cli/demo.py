"""``python -m conceptgate demo``: the toy model, every shipped eraser and the stack, as a grid with metrics."""

from __future__ import annotations

import os
import time


def cmd_demo(args) -> int:
    t0 = time.perf_counter()
    import torch

    from ..bench.demo import run_demo

    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    run_demo(out_dir=args.out, steps=args.steps, seed=args.seed)
    print(f"demo: {time.perf_counter() - t0:.1f} s in all (imports included)", flush=True)
    return 0


OUT_DIR = "conceptgate-demo"  # conceptgate.bench.demo.OUT_DIR (not imported here: --help needs no torch)


def add_cli(subparsers, path=None):
    p = subparsers.add_parser(
        "demo", help="every mechanism on the embedded toy model (UCE, RECE, the shipped SPM membranes, All-but-One "
                     "adapter and Geom tokens, and the whole stack): grid + metrics into ./conceptgate-demo/",
        description="Runs on the CPU in about half a minute on two quiet cores. Computes a UCE edit (triangle) and a "
                    "RECE edit (striped) of the embedded toy model, loads the erasers shipped in toyworld/erasers/ "
                    "(SPM membranes for triangle and striped, the All-but-One adapter triangle -> square, the "
                    "Geom-Erasing watermark tokens) and stacks them all. It draws one image per prompt (rows: each "
                    "target, a synonym of it, unrelated prompts) and eraser (columns: no erasure, each eraser, the "
                    "whole stack) with each eraser's gate, and scores every column on every row: the column's own "
                    "targets erased, everything else kept. Writes grid.png, metrics.json, the edits' files and a "
                    "stack manifest.")
    p.add_argument("--out", default=OUT_DIR, help="output folder (default: ./conceptgate-demo)")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps (default 25, the toy model's default)")
    p.add_argument("--seed", type=int, default=1000)
    p.set_defaults(func=cmd_demo)
    return p

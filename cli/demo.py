"""``python -m conceptgate demo``: the toy model, every shipped eraser and the stack, as a grid with metrics."""

from __future__ import annotations

import os


def cmd_demo(args) -> int:
    import torch

    from ..bench.demo import run_demo

    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    run_demo(out_dir=args.out, steps=args.steps, seed=args.seed)
    return 0


def add_cli(subparsers):
    from ..bench.demo import OUT_DIR

    p = subparsers.add_parser("demo", help="every mechanism on the embedded toy model (UCE, RECE, the shipped SPM "
                                           "membranes, All-but-One adapter and Geom tokens, and the whole stack): "
                                           "grid + metrics into ./conceptgate-demo/")
    p.add_argument("--out", default=OUT_DIR, help="output folder (default: ./conceptgate-demo)")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps (default 25, the toy model's default)")
    p.add_argument("--seed", type=int, default=1000)
    p.set_defaults(func=cmd_demo)
    return p

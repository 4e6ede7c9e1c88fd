"""``python -m conceptgate bench ...``: measured numbers into BENCHMARKS.md (and JSON)."""

from __future__ import annotations

import os

from ..bench.report import ROOT


def run_speed(args) -> int:
    json_path = args.json or os.path.join(ROOT, "benchmarks.json")
    if args.what in ("spm", "all"):
        from ..bench.speed import bench_spm

        _, body = bench_spm(steps=args.steps, latent=args.latent, repeats=args.repeats, json_path=json_path)
        print(body)
    if args.what in ("uce", "all"):
        from ..bench.speed_uce import bench_uce_rece

        out = bench_uce_rece(json_path=json_path, repeats=args.repeats)
        print(out[1] if isinstance(out, tuple) else out)
    return 0


def run_rece_attack(args) -> int:
    from ..bench.rece_attack import bench_rece_attack

    _, body = bench_rece_attack(concept=args.concept, epochs=args.epochs, seeds=args.seeds,
                                json_path=args.json or os.path.join(ROOT, "benchmarks.json"))
    print(body)
    return 0


def add_cli(subparsers):
    p = subparsers.add_parser("bench", help="run benchmarks and write BENCHMARKS.md")
    sub = p.add_subparsers(dest="bench_cmd", required=True)
    s = sub.add_parser("speed", help="speed on full-size architectures with random weights (CPU or GPU)")
    s.add_argument("what", nargs="?", default="all", choices=["spm", "uce", "all"])
    s.add_argument("--steps", type=int, default=20, help="sampling steps (spm)")
    s.add_argument("--latent", type=int, default=32, help="latent side (spm); 32 = 256x256 pixels")
    s.add_argument("--repeats", type=int, default=2)
    s.add_argument("--json", default=None, help="also write the numbers here (default: benchmarks.json)")
    s.set_defaults(func=run_speed)
    a = sub.add_parser("rece-attack", help="do RECE's adversarial embeddings regenerate the concept (toy world)?")
    a.add_argument("--concept", default="triangle", help="a toy-world object")
    a.add_argument("--epochs", type=int, default=3)
    a.add_argument("--seeds", type=int, default=8)
    a.add_argument("--json", default=None)
    a.set_defaults(func=run_rece_attack)
    from ..bench.attack import add_cli as add_attack_cli
    from ..bench.gate import add_cli as add_gate_cli

    add_gate_cli(sub)
    add_attack_cli(sub)
    from ..bench.quality import add_quality_cli

    add_quality_cli(sub)
    from ..bench.abo import add_abo_cli

    add_abo_cli(sub)
    from ..bench.geom import add_cli as add_geom_cli

    add_geom_cli(sub)
    return p

"""``python -m conceptgate bench ...``: measured numbers into BENCHMARKS.md (and JSON)."""

from __future__ import annotations

import importlib
import os

from .common import add_lazy


def _default_json() -> str:
    from ..bench.report import ROOT

    return os.path.join(ROOT, "benchmarks.json")


def run_speed(args) -> int:
    json_path = args.json or _default_json()
    if args.what in ("spm", "all"):
        from ..bench.speed import bench_spm

        _, body = bench_spm(steps=args.steps, latent=args.latent, repeats=args.repeats, json_path=json_path)
        print(body)
    if args.what in ("mixed", "all"):
        from ..bench.speed_mixed import bench_mixed

        _, body = bench_mixed(steps=args.steps, repeats=max(args.repeats, 3), json_path=json_path)
        print(body)
    if args.what in ("uce", "all"):
        from ..bench.speed_uce import bench_uce_rece

        out = bench_uce_rece(json_path=json_path, repeats=args.repeats)
        print(out[1] if isinstance(out, tuple) else out)
    if args.what in ("lora", "all"):
        from ..bench.speed_lora import bench_lora

        _, body = bench_lora(iterations=args.iterations, json_path=json_path)
        print(body)
    return 0


def run_rece_attack(args) -> int:
    from ..bench.rece_attack import bench_rece_attack

    _, body = bench_rece_attack(concept=args.concept, epochs=args.epochs, seeds=args.seeds,
                                json_path=args.json or _default_json())
    print(body)
    return 0


def _add_speed(sub):
    s = sub.add_parser("speed", help=HELP["speed"])
    s.add_argument("what", nargs="?", default="all", choices=["spm", "uce", "mixed", "lora", "all"],
                   help="spm: membrane stack on full SD1.5; uce: UCE/RECE solves; mixed: one stack of four kinds on the "
                        "toy model against the sum of its parts; lora: the trainers' peft and hooks backends")
    s.add_argument("--steps", type=int, default=20, help="sampling steps (spm)")
    s.add_argument("--latent", type=int, default=32, help="latent side (spm); 32 = 256x256 pixels")
    s.add_argument("--repeats", type=int, default=2)
    s.add_argument("--iterations", type=int, default=40, help="training iterations per backend (lora)")
    s.add_argument("--json", default=None, help="also write the numbers here (default: benchmarks.json)")
    s.set_defaults(func=run_speed)
    return s


def _add_rece_attack(sub):
    a = sub.add_parser("rece-attack", help=HELP["rece-attack"])
    a.add_argument("--concept", default="triangle", help="a toy-world object")
    a.add_argument("--epochs", type=int, default=3)
    a.add_argument("--seeds", type=int, default=8)
    a.add_argument("--json", default=None)
    a.set_defaults(func=run_rece_attack)
    return a


def _from_module(module: str, function: str):
    """The benchmark module's own ``add_...cli(sub)`` (the module imports torch: only when named)."""
    def build(sub):
        return getattr(importlib.import_module(f"..bench.{module}", __package__), function)(sub)
    return build


# name: one-line help (the listing of 'bench --help'), and what builds the sub-command's parser
HELP = {
    "speed": "speed on full-size architectures with random weights (CPU or GPU)",
    "rece-attack": "do RECE's adversarial embeddings regenerate the concept (toy world)?",
    "gate": "fire rates of every gate rule on the toy world (keyword ... unrelated, length sweep, Ring-A-Bell "
            "vectors) into BENCHMARKS.md",
    "attack": "attack prompts against every toy eraser: base, default gate, always-on",
    "trajectory": "would a generation-aware (trajectory) gate pay for itself? fire rates, AUC, cost (toy world)",
    "quality": "erasure quality on the toy world (UA/IRA/CRA, gates, judges) -> BENCHMARKS.md",
    "abo": "All-but-One guidance on the toy world: replacement, UA/IRA/CRA, layout, speed",
    "geom": "Geom-Erasing in the toy world: watermark rate, accuracy, Fréchet, cost",
    "headline": "re-render BENCHMARKS.md's headline table (release tier vs the targets) from benchmarks.json",
    "ceiling": "the base model asked for each eraser's alternative directly: the ceiling of replacement+attrs "
               "(release parts' prompts and seeds)",
}
BUILDERS = {
    "speed": _add_speed,
    "rece-attack": _add_rece_attack,
    "gate": _from_module("gate", "add_cli"),
    "attack": _from_module("attack", "add_cli"),
    "trajectory": _from_module("trajectory", "add_cli"),
    "quality": _from_module("quality", "add_quality_cli"),
    "abo": _from_module("abo", "add_abo_cli"),
    "geom": _from_module("geom", "add_cli"),
    "headline": _from_module("headline", "add_cli"),
    "ceiling": _from_module("ceiling", "add_cli"),
}


def add_cli(subparsers, path=None):
    p = subparsers.add_parser("bench", help="run benchmarks and write BENCHMARKS.md")
    sub = p.add_subparsers(dest="bench_cmd", required=True)
    for name, build in BUILDERS.items():
        add_lazy(sub, name, HELP[name], build, path, "bench")
    return p

"""``python -m conceptgate inspect|convert|geom-negation``: what an eraser file holds, pickles to safetensors,
and a Geom-Erasing file's negation rule (for hosts that read the rule from the file: the webuis, stacks)."""

from __future__ import annotations

import json
import sys


def _candidates() -> dict:
    """The models an eraser's shapes are compared with: SD1.x, SD2.x, SDXL and the embedded toy model."""
    import os

    from ..adapters.fingerprint import TEXT_WIDTHS
    from ..adapters.naming import layout_from_diffusers_config, reference_layout
    from ..toyworld import WEIGHTS_DIR
    from ..toyworld.models import ARCH

    out = {f: (reference_layout(f), TEXT_WIDTHS.get(f)) for f in ("sd1", "sd2", "sdxl")}
    config = os.path.join(WEIGHTS_DIR, "unet", "config.json")
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            out["toy"] = (layout_from_diffusers_config(json.load(f)), ARCH["text_hidden"])
    return out


def inferred_family(path) -> str | None:
    """For a file that records no base family: the families its module set (or vector width) fits, said so."""
    from ..adapters.errors import EraserFileError
    from ..adapters.files import load_eraser
    from ..adapters.fingerprint import infer_base_family

    try:
        e = load_eraser(path)
    except EraserFileError:
        try:
            e = load_eraser(path, concepts=["?"])   # a file without a concept list still has shapes
        except EraserFileError:
            return None
    candidates = _candidates()
    fits, what = infer_base_family(e, candidates)
    if not what:
        return "any (a guidance rule holds no weights)" if e.kind == "guidance" else None
    if not fits:
        return f"unknown (its {what} fits none of {', '.join(candidates)})"
    return f"{' or '.join(fits)} (inferred from the {what}; the file records none)"


def cmd_inspect(args) -> int:
    from ..adapters.files import describe

    status = 0
    for path in args.files:
        info, problems = describe(path)
        if info.get("base_family") == "unknown":
            guess = inferred_family(path)
            if guess:
                info["base_family"] = guess
        if args.json:
            print(json.dumps({**info, "problems": problems}, indent=2))
        else:
            print(f"== {path}")
            for key in ("name", "kind", "method", "format", "concepts", "base_family", "modules", "rank",
                        "parameters", "vectors", "size_bytes", "sha256"):
                if key in info:
                    value = ", ".join(info[key]) if key == "concepts" else info[key]
                    if key == "size_bytes":
                        value = f"{info[key] / 1e6:.2f} MB ({info[key]} bytes)"
                    print(f"  {key:12s} {value}")
            print("  problems     " + ("none" if not problems else ""))
            for p in problems:
                print(f"    - {p}")
        status = status or (1 if problems else 0)
    return status


def cmd_convert(args) -> int:
    """Pickled LoRA/SPM state dicts -> safetensors, read with ``torch.load(weights_only=True)``."""
    import torch
    from safetensors.torch import save_file

    from ..adapters.errors import EraserFileError
    from ..adapters.files import describe

    try:
        obj = torch.load(args.file, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        print(f"{args.file}: cannot be read safely (weights_only=True): {e}", file=sys.stderr)
        return 2
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        print(f"{args.file}: not a flat dictionary of tensors", file=sys.stderr)
        return 2
    if not any(k.startswith("lora_unet_") for k in obj):
        print(f"{args.file}: holds no kohya LoRA keys (lora_unet_*). Full UNet checkpoints (e.g. RECE/UCE) are "
              "converted against their base model by the closed-form edit tools.", file=sys.stderr)
        return 2
    meta = {"prompts": args.concepts} if args.concepts else {}
    save_file({k: v.contiguous() for k, v in obj.items()}, args.out, metadata=meta)
    info, problems = describe(args.out)
    print(f"wrote {args.out}: {info.get('modules', 0)} modules, problems: {problems or 'none'}")
    if problems:
        raise EraserFileError(args.out, "; ".join(problems))
    return 0


def cmd_geom_negation(args) -> int:
    """A copy of a Geom-Erasing file set to the paper's negative prompt or ConceptGate's regional negation
    (the tensors unchanged; the input file is never rewritten)."""
    import os

    from ..adapters.files import load_eraser, save_eraser
    from ..adapters.geom import METHOD, with_negation

    if os.path.abspath(args.out) == os.path.abspath(args.file):
        print(f"{args.out}: is the input file; write the copy to another path", file=sys.stderr)
        return 2
    if args.regional is not None and not args.regional > 0:
        print(f"--regional must be > 0 (2 is the default strength), got {args.regional:g}", file=sys.stderr)
        return 2
    eraser = load_eraser(args.file)
    if eraser.method != METHOD:
        print(f"{args.file}: is a {eraser.method} eraser, not Geom-Erasing tokens", file=sys.stderr)
        return 2
    mode = "regional" if args.regional is not None else "prompt"
    out = with_negation(eraser, mode, args.regional)
    sha = save_eraser(out, args.out)
    rule = f"regional negation x{args.regional:g}" if args.regional is not None else "the paper's negative prompt"
    print(f"wrote {args.out} (sha256 {sha[:12]}): {eraser.name} with {rule}")
    return 0


def add_cli(sub, path=None) -> None:
    p = sub.add_parser("inspect", help="print what an eraser file holds and every validation problem")
    p.add_argument("files", nargs="+", help=".safetensors eraser files")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("convert", help="convert a pickled (.pt/.ckpt) LoRA/SPM file to .safetensors, read safely")
    p.add_argument("file")
    p.add_argument("--out", required=True)
    p.add_argument("--concepts", default="", help="comma-separated erased concepts to record")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("geom-negation", help="copy a Geom-Erasing file set to ConceptGate's regional negation (or back "
                                             "to the paper's negative prompt), for the webuis and stacks")
    p.add_argument("file", help="a Geom-Erasing .safetensors file (not changed)")
    p.add_argument("--out", required=True, help="where to write the copy")
    rule = p.add_mutually_exclusive_group(required=True)
    rule.add_argument("--regional", type=float, metavar="K", help="regional negation at strength K (2 is the default "
                                                                   "chosen on validation seeds)")
    rule.add_argument("--prompt", action="store_true", help="the paper's rule: the tokens as the negative prompt")
    p.set_defaults(func=cmd_geom_negation)

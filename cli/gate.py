"""``python -m conceptgate gate|calibrate``: why an eraser fires on a prompt, and fitting its gate.

    python -m conceptgate gate spm_triangle.safetensors "a red trigon" "a photo of a dog"
    python -m conceptgate gate ERASER... --model DIR --rule ft --json PROMPT...
    python -m conceptgate calibrate spm_triangle.safetensors --model toy [--synonym trigon] [--out F]
"""

from __future__ import annotations

import json
import sys
import time

from .common import friendly, log, resolve_model_path

# conceptgate.adapters.gate.RULES, spelt out so that --help needs no torch (tests/test_cli_help.py compares them)
RULES = ("context", "ft", "cos", "tokens", "always")


def _text_encoder(model: str):
    """The diffusers text encoder of ``model`` ("toy" or a folder), as the pipelines encode prompts."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from ..adapters.diffusers_host import DiffusersTextEncoder

    path = resolve_model_path(model)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder").eval()
    except OSError as e:
        raise FileNotFoundError(f"{path}: not a diffusers model folder with tokenizer/ and text_encoder/ ({e})") from None
    return DiffusersTextEncoder(tokenizer, text_encoder)


def _domain(model: str) -> dict:
    """Calibration prompts of the model's own world (the toy world's captions for ``--model toy``)."""
    if model != "toy":
        return {}
    from ..toyworld.contexts import gate_carriers, gate_neutral_prompts, gate_synonyms

    return {"domain_carriers": gate_carriers, "domain_prompts": gate_neutral_prompts, "domain_synonyms": gate_synonyms}


def _split(items):
    """Leading arguments that name files are erasers, the rest prompts."""
    import os

    files = []
    for i, item in enumerate(items):
        if not (item.endswith(".safetensors") or os.path.isfile(item)):
            return files, list(items[i:])
        files.append(item)
    return files, []


@friendly
def cmd_gate(args) -> int:
    import torch

    from ..adapters import EraserStack, GateSettings, load_eraser
    from ..adapters.gate import BankCache, entry_gates

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    files, prompts = _split(args.items)
    args.prompts = prompts + list(args.prompts or [])
    if not files or not args.prompts:
        raise ValueError("usage: gate ERASER... PROMPT... (eraser files first, then prompts)")
    encoder = _text_encoder(args.model)
    erasers = [load_eraser(f) for f in files]
    banks = BankCache(encoder, _domain(args.model))
    enc = encoder(list(args.prompts))
    rows = []
    for e in erasers:
        settings = GateSettings(rule=args.rule) if args.rule else EraserStack().with_eraser(e).entries[0].gate
        result = entry_gates(enc, e, settings, banks)
        for i, p in enumerate(args.prompts):
            rows.append({"prompt": p, "eraser": e.name, "rule": settings.rule, "gate": round(float(result.values[i]), 4),
                         "fired": bool(result.values[i] > 0.5), "part": result.details[i],
                         "detector": banks.notes.get(e.name, "") if settings.rule == "context" else ""})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["prompt"]) for r in rows) if rows else 0
    for r in rows:
        print(f"{r['eraser']:>24s}  {r['gate']:6.3f}  {'FIRES' if r['fired'] else '     '}  {r['prompt']:<{width}s}  "
              f"[{r['part']}]")
    notes = {r["eraser"]: r["detector"] for r in rows if r["detector"]}
    for name, note in notes.items():
        print(f"{name}: {note}")
    return 0


@friendly
def cmd_calibrate(args) -> int:
    import torch

    from ..adapters.gate.calibrate import Calibrator
    from ..adapters.progress import bar

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    t0 = time.perf_counter()
    encoder = _text_encoder(args.model)
    shown = bar(1 + len(args.erasers), "calibrate", unit="step")  # the neutral pools, then one probe per eraser
    try:
        calibrator = Calibrator(encoder, pool_size=args.pool, max_fpr=args.max_fpr, seed=args.seed,
                                **_domain(args.model))
        shown.update(1)
        log(f"feature space from {2 * args.pool} neutral prompts in {time.perf_counter() - t0:.1f} s")
        return _calibrate_each(args, calibrator, shown)
    finally:
        shown.close()


def _calibrate_each(args, calibrator, shown) -> int:
    from ..adapters.files import load_eraser, save_eraser
    from ..adapters.gate.calibrate import names_to_avoid
    from ..adapters.progress import write

    status = 0
    for path in args.erasers:
        eraser = load_eraser(path)
        eraser.gate = calibrator.calibrate(eraser.concepts, args.synonym or (), avoid=names_to_avoid(eraser))
        shown.update(1)
        out = args.out if args.out and len(args.erasers) == 1 else path
        save_eraser(eraser, out, hyperparameters=_hyperparameters(eraser))
        r = eraser.gate.rates
        write(f"wrote {out}: context gate for {', '.join(eraser.gate.names)}: threshold "
              f"{eraser.gate.calibration.threshold:.3f}, temperature {eraser.gate.calibration.temperature:.3f}; "
              f"fires on {100 * r['negatives_fired']:.2f}% of {r['negatives']} neutral prompts; its probe half alone "
              f"on {100 * r['probe_positives_fired']:.1f}% of {r['positives']} concept prompts (names always fire) "
              f"({r['seconds']:.1f} s)")
        if r["negatives_fired"] > 2 * args.max_fpr:
            print(f"WARNING: {eraser.name}: the calibrated gate fires on {100 * r['negatives_fired']:.1f}% of the "
                  "neutral prompts", file=sys.stderr)
            status = 1
    return status


def calibrate_saved(path: str, encoder, model: str, synonyms=()) -> None:
    """The last step of the train / edit commands: fit the new eraser's context gate on the text encoder it
    was made with and store it in the file (``--no-calibrate`` skips it; the gate then calibrates on first use)."""
    from ..adapters.files import load_eraser, save_eraser
    from ..adapters.gate.calibrate import Calibrator, names_to_avoid
    from ..adapters.progress import bar

    eraser = load_eraser(path)
    shown = bar(2, "calibrate gate", unit="stage")  # the neutral pools, then the probe
    try:
        calibrator = Calibrator(encoder, **_domain(model))
        shown.update(1)
        eraser.gate = calibrator.calibrate(eraser.concepts, synonyms, avoid=names_to_avoid(eraser))
        shown.update(1)
    except ValueError as e:  # e.g. an encoder that reports no token positions: the gate calibrates on first use
        log(f"context gate not calibrated: {e}")
        return
    finally:
        shown.close()
    save_eraser(eraser, path, hyperparameters=_hyperparameters(eraser))
    r = eraser.gate.rates
    log(f"context gate calibrated for {', '.join(eraser.gate.names)}: fires on {100 * r['negatives_fired']:.2f}% of "
        f"neutral prompts, its probe half on {100 * r['probe_positives_fired']:.1f}% of concept prompts")


def _hyperparameters(eraser) -> dict:
    raw = eraser.metadata.get("conceptgate.hyperparameters")
    try:
        return json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return {}


def add_cli(sub, path=None) -> None:
    p = sub.add_parser("gate", help="show each eraser's gate on prompts and which part of the rule fired")
    p.add_argument("items", nargs="+", metavar="ERASER... PROMPT", help="eraser files, then the prompts")
    p.add_argument("--prompt", dest="prompts", action="append", default=None, metavar="PROMPT",
                   help="another prompt (repeatable; e.g. one that is also a file name)")
    p.add_argument("--model", default="toy", help='the text encoder: a diffusers model folder, or "toy" (default)')
    p.add_argument("--rule", choices=RULES, default=None, help="gate rule (default: the eraser's default, context)")
    p.add_argument("--json", action="store_true", help="a JSON list of {prompt, eraser, rule, gate, fired, part}")
    p.set_defaults(func=cmd_gate)

    p = sub.add_parser("calibrate", help="fit an eraser's context gate on a text encoder and store it in the file")
    p.add_argument("erasers", nargs="+", metavar="ERASER")
    p.add_argument("--model", default="toy", help='the text encoder the erasers will run with: a folder, or "toy"')
    p.add_argument("--synonym", action="append", default=None, help="another name of the concept (repeatable)")
    p.add_argument("--pool", type=int, default=600, help="neutral prompts per pool (two pools)")
    p.add_argument("--max-fpr", type=float, default=0.005, help="neutral prompts allowed to fire (0.005)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write here instead of updating the eraser file (one eraser)")
    p.set_defaults(func=cmd_calibrate)

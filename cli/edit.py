"""``python -m conceptgate edit ...``: UCE / RECE edits of a diffusers model, and imports of
published UCE / RECE weights.

    python -m conceptgate edit uce  --model FOLDER|toy --concept "Van Gogh" --type style --out vg.safetensors
    python -m conceptgate edit rece --model FOLDER|toy --concept nudity --type nudity --out nud.safetensors
    python -m conceptgate edit import erased-nudity-...pt --base FOLDER --concept nudity --out nud.safetensors

``convert FILE --base FOLDER --out NEW`` is the same import, reached from the ``convert`` command.
"""

from __future__ import annotations

import argparse
import sys
import time

from .common import friendly, log, read_lines, resolve_model_path
from .gate import calibrate_saved

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


@friendly
def cmd_edit(args) -> int:
    from ..adapters.progress import bar
    from ..adapters.rece import DiffusersEditHost, EditSpec, compute_edit, save_edit

    preserve = list(args.preserve or [])
    if args.preserve_file:
        preserve += read_lines(args.preserve_file)
    spec = EditSpec(method=args.method, concepts=tuple(args.concept), guide=args.guide, preserve=tuple(preserve),
                    concept_type=args.type, epochs=args.epochs, lam=args.lam, erase_scale=args.erase_scale,
                    preserve_scale=args.preserve_scale, lam_reg=args.lam_reg, convention=args.convention,
                    synonyms=tuple(args.synonym or ()), context=args.context)
    t0 = time.perf_counter()
    path = resolve_model_path(args.model)
    log(f"loading UNet and text encoder from {path}")
    host = DiffusersEditHost.from_folder(path, clip_skip=args.clip_skip)
    log(f"loaded in {time.perf_counter() - t0:.2f} s ({host.base_family or 'custom'} UNet)")
    shown = bar(None, f"{args.method} edit", unit="solve")

    def progress(done: int, total: int) -> None:  # after the UCE solve and after every RECE epoch
        shown.total = total
        shown.update(done - shown.n)

    try:
        outcome = compute_edit(host, spec, name=args.name, store_dtype=_dtype(args.dtype), log=log, progress=progress)
    finally:
        shown.close()
    save_edit(outcome, args.out)
    if not args.no_calibrate:
        calibrate_saved(args.out, host.gate_encoder(), args.model)
    print(outcome.text())
    return 0


@friendly
def cmd_import(args) -> int:
    from ..adapters.rece import import_published, save_import

    t0 = time.perf_counter()
    log(f"reading {args.file}")
    outcome = import_published(args.file, _base(args.base), args.concept, method=args.method, name=args.name,
                               rank=args.rank, tol=args.tol, full=args.full, store_dtype=_dtype(args.dtype), log=log)
    save_import(outcome, args.out)
    r = outcome.report
    print(f"wrote {args.out}: {r['method']} eraser for {', '.join(r['concepts'])}, {r['modules']} modules, "
          f"rank {r['rank_min']}..{r['rank_max']}, truncation error {r['truncation_rel_error_max']:.2e} "
          f"(max relative Frobenius over modules"
          + (f", tol {r['tol']:g})" if r["tol"] is not None else ")")
          + f"; {r['out_bytes'] / 1e6:.2f} MB vs {r['source_bytes'] / 1e6:.1f} MB published, "
          f"{time.perf_counter() - t0:.2f} s")
    for w in r["warnings"]:
        print(f"WARNING: {w}", file=sys.stderr)
    return 0


def _base(base: str) -> str:
    return resolve_model_path(base) if base == "toy" else base


def _add_import_options(p, positional: bool = True):
    if positional:
        p.add_argument("file", help="UCE .safetensors (edited attn2 weights) or RECE full-UNet .pt "
                                    "(read only with torch.load(weights_only=True))")
        p.add_argument("--base", required=True, help="the base model the edit was made from: a diffusers folder, "
                                                     "its unet/ folder, or 'toy'")
        p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument("--concept", action="append", default=None,
                   help="erased concept (repeatable); guessed from UCE/RECE file names when omitted")
    p.add_argument("--method", choices=("uce", "rece"), default=None, help="recorded method (default: guessed)")
    p.add_argument("--name", default=None, help="eraser name (default: the file name)")
    p.add_argument("--rank", type=int, default=None, help="truncate the SVD to this rank")
    p.add_argument("--tol", type=float, default=1e-3, help="SVD truncation: smallest rank with relative error <= tol")
    p.add_argument("--full", action="store_true", help="store exact dense deltas (.diff) instead of factors")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="stored tensor dtype")


EDIT_HELP = {
    "uce": "UCE: erase concepts with one closed-form edit of the cross-attention key/value weights (seconds)",
    "rece": "RECE: a UCE edit, then rounds against the adversarial embeddings that regenerate the concept",
}
EDIT_DESCRIPTION = {
    "uce": "UCE (Gandikota et al., WACV 2024): one closed-form solve maps each concept's text vectors onto the "
           "guide's in every cross-attention to_k / to_v matrix, with the --preserve concepts held in place. The file "
           "holds the edit as exact low-rank factors, gated per prompt like every eraser.",
    "rece": "RECE (Gong et al., ECCV 2024): starts from the UCE edit, then for --epochs rounds derives the text "
            "embedding that still regenerates the concept in the edited model (closed form, regularised by "
            "--lam-reg) and erases it too. The file holds the summed edit as exact low-rank factors, gated per "
            "prompt like every eraser.",
}


def add_cli(sub, path=None) -> None:
    p = sub.add_parser("edit", help="UCE / RECE closed-form erasure of a diffusers model, or import of published "
                                    "UCE / RECE weights")
    esub = p.add_subparsers(dest="edit_command", metavar="uce|rece|import")
    esub.required = True
    for method in ("uce", "rece"):
        rece = method == "rece"
        q = esub.add_parser(method, help=EDIT_HELP[method], description=EDIT_DESCRIPTION[method])
        q.add_argument("--model", required=True, help="diffusers model folder (unet/, text_encoder/, tokenizer/) or 'toy'")
        q.add_argument("--concept", action="append", required=True, help="concept to erase (repeatable: one joint solve)")
        q.add_argument("--guide", default=None, help="what the concept is mapped to (default: the type's: ' ' or 'art')")
        q.add_argument("--preserve", action="append", default=None, help="concept to preserve (repeatable)")
        q.add_argument("--preserve-file", default=None, help="file with one preserve prompt per line")
        q.add_argument("--type", default="object", choices=("object", "object_hard", "style", "nudity", "unsafe"),
                       help="erasure type: sets RECE's lam_reg and epochs and the default guide" if rece else
                            "erasure type: sets the default guide")
        if rece:
            q.add_argument("--epochs", type=int, default=None, help="RECE epochs (default: the type's)")
            q.add_argument("--lam-reg", type=float, default=None,
                           help="regulariser of the adversarial embedding (default: the type's)")
        q.add_argument("--lam", type=float, default=0.5, help="UCE ridge lambda (0.5)")
        q.add_argument("--erase-scale", type=float, default=1.0, help="erase weight a_e (1.0)")
        q.add_argument("--preserve-scale", type=float, default=None, help="preserve weight a_p (default max(0.1, 1/n))")
        q.add_argument("--convention", default="aligned_tail", choices=("aligned_tail", "last_token"),
                       help="token vectors: old UCE/RECE (aligned_tail) or new UCE (last_token)")
        q.add_argument("--synonym", action="append", default=None,
                       help="another name of the concept, erased with it and named to its gate (repeatable; "
                            "not in the paper)")
        q.add_argument("--context", default="bare",
                       help="erase the concept (and keep the preserve words) inside sentences too: 'generic' "
                            "templates, 'toy' (the toy world's captions) or another registered context; 'bare' "
                            "(default) is the published edit on the words alone")
        q.add_argument("--clip-skip", type=int, default=None, help="CLIP skip as diffusers counts it (default none)")
        q.add_argument("--name", default=None, help="eraser name")
        q.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="stored factor dtype")
        q.add_argument("--out", required=True, help="output .safetensors")
        q.add_argument("--no-calibrate", action="store_true",
                       help="do not fit the context gate at the end (it is then fitted on first use)")
        q.set_defaults(func=cmd_edit, method=method, **({} if rece else {"epochs": None, "lam_reg": None}))
    q = esub.add_parser("import", help="convert published UCE/RECE weights against their base model")
    _add_import_options(q)
    q.set_defaults(func=cmd_import)
    _extend_convert(sub)


def _extend_convert(sub) -> None:
    """Give the existing ``convert`` command a ``--base`` route to :func:`cmd_import`."""
    convert = sub.choices.get("convert") if hasattr(sub, "choices") else None
    if convert is None or any("--base" in a.option_strings for a in convert._actions):
        return
    original = convert.get_default("func")
    convert.add_argument("--base", default=None, help="UCE/RECE full weights: the base model folder to subtract "
                                                      "(same as 'edit import')")
    convert.add_argument("--concept", action="append", default=None, help=argparse.SUPPRESS)
    for opt, kw in (("--rank", dict(type=int, default=None)), ("--tol", dict(type=float, default=1e-3)),
                    ("--full", dict(action="store_true")), ("--dtype", dict(choices=tuple(DTYPES), default="fp32"))):
        convert.add_argument(opt, help=argparse.SUPPRESS, **kw)

    def convert_or_import(args):
        if getattr(args, "base", None):
            concepts = list(args.concept or []) + [c.strip() for c in (args.concepts or "").split(",") if c.strip()]
            ns = argparse.Namespace(file=args.file, base=args.base, out=args.out, concept=concepts or None,
                                    method=None, name=None, rank=args.rank, tol=args.tol, full=args.full,
                                    dtype=args.dtype)
            return cmd_import(ns)
        return original(args)

    convert.set_defaults(func=convert_or_import)

"""``python -m conceptgate train spm|abo|geom ...``: train an eraser on a diffusers model or the toy model.

    python -m conceptgate train spm  --model toy --concept star --iterations 1200 --out star.safetensors
    python -m conceptgate train abo  --model toy --concept triangle --alternative square --out tri2sq.safetensors
    python -m conceptgate train geom --model toy --concept watermark --detector toy-watermark --out geom.safetensors
    python -m conceptgate train spm  --model ./sd15 --concept "van gogh" --device cuda --out vg.safetensors

Checkpoints (``<name>_<i>steps.safetensors`` and the resumable ``state.pt``) go to ``--checkpoint-dir``
(default ``<out without extension>.checkpoints/``); ``--resume`` continues from there exactly.
"""

from __future__ import annotations

import os
import time

from .common import (add_lazy, add_model_option, add_run_options, command_group, friendly, log, read_lines,
                     resolve_model_path, setup_torch)
from .gate import calibrate_saved


def _train_group(subparsers):
    return command_group(subparsers, "train", "train erasers: SPM membranes, All-but-One adapters, Geom-Erasing "
                                              "tokens", "spm|abo|geom")


def _synonyms(spec: str | None, concept: str) -> tuple:
    """``--synonyms``: a comma list, or "toy" (the toy vocabulary's other names of the concept)."""
    if not spec:
        return ()
    if spec.strip() == "toy":
        from ..bench.prompts import kind_names, resolve_concept

        t = resolve_concept(concept)
        if t is None or t.index is None:
            raise ValueError(f"--synonyms toy: {concept!r} is not a toy object, style or colour")
        return tuple(kind_names(t.kind)[t.index][1:])
    return tuple(s.strip() for s in spec.split(",") if s.strip())


def _templates(spec: str | None, concept: str) -> tuple:
    """``--templates``: "toy" (the toy world's caption templates for this concept), a text file with one
    template per line, or templates separated by "|"; each has one "{}" where the concept goes."""
    if not spec:
        return ()
    if spec == "toy":
        from ..toyworld.captions import concept_templates

        return tuple(concept_templates(concept))
    if os.path.isfile(spec):
        return tuple(read_lines(spec))
    return tuple(t.strip() for t in spec.split("|") if t.strip())


def _load_parts(model: str):
    from ..adapters.spm import load_diffusers_parts

    t0 = time.perf_counter()
    log(f"loading {model}")
    parts = load_diffusers_parts(resolve_model_path(model))
    return parts, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------- spm
@friendly
def cmd_train_spm(args) -> int:
    from ..adapters.spm import LatentAnchoringTrainer, SPMConfig

    setup_torch(args)
    config = SPMConfig(concept=args.concept, surrogate=args.surrogate, iterations=args.iterations, lr=args.lr,
                       la_strength=args.la_strength, anchors=args.anchors, anchor_mode=args.anchor_mode,
                       eta=args.eta, rank=args.rank, alpha=args.alpha, warmup=args.warmup, cycles=args.cycles,
                       ddim_steps=args.ddim_steps, cfg=args.cfg, resolution=args.resolution, seed=args.seed,
                       save_every=args.save_every, templates=_templates(args.templates, args.concept),
                       synonyms=_synonyms(getattr(args, "synonyms", None), args.concept),
                       lora_backend=args.lora_backend)
    (unet, text_encoder, tokenizer, sched), seconds = _load_parts(args.model)
    trainer = LatentAnchoringTrainer(unet, text_encoder, tokenizer, sched, config, device=args.device,
                                     clip_skip=args.clip_skip)
    log(f"loaded in {seconds:.1f} s: {len(trainer.membranes.names)} membranes "
        f"({sum(p.numel() for p in trainer.membranes.parameters())} parameters), latent "
        f"{trainer.latent_size}x{trainer.latent_size}, warmup {config.warmup_steps}, anchor mode {config.anchor_mode}")
    deadline = time.time() + 60 * args.deadline_min if args.deadline_min else None
    result = trainer.train(args.out, checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                           progress=not args.no_progress, log=log, name=args.name, deadline=deadline)
    if not args.no_calibrate:
        calibrate_saved(args.out, trainer.encoder, args.model)
    last = result.losses[-1] if result.losses else None
    tail = f", last loss {last[1]:.4g} (erase {last[2]:.4g}, anchor {last[3]:.3g})" if last else ""
    print(f"wrote {args.out}: SPM membrane for {args.concept!r} (surrogate {args.surrogate!r}), "
          f"{result.iterations_run} iterations, {result.seconds:.1f} s in this run{tail}")
    return 0


def _add_spm(tsub) -> None:
    p = tsub.add_parser("spm", help="train an SPM membrane with Latent Anchoring (Lyu et al., CVPR 2024)",
                        description="Latent Anchoring with the reference defaults (rank 1, AdamW lr 1e-4, "
                                    "la_strength 1000, 3000 iterations, DDIM 30 at CFG 3).")
    add_model_option(p)
    p.add_argument("--concept", required=True, help="the concept to erase (written to the file's 'prompts')")
    p.add_argument("--surrogate", default="", help='concept the target is steered toward (default "")')
    p.add_argument("--iterations", type=int, default=3000)
    p.add_argument("--la-strength", type=float, default=1000.0, help="Latent Anchoring weight lambda")
    p.add_argument("--anchor-mode", choices=["fixed", "official_quirk"], default="fixed",
                   help="fixed: all anchors contribute; official_quirk: the reference code's batch "
                        "(see adapters/spm/membranes.py)")
    p.add_argument("--anchors", type=int, default=4, help="anchors per iteration (sampling_batch_size)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--eta", type=float, default=1.0, help="erase strength")
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--warmup", type=int, default=None, help="warmup iterations (default 500 x iterations / 3000)")
    p.add_argument("--cycles", type=int, default=3, help="cosine restarts")
    p.add_argument("--ddim-steps", type=int, default=30)
    p.add_argument("--cfg", type=float, default=3.0, help="CFG of the trajectory sampling")
    p.add_argument("--resolution", type=int, default=None, help="pixels (default: the UNet's sample_size x 8)")
    p.add_argument("--clip-skip", type=int, default=None)
    p.add_argument("--templates", default=None,
                   help='non-official: train the concept inside prompts: "toy", a file (one template per line) or '
                        '"a {} on a table|a photo of {}"; each template has one {} for the concept')
    p.add_argument("--synonyms", default=None,
                   help='non-official, with --templates: other names of the concept trained in the same templates '
                        '(comma list, or "toy" for the toy vocabulary\'s), so the membrane erases them fully')
    p.add_argument("--deadline-min", type=float, default=None,
                   help="stop after this many minutes and still write --out (iterations run recorded; --resume continues)")
    p.add_argument("--lora-backend", choices=["peft", "hooks"], default="peft",
                   help="how the trained factors meet the frozen UNet: peft's LoRA layers on a weight-sharing view "
                        "(default) or forward hooks; the same function and the same file")
    add_run_options(p, save_every=500, name_default="the concept")
    p.set_defaults(func=cmd_train_spm)


# ------------------------------------------------------------------------------------------- abo
@friendly
def cmd_train_abo(args) -> int:
    from ..adapters.abo.adapter import ABOConfig, ABOTrainer

    setup_torch(args)
    context = args.context or ("toy" if args.model == "toy" else "generic")
    if context == "toy":
        from .. import toyworld  # noqa: F401  (importing it registers the toy prompt context)
    config = ABOConfig(concept=args.concept, alternative=args.alternative, lam=args.lam,
                       iterations=args.iterations, lr=args.lr, batch=args.batch, rank=args.rank, alpha=args.alpha,
                       modules=args.modules, context=context, pool_size=args.pool_size, pool_from=args.pool_from,
                       pool_steps=args.pool_steps, pool_cfg=args.pool_cfg, warmup=args.warmup,
                       resolution=args.resolution, seed=args.seed, save_every=args.save_every,
                       lora_backend=args.lora_backend)
    (unet, text_encoder, tokenizer, sched), seconds = _load_parts(args.model)
    trainer = ABOTrainer(unet, text_encoder, tokenizer, sched, config, device=args.device, clip_skip=args.clip_skip)
    log(f"loaded in {seconds:.1f} s: rank-{config.rank} adapter on {len(trainer.adapter.names)} "
        f"modules ({config.modules}, {sum(p.numel() for p in trainer.adapter.parameters())} parameters), "
        f"{len(trainer.pairs)} prompt pairs ({config.context}), latent {trainer.latent_size}x{trainer.latent_size}")
    result = trainer.train(args.out, checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                           progress=not args.no_progress, log=log, name=args.name)
    if not args.no_calibrate:
        calibrate_saved(args.out, trainer.encoder, args.model)
    last = result.losses[-1] if result.losses else None
    tail = f", last loss {last[1]:.4g} (guidance {last[2]:.4g}, unconditional {last[3]:.3g})" if last else ""
    print(f"wrote {args.out}: All-but-One adapter {args.concept!r} -> {args.alternative!r}, "
          f"{result.iterations_run} iterations, {result.seconds:.1f} s in this run{tail}")
    return 0


ABO_HELP = ("train an All-but-One adapter (erase a concept toward an alternative; objective reconstructed from the "
            "AAAI 2024 abstract)")


def _add_abo(tsub):
    from ..adapters.abo.adapter import CONTEXTS, MODULE_SETS, POOL_SOURCES  # torch: only when 'train abo' is named

    p = tsub.add_parser("abo", help=ABO_HELP,
                        description="Low-rank adapter trained on ||g_theta(x_t,c_e) - g_0(x_t,c_a)||^2 + "
                                    "lambda ||eps_theta(x_t,'') - eps_0(x_t,'')||^2, g(x,c) = eps(x,c) - eps(x,''). "
                                    "A reconstruction: the paper's equations are not public (adapters/abo/adapter.py).")
    add_model_option(p)
    p.add_argument("--concept", required=True, help="the concept to erase (the eraser's gate concept)")
    p.add_argument("--alternative", default="", help='what the concept becomes (default "": erase to nothing)')
    p.add_argument("--lambda", dest="lam", type=float, default=1.0,
                   help="weight of the unconditional-preservation term")
    p.add_argument("--iterations", type=int, default=600)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=4, help="x_t samples per iteration")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank, scale 1)")
    p.add_argument("--modules", choices=MODULE_SETS, default="attn2_kv",
                   help="attn2_kv: cross-attention key/value; attn2: all cross-attention projections; "
                        "spm: every Linear/Conv2d of every transformer")
    p.add_argument("--context", choices=CONTEXTS, default=None,
                   help="training prompts: toy (toy captions with colour/style), generic (photo/painting "
                        "templates), bare (the word alone); default toy for --model toy, else generic")
    p.add_argument("--pool-size", type=int, default=64, help="clean latents generated per source")
    p.add_argument("--pool-from", choices=POOL_SOURCES, default="both",
                   help="both: latents from the erase and the alternative prompts; erase: erase prompts only")
    p.add_argument("--pool-steps", type=int, default=25, help="DDIM steps generating the pool")
    p.add_argument("--pool-cfg", type=float, default=5.0, help="CFG generating the pool")
    p.add_argument("--warmup", type=int, default=None, help="warmup iterations (default 5%% of the iterations)")
    p.add_argument("--resolution", type=int, default=None, help="pixels (default: the UNet's sample_size x 8)")
    p.add_argument("--clip-skip", type=int, default=None)
    p.add_argument("--lora-backend", choices=["peft", "hooks"], default="peft",
                   help="how the trained factors meet the frozen UNet: peft's LoRA layers on a weight-sharing view "
                        "(default) or forward hooks; the same function and the same file")
    add_run_options(p, save_every=100, name_default="'concept -> alternative'")
    p.set_defaults(func=cmd_train_abo)
    return p


# ------------------------------------------------------------------------------------------ geom
def _detector(spec: str, category: str | None = None):
    """``toy-watermark`` (the toy world's watermark judge + location check), ``toy-watermark-handcrafted``
    (no learned judge), or a COCO JSON path."""
    from ..adapters.geom import CocoDetector

    if spec in ("toy-watermark", "toy-watermark-handcrafted"):
        from ..toyworld import load_judges
        from ..toyworld.detectors import ToyWatermarkDetector

        return ToyWatermarkDetector(judge=load_judges() if spec == "toy-watermark" else None)
    if spec.lower().endswith(".json"):
        return CocoDetector(spec, category)
    raise ValueError(f"unknown detector {spec!r}: toy-watermark, toy-watermark-handcrafted or a COCO .json file")


def _toy_captions(n: int, seed: int) -> list[str]:
    import numpy as np

    from ..toyworld import captions as C
    from ..toyworld import render as R

    rng = np.random.default_rng(seed)
    return C.training_captions(R.sample_labels(n, rng), rng)


def _geom_data(pipe, args, config, ckdir: str):
    from ..adapters.geom import CocoDetector
    from ..adapters.geom import trainer as GT

    detector = _detector(args.detector, getattr(args, "category", None))
    if args.data:
        data = GT.label_folder(args.data, detector)
        log(f"data folder {args.data}: {len(data.files)} images, {len(data.positives)} with {config.concept!r}")
        return data
    cache = os.path.join(ckdir, "data")
    if os.path.exists(os.path.join(cache, "annotations.json")):
        data = GT.label_folder(cache, CocoDetector(os.path.join(cache, "annotations.json")))
        log(f"reusing generated data {cache}: {len(data.files)} images, {len(data.positives)} with {config.concept!r}")
        return data
    if isinstance(detector, CocoDetector):
        raise ValueError("a COCO annotation file labels a data folder: pass --data FOLDER (or a detector for generated images)")
    if args.prompts:
        lines = read_lines(args.prompts)
        prompts = [lines[i % len(lines)] for i in range(config.generate)]
    elif args.model == "toy":
        prompts = _toy_captions(config.generate, config.seed)
    else:
        raise ValueError("--prompts FILE is needed to generate training images from a non-toy model")
    t = time.perf_counter()
    data = GT.generate_data(pipe, prompts, detector, config, log)
    log(f"generated {len(data.files)} images in {time.perf_counter() - t:.1f} s; the detector found "
        f"{config.concept!r} in {len(data.positives)}")
    GT.write_folder(cache, data, config.concept)
    return data


@friendly
def cmd_train_geom(args) -> int:
    import numpy as np

    from ..adapters import geom as G
    from ..adapters.geom import trainer as GT

    setup_torch(args)
    config = GT.GeomConfig(concept=args.concept, grid=args.grid, alpha=args.alpha, iterations=args.iterations,
                           batch=args.batch, lr=args.lr, learn_concept=not args.fixed_concept, max_norm=args.max_norm,
                           use_locations=not args.no_locations, seed=args.seed, save_every=args.save_every,
                           generate=args.generate, gen_steps=args.gen_steps, gen_cfg=args.gen_cfg)
    ckdir = args.checkpoint_dir or os.path.splitext(args.out)[0] + ".checkpoints"
    os.makedirs(ckdir, exist_ok=True)
    log(f"loading {args.model}")
    if args.model == "toy":
        from ..toyworld import load_pipeline

        pipe = load_pipeline(device=args.device)
    else:
        pipe = GT.load_pipeline(args.model, args.device)
    data = _geom_data(pipe, args, config, ckdir)
    if args.data_only:
        print(f"data in {os.path.join(ckdir, 'data')}: {len(data.files)} images, {len(data.positives)} with {config.concept!r}")
        return 0
    trainer = GT.GeomTrainer(pipe, data, config, args.device)
    used = [b for b, n in enumerate(trainer.bin_counts) if n]
    log(f"grid {config.grid}x{config.grid}, alpha {config.alpha}, {len(trainer.pos)} training images, bins covered: "
        + ", ".join(f"{G.token_name(b, config.grid)} x{trainer.bin_counts[b]}" for b in used))
    if getattr(args, "init_from", None) and not args.resume:
        from ..adapters.files import load_eraser

        trainer.init_from(load_eraser(args.init_from, kind="conditioning"))
        log(f"starting from {args.init_from} at iteration {trainer.iteration}")
    eraser, seconds, n = trainer.train(args.out, ckdir, args.resume, not args.no_progress, log, args.name)
    if not args.no_calibrate:
        from ..adapters.diffusers_host import DiffusersTextEncoder

        calibrate_saved(args.out, DiffusersTextEncoder(pipe.tokenizer, pipe.text_encoder), args.model)
    if args.export:
        paths = G.export_ti(eraser, args.export, name=args.name or eraser.name, per_token=args.per_token)
        log(f"exported {len(paths)} textual-inversion file(s) to {args.export}")
    last = np.mean([loss for _, loss in trainer.losses[-50:]]) if trainer.losses else float("nan")
    print(f"wrote {args.out}: Geom-Erasing tokens for {args.concept!r} (grid {config.grid}, alpha {config.alpha}), "
          f"{n} iterations in {seconds:.1f} s ({seconds / max(n, 1):.3f} s/it), mean loss of the last 50 {last:.4f}")
    return 0


def _add_geom(tsub) -> None:
    p = tsub.add_parser("geom", help="learn Geom-Erasing concept + location tokens (Liu et al., ECCV 2024)",
                        description="Textual-inversion-style training of the location tokens <l{m,n}> (and the concept "
                                    "token) with the spatially re-weighted loss; UNet and text encoder frozen.")
    add_model_option(p)
    p.add_argument("--concept", required=True, help="the implicit concept's name (e.g. watermark)")
    p.add_argument("--detector", default="toy-watermark",
                   help="toy-watermark | toy-watermark-handcrafted | a COCO .json of boxes for the --data folder")
    p.add_argument("--category", default=None, help="COCO category name to use (default: every annotation)")
    p.add_argument("--data", default=None, help="folder of images + captions (data removal); default: generate (model removal)")
    p.add_argument("--data-only", action="store_true", help="generate and label the training data, then stop")
    p.add_argument("--init-from", default=None, metavar="FILE",
                   help="continue from a saved Geom token file of the same grid and text encoder (fresh optimiser; "
                        "--iterations counts from the file's)")
    p.add_argument("--prompts", default=None, help="text file of prompts to generate training images from (non-toy models)")
    p.add_argument("--generate", type=int, default=384, help="images to generate in model-removal mode")
    p.add_argument("--gen-steps", type=int, default=25)
    p.add_argument("--gen-cfg", type=float, default=5.0)
    p.add_argument("--grid", type=int, default=4, help="location grid N (N x N bins)")
    p.add_argument("--alpha", type=float, default=0.5, help="re-weighting: <1 up-weights the concept region, 1 = plain loss")
    p.add_argument("--iterations", type=int, default=1500)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--fixed-concept", action="store_true", help="use the concept's word as is (do not learn a concept token)")
    p.add_argument("--no-locations", action="store_true", help="ablation: learn the concept token only")
    p.add_argument("--max-norm", type=lambda v: -1.0 if v == "vocab" else float(v), default=0.0,
                   help="cap each learned vector's length after every step: a number, or 'vocab' for the longest "
                        "row of the token-embedding table (default 0: no cap, as published)")
    p.add_argument("--export", default=None, help="also write textual-inversion embedding(s) into this folder")
    p.add_argument("--per-token", action="store_true", help="with --export: one file per location token too")
    add_run_options(p, save_every=250, name_default="geom_<concept>")
    p.set_defaults(func=cmd_train_geom)


def add_cli(subparsers, path=None) -> None:
    tsub = _train_group(subparsers)
    _add_spm(tsub)
    add_lazy(tsub, "abo", ABO_HELP, _add_abo, path, "train")
    _add_geom(tsub)

"""``python -m conceptgate train spm ...``: train an SPM membrane with Latent Anchoring.

    python -m conceptgate train spm --model toy --concept star --iterations 1200 --out star.safetensors
    python -m conceptgate train spm --model ./sd15 --concept "van gogh" --device cuda --out vg.safetensors

Checkpoints (``<name>_<i>steps.safetensors`` and the resumable ``state.pt``) go to ``--checkpoint-dir``
(default ``<out without extension>.checkpoints/``); ``--resume`` continues from there exactly.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _templates(spec: str | None, concept: str) -> tuple:
    """``--templates``: "toy" (the toy world's caption templates for this concept), a text file with one
    template per line, or templates separated by "|"; each has one "{}" where the concept goes."""
    if not spec:
        return ()
    if spec == "toy":
        from ..toyworld.captions import concept_templates

        return tuple(concept_templates(concept))
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            return tuple(line.strip() for line in f if line.strip() and not line.startswith("#"))
    return tuple(t.strip() for t in spec.split("|") if t.strip())


def cmd_train_spm(args) -> int:
    import torch

    from .errors import EraserFileError
    from .spm import LatentAnchoringTrainer, SPMConfig, load_diffusers_parts

    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda asked for, but torch sees no CUDA device")
        config = SPMConfig(concept=args.concept, surrogate=args.surrogate, iterations=args.iterations, lr=args.lr,
                           la_strength=args.la_strength, anchors=args.anchors, anchor_mode=args.anchor_mode,
                           eta=args.eta, rank=args.rank, alpha=args.alpha, warmup=args.warmup, cycles=args.cycles,
                           ddim_steps=args.ddim_steps, cfg=args.cfg, resolution=args.resolution, seed=args.seed,
                           save_every=args.save_every, templates=_templates(args.templates, args.concept))
        t0 = time.perf_counter()
        _log(f"loading {args.model}")
        unet, text_encoder, tokenizer, sched = load_diffusers_parts(args.model)
        trainer = LatentAnchoringTrainer(unet, text_encoder, tokenizer, sched, config, device=args.device,
                                         clip_skip=args.clip_skip)
        _log(f"loaded in {time.perf_counter() - t0:.1f} s: {len(trainer.membranes.names)} membranes "
             f"({sum(p.numel() for p in trainer.membranes.parameters())} parameters), latent "
             f"{trainer.latent_size}x{trainer.latent_size}, warmup {config.warmup_steps}, anchor mode {config.anchor_mode}")
        deadline = time.time() + 60 * args.deadline_min if args.deadline_min else None
        result = trainer.train(args.out, checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                               progress=not args.no_progress, log=_log, name=args.name, deadline=deadline)
    except (FileNotFoundError, EraserFileError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    last = result.losses[-1] if result.losses else None
    tail = f", last loss {last[1]:.4g} (erase {last[2]:.4g}, anchor {last[3]:.3g})" if last else ""
    print(f"wrote {args.out}: SPM membrane for {args.concept!r} (surrogate {args.surrogate!r}), "
          f"{result.iterations_run} iterations, {result.seconds:.1f} s in this run{tail}")
    return 0


def _train_subparsers(subparsers):
    """The ``train`` command's sub-command action (created here, or reused if another module made it)."""
    parser = subparsers.choices.get("train")
    if parser is None:
        parser = subparsers.add_parser("train", help="train erasers (spm)")
        parser.add_subparsers(dest="train_command", metavar="METHOD", required=True)
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def add_cli(subparsers) -> None:
    tsub = _train_subparsers(subparsers)
    p = tsub.add_parser("spm", help="train an SPM membrane with Latent Anchoring (Lyu et al., CVPR 2024)",
                        description="Latent Anchoring with the reference defaults (rank 1, AdamW lr 1e-4, "
                                    "la_strength 1000, 3000 iterations, DDIM 30 at CFG 3).")
    p.add_argument("--model", required=True, help='diffusers model folder, or "toy" for the embedded toy model')
    p.add_argument("--concept", required=True, help="the concept to erase (written to the file's 'prompts')")
    p.add_argument("--surrogate", default="", help='concept the target is steered toward (default "")')
    p.add_argument("--iterations", type=int, default=3000)
    p.add_argument("--la-strength", type=float, default=1000.0, help="Latent Anchoring weight lambda")
    p.add_argument("--anchor-mode", choices=["fixed", "official_quirk"], default="fixed",
                   help="fixed: all anchors contribute; official_quirk: the reference code's batch (see adapters/spm.py)")
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--checkpoint-dir", default=None, help="default: <out>.checkpoints/")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint directory's state.pt")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--name", default=None, help="eraser name (default: the concept)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--templates", default=None,
                   help='non-official: train the concept inside prompts: "toy", a file (one template per line) or '
                        '"a {} on a table|a photo of {}"; each template has one {} for the concept')
    p.add_argument("--deadline-min", type=float, default=None,
                   help="stop after this many minutes and still write --out (iterations run recorded; --resume continues)")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.set_defaults(func=cmd_train_spm)

"""``python -m conceptgate train abo ...``: train an All-but-One adapter (reconstructed objective).

    python -m conceptgate train abo --model toy --concept triangle --alternative square --out tri2sq.safetensors
    python -m conceptgate train abo --model ./sd15 --concept "van gogh" --alternative "dry brushing" \\
        --device cuda --out vg.safetensors

Checkpoints (``<name>_<i>steps.safetensors`` and the resumable ``state.pt``) go to ``--checkpoint-dir``
(default ``<out without extension>.checkpoints/``); ``--resume`` continues from there exactly.
"""

from __future__ import annotations

import sys
import time


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cmd_train_abo(args) -> int:
    import torch

    from .abo_train import ABOConfig, ABOTrainer, default_context
    from .errors import EraserFileError
    from .spm import load_diffusers_parts

    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda asked for, but torch sees no CUDA device")
        config = ABOConfig(concept=args.concept, alternative=args.alternative, lam=args.lam,
                           iterations=args.iterations, lr=args.lr, batch=args.batch, rank=args.rank, alpha=args.alpha,
                           modules=args.modules, context=args.context or default_context(args.model),
                           pool_size=args.pool_size, pool_from=args.pool_from, pool_steps=args.pool_steps,
                           pool_cfg=args.pool_cfg, warmup=args.warmup, resolution=args.resolution, seed=args.seed,
                           save_every=args.save_every)
        t0 = time.perf_counter()
        _log(f"loading {args.model}")
        unet, text_encoder, tokenizer, sched = load_diffusers_parts(args.model)
        trainer = ABOTrainer(unet, text_encoder, tokenizer, sched, config, device=args.device, clip_skip=args.clip_skip)
        _log(f"loaded in {time.perf_counter() - t0:.1f} s: rank-{config.rank} adapter on {len(trainer.adapter.names)} "
             f"modules ({config.modules}, {sum(p.numel() for p in trainer.adapter.parameters())} parameters), "
             f"{len(trainer.pairs)} prompt pairs ({config.context}), latent {trainer.latent_size}x{trainer.latent_size}")
        result = trainer.train(args.out, checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                               progress=not args.no_progress, log=_log, name=args.name)
    except (FileNotFoundError, EraserFileError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    last = result.losses[-1] if result.losses else None
    tail = f", last loss {last[1]:.4g} (guidance {last[2]:.4g}, unconditional {last[3]:.3g})" if last else ""
    print(f"wrote {args.out}: All-but-One adapter {args.concept!r} -> {args.alternative!r}, "
          f"{result.iterations_run} iterations, {result.seconds:.1f} s in this run{tail}")
    return 0


def add_cli(subparsers) -> None:
    from .abo_train import CONTEXTS, MODULE_SETS, POOL_SOURCES
    from .cli_train import _train_subparsers

    tsub = _train_subparsers(subparsers)
    p = tsub.add_parser("abo", help="train an All-but-One adapter (erase a concept toward an alternative; "
                                    "objective reconstructed from the AAAI 2024 abstract)",
                        description="Low-rank adapter trained on ||g_theta(x_t,c_e) - g_0(x_t,c_a)||^2 + "
                                    "lambda ||eps_theta(x_t,'') - eps_0(x_t,'')||^2, g(x,c) = eps(x,c) - eps(x,''). "
                                    "A reconstruction: the paper's equations are not public (adapters/abo_train.py).")
    p.add_argument("--model", required=True, help='diffusers model folder, or "toy" for the embedded toy model')
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--checkpoint-dir", default=None, help="default: <out>.checkpoints/")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint directory's state.pt")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--name", default=None, help="eraser name (default: 'concept -> alternative')")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.set_defaults(func=cmd_train_abo)

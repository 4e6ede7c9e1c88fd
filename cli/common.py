"""What every command shares: log lines, one-line errors, torch set-up, "toy" as a model name, and the
options every trainer takes."""

from __future__ import annotations

import argparse
import os
import sys
import time


def log(msg: str) -> None:
    """A time-stamped line on stdout, drawn above any open progress bar."""
    from ..adapters.progress import write

    write(f"[{time.strftime('%H:%M:%S')}] {msg}")


def friendly(fn):
    """Missing files, bad inputs and unreadable files end with one line on stderr and status 2."""
    def run(args) -> int:
        from ..adapters.errors import EraserFileError

        try:
            return fn(args)
        except (FileNotFoundError, EraserFileError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


def setup_torch(args) -> None:
    """``--threads`` and ``--device``: refuse a CUDA device torch cannot see before loading anything."""
    import torch

    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    if getattr(args, "device", "cpu").startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device")


def resolve_model_path(model: str) -> str:
    """``"toy"`` -> the embedded toy model's diffusers folder (error if not present yet); else ``model``."""
    if model != "toy":
        return model
    from ..toyworld import WEIGHTS_DIR

    if not os.path.isfile(os.path.join(WEIGHTS_DIR, "model_index.json")):
        raise FileNotFoundError(f"the toy model is not present yet ({WEIGHTS_DIR} has no model_index.json)")
    return WEIGHTS_DIR


def read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def command_group(subparsers, name: str, help: str, metavar: str):
    """The sub-command action of command ``name`` (created here, or reused if another module made it)."""
    parser = subparsers.choices.get(name)
    if parser is None:
        parser = subparsers.add_parser(name, help=help)
        parser.add_subparsers(dest=f"{name}_command", metavar=metavar, required=True)
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def _unbuilt(args) -> int:  # main() parses again with every parser built before it would get here
    raise RuntimeError("internal: a sub-command parser was not built")


_unbuilt.unbuilt = True


def wanted(path, *names: str) -> bool:
    """Whether the command line (its non-option words, ``path``; ``None``: build everything) names the
    sub-command ``names`` (e.g. ``"bench", "quality"``)."""
    return path is None or list(path[:len(names)]) == list(names)


def add_lazy(sub, name: str, help: str, build, path, *parents: str):
    """Sub-command ``name`` of ``sub`` (below ``parents``): ``build(sub)`` adds it with its options only when
    the command line names it, since building it imports a heavy module (torch). Otherwise it is only listed,
    with ``help``, and :func:`conceptgate.cli.main` builds everything and parses again should it be chosen."""
    if wanted(path, *parents, name):
        return build(sub)
    p = sub.add_parser(name, help=help)
    p.set_defaults(func=_unbuilt)
    return p


def add_model_option(p, what: str = "diffusers model folder") -> None:
    p.add_argument("--model", required=True, help=f'{what}, or "toy" for the embedded toy model')


def add_run_options(p, save_every: int, name_default: str) -> None:
    """The options every trainer has: checkpoints, resume, device, threads, name, progress, output."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=save_every, help=f"checkpoint every N iterations ({save_every})")
    p.add_argument("--checkpoint-dir", default=None, help="default: <out>.checkpoints/")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint directory's state.pt")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--name", default=None, help=f"eraser name (default: {name_default})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-calibrate", action="store_true",
                   help="do not fit the context gate at the end (it is then fitted on first use)")
    p.add_argument("--out", required=True, help="output .safetensors")

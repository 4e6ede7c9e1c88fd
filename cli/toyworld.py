"""``python -m conceptgate toyworld train|info``: train the toy world from scratch, or describe the committed one."""

from __future__ import annotations


from .common import add_lazy

TRAIN_HELP = "train the toy world from scratch (text encoder, VAE, judges, UNet; resumable, with progress bars)"
INFO_HELP = "show the committed toy-world model and vocabulary"


# conceptgate.toyworld.train imports torch: these run only when the command line names the sub-command
def _add_train(sub):
    from ..toyworld.train import _add_train_args, run_train

    t = sub.add_parser("train", help=TRAIN_HELP)
    _add_train_args(t)
    t.set_defaults(func=run_train)
    return t


def _add_info(sub):
    from ..toyworld.train import run_info

    i = sub.add_parser("info", help=INFO_HELP)
    i.add_argument("--weights", default=None)
    i.set_defaults(func=run_info)
    return i


def add_cli(subparsers, path=None):
    p = subparsers.add_parser("toyworld", help="the toy world: train, info")
    sub = p.add_subparsers(dest="toyworld_cmd", required=True)
    add_lazy(sub, "train", TRAIN_HELP, _add_train, path, "toyworld")
    add_lazy(sub, "info", INFO_HELP, _add_info, path, "toyworld")
    return p

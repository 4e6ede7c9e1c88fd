"""``python -m conceptgate toyworld train|info``: train the toy world from scratch, or describe the committed one."""

from __future__ import annotations


def add_cli(subparsers):
    from ..toyworld.train import _add_train_args, run_info, run_train

    p = subparsers.add_parser("toyworld", help="the toy world: train, info")
    sub = p.add_subparsers(dest="toyworld_cmd", required=True)
    t = sub.add_parser("train", help="train the toy world from scratch")
    _add_train_args(t)
    t.set_defaults(func=run_train)
    i = sub.add_parser("info", help="show the committed toy-world model and vocabulary")
    i.add_argument("--weights", default=None)
    i.set_defaults(func=run_info)
    return p

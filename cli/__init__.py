"""``python -m conceptgate``: the command line, one module per command family.

=========================  ==================================================================
``inspect``, ``convert``   :mod:`.files`: what an eraser file holds; pickles to safetensors
``gate``, ``calibrate``    :mod:`.gate`: why an eraser fires on a prompt; fitting its context gate
``edit``                   :mod:`.edit`: UCE / RECE edits, import of published weights
``train``                  :mod:`.train`: SPM membranes, All-but-One adapters, Geom-Erasing tokens
``bench``                  :mod:`.bench`: measured numbers into BENCHMARKS.md
``demo``                   :mod:`.demo`: the toy-model demo (``conceptgate.bench.demo`` builds it)
``toyworld``               :mod:`.toyworld`: train or describe the toy world (``conceptgate.toyworld.train``)
=========================  ==================================================================

Shared start-up (logging, one-line errors, torch set-up, ``--model toy``) is in :mod:`.common`. Every
module imports torch, diffusers and the command's own code inside its command functions only, so that
``--help`` answers at once; sub-commands whose options live in heavy modules (``bench ...``, ``toyworld
train``, ``train abo``) are built only when the command line names them (:func:`.common.add_lazy`).
"""

from __future__ import annotations

import argparse
import os
import sys


def _command_modules():
    from . import bench, demo, edit, files, gate, toyworld, train

    # the order of the help listing
    return [files, gate, toyworld, edit, bench, train, demo]


def command_path(argv) -> list[str]:
    """The words of ``argv`` that are not options (``["bench", "quality"]`` for ``bench quality --full``):
    which sub-commands the parser has to build in full."""
    return [a for a in argv if not a.startswith("-")]


def build_parser(argv=None) -> argparse.ArgumentParser:
    """The command-line parser. With ``argv``, only the sub-commands ``argv`` names get their options (the
    others are listed by name and help): ``--help`` then imports neither torch nor diffusers. Without
    ``argv``, every sub-command is built in full."""
    path = None if argv is None else command_path(argv)
    parser = argparse.ArgumentParser(prog="python -m conceptgate",
                                     description="ConceptGate: gated concept erasure for diffusers, ComfyUI and A1111/Forge.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in _command_modules():
        module.add_cli(sub, path)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, unknown = build_parser(argv).parse_known_args(argv)
    if unknown or getattr(args.func, "unbuilt", False):
        # a sub-command the pre-scan did not build, or a mistake: build everything and parse again (argparse
        # then names the mistake as it would have)
        args = build_parser().parse_args(argv)
    if args.command not in ("demo", "bench"):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return int(args.func(args) or 0)

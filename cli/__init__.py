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

Shared start-up (logging, one-line errors, torch set-up, ``--model toy``) is in :mod:`.common`.
"""

from __future__ import annotations

import argparse
import os
import sys


def _command_modules():
    from . import bench, demo, edit, files, gate, toyworld, train

    # the order of the help listing
    return [files, gate, toyworld, edit, bench, train, demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m conceptgate",
                                     description="ConceptGate: gated concept erasure for diffusers, ComfyUI and A1111/Forge.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in _command_modules():
        module.add_cli(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command not in ("demo", "bench"):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

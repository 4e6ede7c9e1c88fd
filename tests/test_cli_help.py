"""The command line answers --help at once (no torch, no diffusers) and says what each command does."""

import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ("inspect", "convert", "geom-negation", "gate", "calibrate", "toyworld", "edit", "bench", "train", "demo")
# sub-commands whose options are all plain: their --help must be light too
LIGHT = (("edit", "uce"), ("edit", "rece"), ("edit", "import"), ("train", "spm"), ("train", "geom"),
         ("bench", "speed"), ("bench", "rece-attack"))
HEAVY = ("torch", "diffusers", "transformers", "safetensors", "numpy")

# runs `python -m conceptgate ARGS --help` for every ARGS in the list, each as the CLI would, in one interpreter,
# and fails as soon as one of them imported a heavy module
_CHECK = r"""
import json, runpy, sys
for args in json.loads(sys.argv[1]):
    sys.argv = ["conceptgate", *args, "--help"]
    try:
        runpy.run_module("conceptgate", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        assert e.code in (0, None), (args, e.code)
    heavy = [m for m in %r if m in sys.modules]
    assert not heavy, (args, heavy)
print("light")
""" % (HEAVY,)


def _run(code, *args):
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          cwd=os.path.dirname(ROOT), timeout=120)


def test_help_imports_neither_torch_nor_diffusers():
    import json

    todo = [[]] + [[c] for c in COMMANDS] + [list(c) for c in LIGHT]
    out = _run(_CHECK, json.dumps(todo))
    assert out.returncode == 0 and out.stdout.strip().endswith("light"), out.stderr[-3000:]


def test_help_is_fast_in_a_real_subprocess():
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "conceptgate", "--help"], capture_output=True,
                         text=True, cwd=os.path.dirname(ROOT), timeout=120)
    seconds = time.perf_counter() - t0
    assert out.returncode == 0 and "train" in out.stdout
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
    assert seconds < 20  # ~0.05 s on a quiet machine; torch alone takes seconds under load


def _parser(argv=None):
    from conceptgate import cli

    return cli.build_parser(argv)


def _sub_help(parser, *path) -> dict:
    """{sub-command: its one-line help} below ``path``."""
    import argparse

    p = parser
    for name in path:
        p = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    action = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return {c.dest: c.help for c in action._choices_actions}


def test_helps_say_what_each_command_does():
    p = _parser()
    top = _sub_help(p)
    assert all(w in top["train"] for w in ("SPM", "All-but-One", "Geom"))
    assert all(w in top["demo"] for w in ("UCE", "RECE", "SPM", "All-but-One", "Geom", "stack"))
    assert set(_sub_help(p, "train")) == {"spm", "abo", "geom"}
    edit = _sub_help(p, "edit")
    assert edit["uce"] != edit["rece"] and edit["uce"].startswith("UCE") and edit["rece"].startswith("RECE")
    sub = next(a for a in p._actions if hasattr(a, "choices") and isinstance(a.choices, dict)).choices
    uce, rece = (sub["edit"]._actions[1].choices[m] for m in ("uce", "rece"))
    assert uce.format_help() != rece.format_help() and uce.description != rece.description
    assert "--epochs" in rece.format_help() and "--epochs" not in uce.format_help()
    assert "--base" in sub["convert"].format_help()


def test_lazy_listings_match_the_modules_they_stand_for():
    """The one-line helps the CLI lists without importing a heavy module are the modules' own, and so are the
    gate rules and the demo's folder."""
    from conceptgate.adapters.gate import RULES
    from conceptgate.bench import demo as bench_demo
    from conceptgate.cli import bench, demo, gate, toyworld, train

    full = _parser()
    assert _sub_help(full, "bench") == bench.HELP
    assert _sub_help(full, "toyworld") == {"train": toyworld.TRAIN_HELP, "info": toyworld.INFO_HELP}
    assert _sub_help(full, "train")["abo"] == train.ABO_HELP
    assert gate.RULES == RULES and demo.OUT_DIR == bench_demo.OUT_DIR
    light = _parser(["--help"])                        # nothing named: everything only listed
    assert _sub_help(light, "bench") == bench.HELP and _sub_help(light, "train")["abo"] == train.ABO_HELP


def test_the_named_command_is_built_and_a_wrong_guess_falls_back():
    from conceptgate.bench.quality import run_quality
    from conceptgate.cli import main
    from conceptgate.cli.train import cmd_train_abo

    argv = ["bench", "quality", "--full", "--json", "x.json"]
    a = _parser(argv).parse_args(argv)
    assert a.func is run_quality and a.full and a.json == "x.json"
    argv = ["train", "abo", "--model", "toy", "--concept", "x", "--out", "o.safetensors"]
    guessed, rest = _parser(["inspect"]).parse_known_args(argv)   # built for another command: a listing only
    assert getattr(guessed.func, "unbuilt", False) and "--model" in rest
    assert _parser().parse_args(argv).func is cmd_train_abo
    with pytest.raises(SystemExit):
        main(["bench", "no-such-benchmark"])

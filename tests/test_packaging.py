"""The checkout works as a package, a ComfyUI pack and an A1111 extension; CI runs the README's command."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    return [line.strip() for line in text.splitlines() if line.strip().startswith("python3 -m venv")]


def test_ci_runs_the_readme_test_command():
    demo, tests = readme_commands()
    assert "conceptgate demo" in demo and "pytest" in tests
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    # .ci/run may add pip's -q flags, nothing else
    assert tests.replace("pip install ", "pip install -q ") in ci


def test_import_without_any_host():
    """`import conceptgate` in a plain Python never imports ComfyUI or A1111 modules."""
    code = ("import sys, conceptgate, conceptgate.adapters; "
            "bad = [m for m in ('comfy', 'folder_paths', 'nodes', 'modules', 'launch') if m in sys.modules]; "
            "assert not bad, bad; assert conceptgate.NODE_CLASS_MAPPINGS == {}; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.stdout.strip() == "ok", out.stderr


def test_cli_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "conceptgate", "--help"], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0
    for cmd in ("inspect", "convert"):
        assert re.search(rf"\b{cmd}\b", out.stdout)


def test_install_py_is_harmless_outside_a1111():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "install.py")], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr


def test_pack_never_imports_its_own_folders_by_bare_name():
    """ComfyUI owns the module name `nodes`, PyPI has an unrelated `adapters`: only relative imports."""
    offenders = []
    for folder in ("adapters", "nodes", "extension", "toyworld"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if f.endswith(".py"):
                    src = open(os.path.join(dirpath, f)).read()
                    if re.search(r"^\s*(import|from)\s+(adapters|nodes|extension|toyworld)\b", src, re.M):
                        offenders.append(os.path.join(dirpath, f))
    assert not offenders

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


def test_the_wheel_leaves_the_development_scripts_out():
    """Package data ships the toy world's erasers, not the scripts that trained and measured them; every
    package the wheel lists is imported by the code (no script-only package); no unused dependency."""
    import fnmatch
    import tomllib

    cfg = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))
    packages = cfg["tool"]["setuptools"]["packages"]
    data = cfg["tool"]["setuptools"]["package-data"]
    shipped = []
    for pkg, patterns in data.items():
        folder = os.path.join(ROOT, *pkg.split(".")[1:])
        for dirpath, _, files in os.walk(folder):
            for f in files:
                rel = os.path.relpath(os.path.join(dirpath, f), folder).replace(os.sep, "/")
                if any(fnmatch.fnmatch(rel, p) and rel.count("/") == p.count("/") for p in patterns):
                    shipped.append(f"{pkg}/{rel}")
    dev = [s for s in shipped if s.endswith((".py", ".sh"))]
    assert not dev, dev
    assert any(s.endswith("erasers/spm_triangle.safetensors") for s in shipped)
    assert "conceptgate.toyworld.erasers" not in packages
    for pkg in packages:  # a listed package ships its .py files: only packages that are not development tools
        assert not os.path.exists(os.path.join(ROOT, *pkg.split(".")[1:], "bench_spm.py"))
    deps = " ".join(cfg["project"]["dependencies"]) + open(os.path.join(ROOT, "requirements.txt")).read()
    assert "einops" not in deps and "einops" not in open(os.path.join(ROOT, "install.py")).read()
    assert "tqdm" in deps


def test_registry_icon_is_a_file_of_this_repository():
    """ComfyUI's registry shows ``[tool.comfy] Icon``: a raw URL of an SVG that this checkout ships."""
    import tomllib
    import xml.etree.ElementTree as ET

    cfg = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))
    icon = cfg["tool"]["comfy"]["Icon"]
    repo = cfg["project"]["urls"]["Repository"].removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{repo}/main/"
    assert icon.startswith(prefix), icon
    path = os.path.join(ROOT, icon[len(prefix):])
    root = ET.parse(path).getroot()
    assert root.tag.endswith("svg") and root.get("viewBox") == "0 0 256 256"

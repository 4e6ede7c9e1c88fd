"""The installed erasers and stack presets: one folder with ComfyUI's layout.

Default folder: ``<webui>/models/conceptgate`` (ComfyUI uses ``ComfyUI/models/conceptgate``), or the
folder in the setting ``conceptgate_dir`` (point both hosts at one folder to share files).
``*.safetensors`` are erasers, ``*.json`` are stack manifests; subfolders are allowed and become
part of the name (``styles/van_gogh``). An eraser's name is its path without the extension.

Listing reads only the safetensors headers; files are loaded (and validated) when used, and cached
by path and modification time.
"""

from __future__ import annotations

import os
import threading

from ..adapters.eraser import Eraser
from ..adapters.errors import EraserFileError
from ..adapters.files import load_eraser, read_header
from ..adapters.limits import clean_name
from ..adapters.stack import EraserStack
from .mechanisms import reachable_kind

FOLDER = "conceptgate"
OPTION = "conceptgate_dir"
ERASER_EXT = ".safetensors"
PRESET_EXT = ".json"


def _peek_kind(path: str) -> str | None:
    """The eraser kind from the safetensors header only (None when unreadable)."""
    try:
        header = read_header(path)  # size bounded before reading; a JSON list or garbage is an error
    except EraserFileError:
        return None
    meta = header.get("__metadata__") or {}
    return meta.get("conceptgate.kind", "weight")


class Library:
    def __init__(self, folder: str):
        self.folder = os.path.abspath(folder)
        self._cache: dict = {}
        self._lock = threading.Lock()

    def _scan(self, ext: str) -> dict[str, str]:
        found = {}
        if not os.path.isdir(self.folder):
            return found
        seen: set[tuple[int, int]] = set()  # (device, inode) of every folder walked: a symlink loop is walked once
        for root, dirs, files in os.walk(self.folder, followlinks=True):
            try:
                st = os.stat(root)
            except OSError:
                dirs[:] = []
                continue
            if (st.st_dev, st.st_ino) in seen:
                dirs[:] = []
                continue
            seen.add((st.st_dev, st.st_ino))
            dirs.sort()
            for f in sorted(files):
                if f.lower().endswith(ext):
                    path = os.path.join(root, f)
                    rel = os.path.relpath(path, self.folder)[: -len(ext)].replace(os.sep, "/")
                    found[rel] = path
        return found

    def eraser_files(self) -> dict[str, str]:
        """{name: path} of every eraser file, whatever its kind."""
        return self._scan(ERASER_EXT)

    def listing(self) -> tuple[list[str], dict[str, str]]:
        """(names usable now, {name: why not} for files whose mechanism is not reachable yet)."""
        usable, other = [], {}
        for name, path in self.eraser_files().items():
            kind = _peek_kind(path)
            why = reachable_kind(kind) if kind else "unreadable header"
            if why is None:
                usable.append(name)
            else:
                other[name] = why
        return usable, other

    def presets(self) -> dict[str, str]:
        """{file name: path} of the stack manifests (``name.json``)."""
        return {name + PRESET_EXT: path for name, path in self._scan(PRESET_EXT).items()}

    def path_of(self, name: str) -> str:
        shown = clean_name(name)  # the name as it may appear in a message (no control characters, cut)
        files = self.eraser_files()
        if name in files:
            return files[name]
        stem = [p for n, p in files.items() if n.rsplit("/", 1)[-1] == name]
        if len(stem) == 1:
            return stem[0]
        if len(stem) > 1:
            raise EraserFileError(shown, f"several erasers are named {shown!r} in {self.folder}: use the folder/name form")
        raise EraserFileError(shown, f"no eraser named {shown!r} in {self.folder}")

    def load(self, name: str) -> Eraser:
        path = self.path_of(name)
        key = (path, os.path.getmtime(path))
        with self._lock:
            if key not in self._cache:
                if len(self._cache) > 64:
                    self._cache.clear()
                eraser = load_eraser(path)
                eraser.name = name  # the name users type in <erase:...> and see in infotext
                self._cache[key] = eraser
            return self._cache[key]

    def load_preset(self, preset: str) -> EraserStack:
        presets = self.presets()
        if preset not in presets:
            raise EraserFileError(clean_name(preset), f"no stack preset {clean_name(preset)!r} in {self.folder}")
        return EraserStack.from_manifest(presets[preset], search_dirs=[self.folder])

    def name_for_hash(self, name: str, sha12: str | None) -> str | None:
        """The installed eraser called ``name``, else the one whose sha256 starts with ``sha12``."""
        files = self.eraser_files()
        if name in files or not sha12:
            return name if name in files else None
        from ..adapters.files import sha256_file

        for n, path in files.items():
            if sha256_file(path).startswith(sha12):
                return n
        return None


def default_folder(models_path: str | None, configured: str | None) -> str:
    if configured:
        return os.path.expanduser(configured)
    return os.path.join(models_path or os.path.join(os.getcwd(), "models"), FOLDER)

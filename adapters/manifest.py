"""Stack manifests: a small JSON file that references eraser files by relative path and sha256.

::

    {"conceptgate_stack": 1, "combine": "additive",
     "entries": [{"file": "snoopy.safetensors", "sha256": "<64 hex>", "name": "snoopy",
                  "concepts": ["snoopy"], "enabled": true, "strength": 1.0, "gate": {"rule": "ft", ...}}]}

Reading is strict, because a manifest may come from someone else (a shared preset folder):

* every problem is an :class:`EraserFileError` naming the manifest and the field
  (``entries[2].strength: ...``), never a ``KeyError`` / ``TypeError`` / ``RecursionError``;
* ``file`` is confined to the manifest's folder and the caller's ``search_dirs``: absolute paths,
  ``..`` that leaves them and symlinks that point outside are refused before anything is opened;
* ``sha256`` is required and checked before the file is parsed (``allow_unhashed=True`` lets an
  entry without one through, explicitly);
* ``best_effort: true`` is the user's opt-out of fail-closed for one entry: if its file is missing,
  changed or unreadable the entry is skipped and every gate report says so (default: the whole
  manifest is refused);
* ``enabled`` is a JSON boolean (the string ``"false"`` is an error), ``strength`` a finite number in
  ``[0, STRENGTH_LIMIT]`` (JSON ``NaN`` / ``Infinity`` and ``1e309`` are refused), ``concepts`` a
  list of strings, ``gate`` an object of known fields, ``combine`` one of the modes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import replace
import json
import math
import os
import re

from .errors import EraserFileError
from .files import load_eraser, sha256_file
from .gate import GateSettings
from .limits import STRENGTH_LIMIT, check_strength
from .stack import COMBINE_MODES, EraserStack

MANIFEST_VERSION = 1
MAX_MANIFEST_BYTES = 4_000_000
MAX_ENTRIES = 256
MAX_TEXT = 1000  # characters of a name or concept
ENTRY_FIELDS = ("file", "sha256", "name", "concepts", "enabled", "strength", "gate", "best_effort")
TOP_FIELDS = ("conceptgate_stack", "combine", "entries", "name", "description")
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")


class ManifestError(EraserFileError):
    """A stack manifest cannot be used; ``path`` is the manifest, the message names the field."""


def _reject_constant(name):
    raise ValueError(f"{name} is not allowed (numbers must be finite)")


def _inside(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives
        return False


def write_manifest(stack: EraserStack, path) -> dict:
    """Write ``stack`` as a JSON manifest next to its files (relative paths, sha256); returns the dict."""
    base = os.path.dirname(os.path.abspath(path))
    entries = []
    for i, e in enumerate(stack.entries):
        if not e.eraser.source:
            raise ValueError(f"eraser {e.eraser.name!r} has no file; save it before saving the stack")
        check_strength(e.strength, f"entries[{i}] ({e.eraser.name!r}) in a manifest", allow_negative=False)
        entries.append({
            "file": os.path.relpath(os.path.abspath(e.eraser.source), base),
            "sha256": e.eraser.sha256 or sha256_file(e.eraser.source),
            "name": e.eraser.name,
            "concepts": e.eraser.concepts,
            "enabled": e.enabled,
            "strength": e.strength,
            "gate": e.gate.to_dict(),
            **({"best_effort": True} if e.best_effort else {}),
        })
    manifest = {"conceptgate_stack": MANIFEST_VERSION, "combine": stack.combine, "entries": entries}
    with open(path, "w") as f:
        json.dump(manifest, f, indent=2, allow_nan=False)
    return manifest


def versioned_json(path, text: str, error, what: str, version_key: str, version: int, fields) -> dict:
    """A ConceptGate JSON file's top object (a stack manifest, an operator policy), checked for finite
    numbers, depth, its version key and unknown fields; every problem is ``error(path, message)``."""
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise error(path, f"not a usable {what}: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, NaN/Infinity, over-long integers
        raise error(path, f"not a JSON {what}: {str(e)[:200]}") from None
    if not isinstance(data, dict):
        raise error(path, f"not a ConceptGate {what}: a JSON {type(data).__name__}, not an object")
    found = data.get(version_key)
    if isinstance(found, bool) or found != version:
        raise error(path, f"not a ConceptGate {what} (needs '{version_key}': {version})")
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise error(path, f"unknown field {str(unknown[0])[:60]!r} (known: {', '.join(fields)})")
    return data


def parse_manifest(path, text: str) -> dict:
    """The manifest's JSON, checked for shape (not for files); raises :class:`ManifestError`."""
    data = versioned_json(path, text, ManifestError, "stack manifest", "conceptgate_stack", MANIFEST_VERSION, TOP_FIELDS)
    combine = data.get("combine", "additive")
    if not isinstance(combine, str) or combine not in COMBINE_MODES:
        raise ManifestError(path, f"combine: must be one of {', '.join(COMBINE_MODES)}, got {str(combine)[:40]!r}")
    entries = data.get("entries", [])
    if not isinstance(entries, list):
        raise ManifestError(path, "entries: must be a list of objects")
    if len(entries) > MAX_ENTRIES:
        raise ManifestError(path, f"entries: {len(entries)} entries, at most {MAX_ENTRIES}")
    for i, item in enumerate(entries):
        _check_entry(path, i, item)
    return data


def _text(path, where: str, value, allow_empty=False) -> str:
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise ManifestError(path, f"{where}: must be a {'' if allow_empty else 'non-empty '}string")
    if len(value) > MAX_TEXT or any(ord(c) < 32 for c in value):
        raise ManifestError(path, f"{where}: at most {MAX_TEXT} characters, no control characters")
    return value


def _check_entry(path, i: int, item) -> None:
    at = f"entries[{i}]"
    if not isinstance(item, dict):
        raise ManifestError(path, f"{at}: must be an object with at least 'file' and 'sha256'")
    unknown = [k for k in item if k not in ENTRY_FIELDS]
    if unknown:
        raise ManifestError(path, f"{at}.{str(unknown[0])[:60]}: unknown field (known: {', '.join(ENTRY_FIELDS)})")
    if "file" not in item:
        raise ManifestError(path, f"{at}.file: missing")
    file = item["file"]
    if not isinstance(file, str) or not file.strip() or "\x00" in file or len(file) > 4096:
        raise ManifestError(path, f"{at}.file: must be a non-empty relative path")
    if "sha256" in item and item["sha256"] not in (None, "") and (
            not isinstance(item["sha256"], str) or not _SHA256.match(item["sha256"])):
        raise ManifestError(path, f"{at}.sha256: must be 64 hexadecimal digits")
    if "name" in item:
        _text(path, f"{at}.name", item["name"])
    if "concepts" in item and item["concepts"] is not None:
        concepts = item["concepts"]
        if not isinstance(concepts, list):
            raise ManifestError(path, f"{at}.concepts: must be a list of strings, e.g. [\"snoopy\"], "
                                      f"not a {type(concepts).__name__}")
        if len(concepts) > MAX_ENTRIES:
            raise ManifestError(path, f"{at}.concepts: at most {MAX_ENTRIES} concepts")
        for j, c in enumerate(concepts):
            _text(path, f"{at}.concepts[{j}]", c)
    if "best_effort" in item and not isinstance(item["best_effort"], bool):
        raise ManifestError(path, f"{at}.best_effort: must be true or false (a JSON boolean)")
    if "enabled" in item and not isinstance(item["enabled"], bool):
        raise ManifestError(path, f"{at}.enabled: must be true or false (a JSON boolean), got {str(item['enabled'])[:40]!r}")
    if "strength" in item:
        try:
            check_strength(item["strength"], f"{at}.strength", allow_negative=False)
        except ValueError as e:
            raise ManifestError(path, str(e)) from None
    if "gate" in item and item["gate"] is not None:
        _gate(path, f"{at}.gate", item["gate"])


def _gate(path, where: str, gate) -> GateSettings:
    if not isinstance(gate, dict):
        raise ManifestError(path, f"{where}: must be an object such as {{\"rule\": \"ft\"}}")
    fields = {f.name: f for f in dataclasses.fields(GateSettings)}
    for key, value in gate.items():
        if key not in fields:
            raise ManifestError(path, f"{where}.{str(key)[:60]}: unknown field (known: {', '.join(fields)})")
        default = fields[key].default
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ManifestError(path, f"{where}.{key}: must be true or false")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (
                not math.isfinite(float(value)) or abs(float(value)) > 1e6):
            raise ManifestError(path, f"{where}.{key}: must be a finite number")
        if isinstance(value, (dict, list)):
            raise ManifestError(path, f"{where}.{key}: must be a plain value, not a {type(value).__name__}")
    try:
        return GateSettings.from_dict(gate)
    except (ValueError, TypeError, OverflowError) as e:
        raise ManifestError(path, f"{where}: {str(e)[:200]}") from None


def _resolve(path, i: int, file: str, base: str, search_dirs) -> str:
    """The eraser file an entry names, confined to ``base`` and ``search_dirs`` (symlinks resolved)."""
    at = f"entries[{i}].file"
    if os.path.isabs(file) or file.startswith(("\\", "~")) or re.match(r"^[A-Za-z]:", file):
        raise ManifestError(path, f"{at}: {file[:200]!r} is an absolute path; manifests name their files "
                                  "relative to the manifest's folder")
    roots = [os.path.realpath(base)] + [os.path.realpath(d) for d in search_dirs]
    first = os.path.realpath(os.path.join(base, file))
    if not any(_inside(first, r) for r in roots):
        raise ManifestError(path, f"{at}: {file[:200]!r} points outside the manifest's folder"
                                  f"{' and the eraser folders' if search_dirs else ''}; refused")
    candidates = [first] + [os.path.realpath(os.path.join(d, os.path.basename(file))) for d in search_dirs]
    for c in candidates:
        if os.path.isfile(c) and any(_inside(c, r) for r in roots):
            return c
    raise ManifestError(path, f"{at}: eraser file {file[:200]!r} not found next to the manifest"
                              f"{' or in the eraser folders' if search_dirs else ''}")


def _load_entry(path, i: int, item: dict, base: str, search_dirs, allow_unhashed: bool):
    """(eraser, gate settings or None, strength) of one checked entry; raises :class:`EraserFileError`."""
    digest = item.get("sha256") or None
    if digest is None and not allow_unhashed:
        raise ManifestError(path, f"entries[{i}].sha256: missing; a manifest pins each file by its sha256 "
                                  "(python -m conceptgate inspect prints it)")
    file = _resolve(path, i, item["file"], base, search_dirs)
    if digest is not None and sha256_file(file) != digest.lower():
        raise EraserFileError(file, f"sha256 differs from the manifest {os.path.basename(path)} (file changed?)")
    eraser = load_eraser(file, concepts=item.get("concepts") or None)
    gate = _gate(path, f"entries[{i}].gate", item["gate"]) if item.get("gate") is not None else None
    strength = check_strength(item.get("strength", 1.0), f"entries[{i}].strength", allow_negative=False)
    return eraser, gate, strength


def read_manifest(path, search_dirs=(), allow_unhashed: bool = False, cls=EraserStack) -> EraserStack:
    """Load the stack a manifest describes; every problem is an :class:`EraserFileError`."""
    path = str(path)
    try:
        if os.path.getsize(path) > MAX_MANIFEST_BYTES:
            raise ManifestError(path, f"stack manifest larger than {MAX_MANIFEST_BYTES} bytes; refused")
        with open(path, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise ManifestError(path, "stack manifest not found") from None
    except IsADirectoryError:
        raise ManifestError(path, "this is a folder, not a stack manifest") from None
    except OSError as e:
        raise ManifestError(path, f"stack manifest cannot be read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ManifestError(path, "not a JSON stack manifest (not UTF-8 text)") from None
    data = parse_manifest(path, text)
    base = os.path.dirname(os.path.abspath(path))
    stack = cls(combine=data.get("combine", "additive"))
    for i, item in enumerate(data.get("entries", [])):
        try:
            eraser, gate, strength = _load_entry(path, i, item, base, search_dirs, allow_unhashed)
        except EraserFileError as e:
            if not item.get("best_effort", False):
                raise
            # the user's explicit opt-out of fail-closed for this entry: skip it, say so in every report
            stack = replace(stack, skipped=stack.skipped + (f"entries[{i}] ({str(item.get('name') or item['file'])[:80]}): {e}",))
            continue
        stack = stack.with_eraser(eraser, item.get("enabled", True), strength, gate,
                                  best_effort=item.get("best_effort", False))
    return stack


__all__ = ["MANIFEST_VERSION", "ManifestError", "STRENGTH_LIMIT", "parse_manifest", "read_manifest", "write_manifest"]

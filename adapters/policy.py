"""Operator policy: erasers a shared server applies to every image, whatever a workflow, an API call or
a prompt asks for.

The operator writes one JSON file and points the host at it (``CONCEPTGATE_POLICY=/path/policy.json``,
or the host's own setting: ComfyUI reads ``conceptgate_policy.json`` in its base folder, the webuis
``--conceptgate-policy``)::

    {"conceptgate_policy": 1,
     "search_dirs": ["/srv/erasers"],
     "locked": [{"file": "spm_triangle.safetensors", "sha256": "<64 hex>",
                 "strength": 1.0, "gate": {"rule": "context"}}]}

Rules the hosts enforce (and their tests check):

* a locked entry is always on: users may add erasers or raise a locked one's strength, never lower,
  disable or remove it; its gate settings are the operator's;
* ``sha256`` is required: the file that is applied is the file the operator pinned;
* files are found relative to the policy's folder or in ``search_dirs`` (relative to the policy's
  folder or absolute: the operator wrote them), never elsewhere;
* anything wrong with the policy (unreadable, malformed, a file missing or changed, a locked eraser
  that does not fit the model) stops every generation with the reason. A server with a broken
  policy makes no images, rather than unerased ones.

The policy is read again when the file changes (size or modification time), so an operator's edit
takes effect at the next generation.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, replace

from .errors import EraserFileError
from .files import sha256_file
from .manifest import MAX_ENTRIES, MAX_MANIFEST_BYTES, ManifestError, _check_entry, _load_entry, versioned_json
from .stack import EraserStack, StackEntry

POLICY_VERSION = 1
POLICY_ENV = "CONCEPTGATE_POLICY"
POLICY_FILE = "conceptgate_policy.json"
TOP_FIELDS = ("conceptgate_policy", "search_dirs", "locked", "description")
LOCKED_FIELDS = ("file", "sha256", "name", "concepts", "strength", "gate")


class PolicyError(EraserFileError):
    """The operator policy cannot be used: every generation stops with this message."""


@dataclass(frozen=True)
class Policy:
    path: str
    stack: EraserStack  # the locked entries (``StackEntry.locked``)

    @property
    def entries(self) -> tuple[StackEntry, ...]:
        return self.stack.entries

    def is_locked(self, eraser) -> bool:
        return any(_same_file(e.eraser, eraser) for e in self.entries)

    def enforce(self, stack: EraserStack | None) -> EraserStack:
        """``stack`` (what the user asked for) with every locked entry in force.

        A user entry for a locked file keeps the higher of the two strengths and takes the operator's
        gate settings; it cannot be disabled. Locked entries the user did not ask for are appended.
        """
        stack = stack or EraserStack()
        entries = list(stack.entries)
        for lock in self.entries:
            for i, e in enumerate(entries):
                if _same_file(e.eraser, lock.eraser):
                    strength = max(lock.strength, e.strength if e.enabled else 0.0)
                    entries[i] = replace(lock, strength=strength)
                    break
            else:
                entries.append(lock)
        return replace(stack, entries=tuple(entries))

    def without_locked(self, stack: EraserStack) -> EraserStack:
        """``stack`` less the entries for locked files (a host that applies the lock separately uses
        this, so a locked eraser is never applied twice)."""
        return replace(stack, entries=tuple(e for e in stack.entries if not self.is_locked(e.eraser)))


def _same_file(a, b) -> bool:
    if a.sha256 and b.sha256:
        return a.sha256 == b.sha256
    return bool(a.source and b.source) and os.path.realpath(a.source) == os.path.realpath(b.source)


def configured_path(host_default: str | None = None) -> str | None:
    """The policy file in force: ``$CONCEPTGATE_POLICY`` if set (an empty value means none), else the
    host's default if that file exists. A configured path that does not exist is returned as is, so
    that reading it fails (closed) instead of silently running without a lock."""
    env = os.environ.get(POLICY_ENV)
    if env is not None:
        return env or None
    if host_default and os.path.exists(host_default):
        return host_default
    return None


def read_policy(path, search_dirs=()) -> Policy:
    """The locked stack a policy file describes; every problem is a :class:`PolicyError` naming the field."""
    path = os.path.abspath(str(path))
    try:
        if os.path.getsize(path) > MAX_MANIFEST_BYTES:
            raise PolicyError(path, f"policy larger than {MAX_MANIFEST_BYTES} bytes; refused")
        with open(path, "rb") as f:
            text = f.read(MAX_MANIFEST_BYTES + 1).decode("utf-8")
    except FileNotFoundError:
        raise PolicyError(path, f"policy file not found (named by ${POLICY_ENV} or the host's setting); "
                                "no image is made until it is restored or the setting removed") from None
    except UnicodeDecodeError:
        raise PolicyError(path, "not a JSON policy (not UTF-8 text)") from None
    except OSError as e:
        raise PolicyError(path, f"policy cannot be read ({e.strerror or e})") from None
    data = versioned_json(path, text, PolicyError, "policy", "conceptgate_policy", POLICY_VERSION, TOP_FIELDS)
    base = os.path.dirname(path)
    dirs = data.get("search_dirs", [])
    if not isinstance(dirs, list) or not all(isinstance(d, str) and d.strip() and "\x00" not in d for d in dirs):
        raise PolicyError(path, "search_dirs: must be a list of folder paths")
    roots = [os.path.join(base, d) for d in dirs] + [str(d) for d in search_dirs]
    locked = data.get("locked")
    if not isinstance(locked, list) or not locked:
        raise PolicyError(path, "locked: must be a non-empty list of entries ({\"file\": ..., \"sha256\": ...})")
    if len(locked) > MAX_ENTRIES:
        raise PolicyError(path, f"locked: {len(locked)} entries, at most {MAX_ENTRIES}")
    stack = EraserStack()
    for i, item in enumerate(locked):
        where = f"locked[{i}]"
        try:
            if isinstance(item, dict):
                extra = [k for k in item if k not in LOCKED_FIELDS]
                if extra:
                    raise ManifestError(path, f"{where}.{str(extra[0])[:60]}: not allowed in a locked entry "
                                              f"(known: {', '.join(LOCKED_FIELDS)}; locked entries are always on)")
                if not item.get("sha256"):
                    raise ManifestError(path, f"{where}.sha256: required for a locked entry "
                                              "(python -m conceptgate inspect prints it)")
            _check_entry(path, i, item)
            eraser, gate, strength = _load_entry(path, i, item, base, roots, allow_unhashed=False)
        except EraserFileError as e:  # manifest wording says entries[i]; a policy says locked[i]
            raise PolicyError(e.path, e.problem.replace(f"entries[{i}]", where)) from None
        stack = stack.with_eraser(eraser, True, strength, gate, locked=True)
    return Policy(path, stack)


class PolicyCache:
    """The policy in force, read again when its file changes; a failure is kept and raised on every
    call until the file changes (each generation stops with the same message)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._key = None
        self._value: Policy | BaseException | None = None

    def get(self, path: str | None, search_dirs=()) -> Policy | None:
        if not path:
            return None
        try:
            st = os.stat(path)
            key = (os.path.abspath(path), st.st_mtime_ns, st.st_size, tuple(search_dirs))
        except OSError:
            key = (os.path.abspath(path), None, None, tuple(search_dirs))
        with self._lock:
            if key != self._key:
                try:
                    self._value = read_policy(path, search_dirs)
                except EraserFileError as e:
                    self._value = e if isinstance(e, PolicyError) else PolicyError(e.path, e.problem)
                self._key = key
            value = self._value
        if isinstance(value, BaseException):
            raise value
        # a locked file replaced on disk after the policy was read: refuse rather than apply other weights
        for e in value.entries:
            if e.eraser.source and _changed(e.eraser):
                with self._lock:
                    self._key = None
                raise PolicyError(e.eraser.source, "a locked eraser file changed on disk since the policy was read "
                                                   "(sha256 no longer matches); no image is made until it is restored")
        return value


def _changed(eraser) -> bool:
    try:
        st = os.stat(eraser.source)
    except OSError:
        return True
    stamp = (st.st_mtime_ns, st.st_size)
    seen = getattr(eraser, "_policy_stamp", None)
    if seen == stamp:
        return False
    same = sha256_file(eraser.source) == eraser.sha256
    if same:  # hashed once per change of the file's stamp, not at every generation
        eraser._policy_stamp = stamp
    return not same


__all__ = ["POLICY_ENV", "POLICY_FILE", "Policy", "PolicyCache", "PolicyError", "configured_path", "read_policy"]

"""The script's arguments, the ``<erase:name:strength>`` prompt syntax and the infotext fields.

Pure Python (no host import), so every rule here is unit-tested directly.

Script arguments (the order of the components ``Script.ui`` returns, and of the API's
``alwayson_scripts["conceptgate"]["args"]``)::

    [enabled, erasers, preset, combine, gate, cond_only]

* ``enabled`` (bool): use the erasers selected in the accordion and the preset. Prompt tags act
  regardless, like ``<lora:...>``.
* ``erasers`` (str): the accordion's selection, ``"name:strength, name:strength"``.
* ``preset`` (str): a stack manifest (``.json``) from the eraser folder, or ``"None"``.
* ``combine`` (str): ``additive`` (default) or ``official`` (SPM's reference arithmetic).
* ``gate`` (str): gate rule for erasers selected here or by tag: ``ft`` (official), ``always``,
  ``cos``, ``tokens``. Preset entries keep the rule saved in the manifest.
* ``cond_only`` (bool): erasers selected here or by tag leave the unconditional rows alone.

A dict in ``args[0]`` with these keys is accepted too (convenient for API clients).

Infotext keys written to the image's generation parameters::

    ConceptGate: "snoopy:1:0.873, van gogh:0.8:off"      name:strength:gate (off = disabled)
    ConceptGate hashes: "snoopy: 1a2b3c4d5e6f, van gogh: 0f9e8d7c6b5a"   sha256, 12 hex digits
    ConceptGate preset / ConceptGate combine / ConceptGate gate rule / ConceptGate cond only
                                                            (only when not the default)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..adapters.stack import COMBINE_MODES

TITLE = "ConceptGate"
NETWORK = "erase"  # <erase:name:strength>
GATE_RULES = ("ft", "always", "cos", "tokens")
NO_PRESET = "None"

KEY = "ConceptGate"
KEY_HASHES = "ConceptGate hashes"
KEY_PRESET = "ConceptGate preset"
KEY_COMBINE = "ConceptGate combine"
KEY_GATE = "ConceptGate gate rule"
KEY_COND_ONLY = "ConceptGate cond only"
INFOTEXT_KEYS = (KEY, KEY_HASHES, KEY_PRESET, KEY_COMBINE, KEY_GATE, KEY_COND_ONLY)

# A1111's extra-network syntax (modules/extra_networks.py): <(\w+):([^>]+)>, items split on ':'.
TAG = re.compile(r"<(\w+):([^>]+)>")


@dataclass
class ScriptArgs:
    enabled: bool = False
    erasers: list[tuple[str, float]] = field(default_factory=list)
    preset: str = NO_PRESET
    combine: str = "additive"
    gate: str = "ft"
    cond_only: bool = False

    @classmethod
    def from_args(cls, args) -> "ScriptArgs":
        args = list(args or ())
        if args and isinstance(args[0], dict):
            d = args[0]
            args = [d.get("enabled", True), d.get("erasers", ""), d.get("preset", NO_PRESET),
                    d.get("combine", "additive"), d.get("gate", "ft"), d.get("cond_only", False)]
        defaults = [False, "", NO_PRESET, "additive", "ft", False]
        args = args + defaults[len(args):]
        enabled, erasers, preset, combine, gate, cond_only = args[:6]
        if combine not in COMBINE_MODES:
            raise ValueError(f"ConceptGate: unknown combine mode {combine!r} ({', '.join(COMBINE_MODES)})")
        if gate not in GATE_RULES:
            raise ValueError(f"ConceptGate: unknown gate rule {gate!r} ({', '.join(GATE_RULES)})")
        selection = parse_selection(erasers) if isinstance(erasers, str) else [(str(n), float(s)) for n, s in erasers]
        return cls(bool(enabled), selection, preset or NO_PRESET, combine, gate, bool(cond_only))

    def to_args(self) -> list:
        return [self.enabled, format_selection(self.erasers), self.preset, self.combine, self.gate, self.cond_only]


# ------------------------------------------------------------------ selection strings
def parse_selection(text: str) -> list[tuple[str, float]]:
    """``"a:1, b c:0.5, d"`` -> ``[("a", 1.0), ("b c", 0.5), ("d", 1.0)]`` (strength defaults to 1)."""
    out = []
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, strength = part.rpartition(":")
        if not sep:
            name, strength = part, "1"
        try:
            value = float(strength)
        except ValueError:  # a name containing ':' is not allowed (the tag syntax splits on it)
            raise ValueError(f"ConceptGate: bad strength in {part!r} (expected name:number)") from None
        out.append((name.strip(), value))
    return out


def _num(x: float) -> str:
    return f"{x:.3f}".rstrip("0").rstrip(".") if x != int(x) else str(int(x))


def format_selection(items) -> str:
    return ", ".join(f"{n}:{_num(s)}" for n, s in items)


# ------------------------------------------------------------------ prompt tags
def tag_params(items: list[str]) -> tuple[str, float]:
    """The items of one ``<erase:...>`` tag (A1111's ``ExtraNetworkParams.items``) -> (name, strength)."""
    if not items or not items[0].strip():
        raise ValueError("ConceptGate: <erase:...> needs an eraser name, e.g. <erase:snoopy:1>")
    name = items[0].strip()
    strength = 1.0
    if len(items) > 1 and items[1].strip():
        try:
            strength = float(items[1])
        except ValueError:
            raise ValueError(f"ConceptGate: bad strength {items[1]!r} in <erase:{':'.join(items)}>") from None
    return name, strength


def tags_in(prompt: str) -> list[tuple[str, float]]:
    """The ``<erase:...>`` tags of a prompt (used when infotext is pasted)."""
    return [tag_params(m.group(2).split(":")) for m in TAG.finditer(prompt or "") if m.group(1) == NETWORK]


# ------------------------------------------------------------------ infotext
@dataclass
class UsedEraser:
    name: str
    strength: float
    gate: float | None  # None: disabled
    sha256: str | None


def infotext_params(used: list[UsedEraser], args: ScriptArgs) -> dict[str, str]:
    """The entries for ``p.extra_generation_params`` (empty when no eraser was used)."""
    if not used:
        return {}
    out = {KEY: ", ".join(f"{u.name}:{_num(u.strength)}:{'off' if u.gate is None else f'{u.gate:.3f}'}" for u in used)}
    hashes = [f"{u.name}: {u.sha256[:12]}" for u in used if u.sha256]
    if hashes:
        out[KEY_HASHES] = ", ".join(hashes)
    if args.enabled and args.preset != NO_PRESET:
        out[KEY_PRESET] = args.preset
    if args.combine != "additive":
        out[KEY_COMBINE] = args.combine
    if args.gate != "ft":
        out[KEY_GATE] = args.gate
    if args.cond_only:
        out[KEY_COND_ONLY] = "True"
    return out


def parse_used(value: str) -> list[tuple[str, float, str]]:
    out = []
    for part in (value or "").split(","):
        bits = part.strip().rsplit(":", 2)
        if len(bits) == 3:
            try:
                out.append((bits[0].strip(), float(bits[1]), bits[2].strip()))
            except ValueError:
                continue
    return out


def parse_hashes(value: str) -> dict[str, str]:
    out = {}
    for part in (value or "").split(","):
        name, sep, h = part.rpartition(":")
        if sep:
            out[name.strip()] = h.strip()
    return out


def restore(params: dict, rename=None) -> ScriptArgs:
    """Script arguments from pasted generation parameters.

    Erasers that came from ``<erase:...>`` tags are restored with the prompt, so they are left out of
    the selection. ``rename(name, hash12)`` may map a name to the installed file with that hash.
    """
    if KEY not in params:
        return ScriptArgs()
    from_tags = {n for n, _ in tags_in(params.get("Prompt", ""))}
    hashes = parse_hashes(params.get(KEY_HASHES, ""))
    selection = []
    for name, strength, gate in parse_used(params[KEY]):
        if name in from_tags or gate == "off":
            continue
        if rename is not None:
            name = rename(name, hashes.get(name)) or name
        selection.append((name, strength))
    preset = params.get(KEY_PRESET, NO_PRESET)
    return ScriptArgs(
        enabled=bool(selection) or preset != NO_PRESET,
        erasers=selection,
        preset=preset,
        combine=params.get(KEY_COMBINE, "additive"),
        gate=params.get(KEY_GATE, "ft"),
        cond_only=str(params.get(KEY_COND_ONLY, "False")).lower() == "true",
    )

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
    ConceptGate Geom: "watermark_geom"                      the Geom-Erasing tokens this image got
    ConceptGate All-but-One: "abo_tri:triangle>square"      the All-but-One terms that fired for it

Gates, Geom and All-but-One differ per image of a batch: those values are :class:`PerImage`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ..adapters.limits import STRENGTH_LIMIT, check_strength, clean_name
from ..adapters.gate import DEFAULT_RULE, RULES as GATE_RULES
from ..adapters.stack import COMBINE_MODES

TITLE = "ConceptGate"
NETWORK = "erase"  # <erase:name:strength>
NO_PRESET = "None"

KEY = "ConceptGate"
KEY_HASHES = "ConceptGate hashes"
KEY_PRESET = "ConceptGate preset"
KEY_COMBINE = "ConceptGate combine"
KEY_GATE = "ConceptGate gate rule"
KEY_COND_ONLY = "ConceptGate cond only"
KEY_LOCKED = "ConceptGate locked"  # names of the entries the operator's policy locked
KEY_GEOM = "ConceptGate Geom"  # per image: the Geom-Erasing erasers whose tokens joined its negative
KEY_ABO = "ConceptGate All-but-One"  # per image: the All-but-One terms that fired (name:erase>alternative)
INFOTEXT_KEYS = (KEY, KEY_HASHES, KEY_PRESET, KEY_COMBINE, KEY_GATE, KEY_COND_ONLY)

# A1111's extra-network syntax (modules/extra_networks.py): <(\w+):([^>]+)>, items split on ':'.
TAG = re.compile(r"<(\w+):([^>]+)>")
MAX_NAME = 200  # characters of an eraser name written into infotext or shown in a message


class InputError(ValueError):
    """Bad script arguments, ``<erase:...>`` tag or selection string; ``str(err)`` is for the user."""


def user_strength(value, where: str) -> float:
    """A strength typed by a user, an API client or a prompt: a finite number in [0, STRENGTH_LIMIT]."""
    try:
        return check_strength(value, f"ConceptGate: {where}", allow_negative=False)
    except ValueError as e:
        raise InputError(f"{e} (negative, NaN and infinite strengths are refused)") from None


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~&\"'=:$%^])")


def markdown_text(text, max_chars: int = MAX_NAME) -> str:
    """``text`` (an eraser name, a folder) as literal Markdown: control characters removed, cut to
    ``max_chars``, every Markdown/HTML special character backslash-escaped (no markup, links or HTML)."""
    return _MD_SPECIAL.sub(r"\\\1", clean_name(str(text), max_chars))


def shown(name) -> str:
    """An eraser name as it may appear in a message or the UI: no control characters, at most MAX_NAME."""
    return repr(clean_name(str(name), MAX_NAME))


@dataclass
class ScriptArgs:
    enabled: bool = False
    erasers: list[tuple[str, float]] = field(default_factory=list)
    preset: str = NO_PRESET
    combine: str = "additive"
    gate: str = DEFAULT_RULE
    cond_only: bool = False

    @classmethod
    def from_args(cls, args) -> "ScriptArgs":
        args = list(args or ())
        if args and isinstance(args[0], dict):
            d = args[0]
            args = [d.get("enabled", True), d.get("erasers", ""), d.get("preset", NO_PRESET),
                    d.get("combine", "additive"), d.get("gate", DEFAULT_RULE), d.get("cond_only", False)]
        defaults = [False, "", NO_PRESET, "additive", DEFAULT_RULE, False]
        args = args + defaults[len(args):]
        enabled, erasers, preset, combine, gate, cond_only = args[:6]
        if not isinstance(combine, str) or combine not in COMBINE_MODES:
            raise InputError(f"ConceptGate: unknown combine mode {str(combine)[:40]!r} ({', '.join(COMBINE_MODES)})")
        if not isinstance(gate, str) or gate not in GATE_RULES:
            raise InputError(f"ConceptGate: unknown gate rule {str(gate)[:40]!r} ({', '.join(GATE_RULES)})")
        if isinstance(erasers, str):
            selection = parse_selection(erasers)
        else:
            try:
                selection = [(str(n), s) for n, s in (erasers or ())]
            except (TypeError, ValueError):
                raise InputError("ConceptGate: erasers must be a string 'name:strength, ...' or a list of "
                                 "[name, strength] pairs") from None
        selection = [(n, user_strength(s, f"eraser {shown(n)}")) for n, s in selection]
        if preset is not None and not isinstance(preset, str):
            raise InputError("ConceptGate: preset must be the name of a .json stack preset or 'None'")
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
            raise InputError(f"ConceptGate: bad strength in {part[:200]!r} (expected name:number)") from None
        if not math.isfinite(value):
            raise InputError(f"ConceptGate: bad strength in {part[:200]!r} (not a finite number)")
        out.append((unescape_name(name.strip()), value))
    return out


def _num(x: float) -> str:
    return f"{x:.3f}".rstrip("0").rstrip(".") if x != int(x) else str(int(x))


def format_selection(items) -> str:
    """The inverse of :func:`parse_selection` (names with ``,`` ``:`` ``%`` are percent-encoded)."""
    return ", ".join(f"{escape_name(n, None)}:{_num(s)}" for n, s in items)


# ------------------------------------------------------------------ prompt tags
def tag_params(items: list[str]) -> tuple[str, float]:
    """The items of one ``<erase:...>`` tag (A1111's ``ExtraNetworkParams.items``) -> (name, strength)."""
    if not items or not items[0].strip():
        raise InputError("ConceptGate: <erase:...> needs an eraser name, e.g. <erase:snoopy:1>")
    name = items[0].strip()
    strength = 1.0
    tag = f"<erase:{':'.join(items)}>"[:200]
    if len(items) > 1 and items[1].strip():
        try:
            strength = float(items[1])
        except ValueError:
            raise InputError(f"ConceptGate: bad strength {items[1][:40]!r} in {tag}") from None
        strength = user_strength(strength, tag)
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
    locked: bool = False  # by the operator's policy


def infotext_params(used: list[UsedEraser], args: ScriptArgs) -> dict[str, str]:
    """The entries for ``p.extra_generation_params`` (empty when no eraser was used)."""
    if not used:
        return {}
    out = {KEY: ", ".join(f"{escape_name(u.name)}:{_num(u.strength)}:{_gate_text(u.gate)}" for u in used)}
    hashes = [f"{escape_name(u.name)}: {u.sha256[:12]}" for u in used if u.sha256]
    if hashes:
        out[KEY_HASHES] = ", ".join(hashes)
    locked = [escape_name(u.name) for u in used if u.locked]
    if locked:
        out[KEY_LOCKED] = ", ".join(locked)
    if args.enabled and args.preset != NO_PRESET:
        out[KEY_PRESET] = args.preset
    if args.combine != "additive":
        out[KEY_COMBINE] = args.combine
    if args.gate != DEFAULT_RULE:
        out[KEY_GATE] = args.gate
    if args.cond_only:
        out[KEY_COND_ONLY] = "True"
    return out


class PerImage(str):
    """An infotext value that differs per image: the job's first image's text (what a webui that writes one
    value per batch shows) and, called as the webui calls callable ``extra_generation_params`` values with
    the image's ``index`` (A1111 >= 1.8, Forge, reForge), that image's own text (None: key left out)."""

    def __new__(cls, text: str, values: dict[int, str | None]):
        obj = super().__new__(cls, text)
        obj.values = dict(values)
        return obj

    def __call__(self, *args, **kwargs):
        index = kwargs.get("index")
        if isinstance(index, int) and index in self.values:
            return self.values[index]
        return str(self)

    def __reduce__(self):  # pickles / deep-copies as the plain first-image text
        return (str, (str(self),))


def _gate_text(gate) -> str:
    if gate is None:
        return "off"
    return f"{gate:.3f}" if math.isfinite(gate) else "nan"


_ESCAPED = re.compile(r"[%,:<>\"\x00-\x1f\x7f]")


def escape_name(name: str, max_chars: int | None = MAX_NAME) -> str:
    """A name for the infotext: at most MAX_NAME characters, and ``%``, ``,``, ``:``, ``<``, ``>``, ``"`` and
    control characters percent-encoded, so the fields split back exactly (:func:`unescape_name`). A longer
    name is cut; pasting finds its file again by the hash next to it."""
    return _ESCAPED.sub(lambda m: f"%{ord(m.group()):02X}", str(name)[:max_chars])


def unescape_name(text: str) -> str:
    return re.sub(r"%([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), text)


def parse_used(value: str) -> list[tuple[str, float, str]]:
    out = []
    for part in (value if isinstance(value, str) else "").split(","):
        bits = part.strip().rsplit(":", 2)
        if len(bits) == 3:
            try:
                strength = float(bits[1])
            except ValueError:
                continue
            if math.isfinite(strength) and 0 <= strength <= STRENGTH_LIMIT and bits[0].strip():
                out.append((unescape_name(bits[0].strip()), strength, bits[2].strip()))
    return out


def parse_hashes(value: str) -> dict[str, str]:
    out = {}
    for part in (value if isinstance(value, str) else "").split(","):
        name, sep, h = part.rpartition(":")
        if sep:
            out[unescape_name(name.strip())] = h.strip()
    return out


def restore(params: dict, rename=None) -> ScriptArgs:
    """Script arguments from pasted generation parameters.

    Erasers that came from ``<erase:...>`` tags are restored with the prompt, so they are left out of
    the selection. ``rename(name, hash12)`` may map a name to the installed file with that hash.
    """
    if not isinstance(params, dict) or not isinstance(params.get(KEY), str):
        return ScriptArgs()
    from_tags = set()
    for m in TAG.finditer(params.get("Prompt") if isinstance(params.get("Prompt"), str) else ""):
        if m.group(1) == NETWORK:
            try:
                from_tags.add(tag_params(m.group(2).split(":"))[0])
            except InputError:  # a bad tag stays in the prompt, where the generation will refuse it
                continue
    hashes = parse_hashes(params.get(KEY_HASHES, ""))
    selection = []
    for name, strength, gate in parse_used(params[KEY]):
        if name in from_tags or gate == "off":
            continue
        if rename is not None:
            name = rename(name, hashes.get(name)) or name
        selection.append((name, strength))
    preset = params.get(KEY_PRESET, NO_PRESET)
    preset = preset if isinstance(preset, str) and preset.strip() else NO_PRESET
    combine, gate = params.get(KEY_COMBINE, "additive"), params.get(KEY_GATE, DEFAULT_RULE)
    return ScriptArgs(
        enabled=bool(selection) or preset != NO_PRESET,
        erasers=selection,
        preset=preset,
        combine=combine if combine in COMBINE_MODES else "additive",  # an unknown pasted value: the default
        gate=gate if gate in GATE_RULES else DEFAULT_RULE,
        cond_only=str(params.get(KEY_COND_ONLY, "False")).lower() == "true",
    )

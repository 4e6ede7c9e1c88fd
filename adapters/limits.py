"""Bounds on the numbers users hand to a stack (strengths), shared by the core and every host.

* The core (:class:`~.stack.StackEntry`) takes any finite strength with ``|s| <= STRENGTH_LIMIT``
  (a negative strength amplifies the concept; a ComfyUI graph may ask for it on purpose).
* Surfaces where whoever writes the input is not the operator (stack manifests, the webui's accordion,
  API arguments and ``<erase:...>`` tags) take ``0 <= s <= STRENGTH_LIMIT`` only.

NaN, +-inf and values that overflow to inf (``1e309``) are refused everywhere.
"""

from __future__ import annotations

import math

STRENGTH_LIMIT = 10.0


def check_strength(value, where: str, allow_negative: bool = True) -> float:
    """``value`` as a float, or ``ValueError`` naming ``where`` when it is not a finite number in range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: strength must be a number, got {type(value).__name__} {str(value)[:40]!r}")
    try:
        x = float(value)
    except OverflowError:  # an int beyond float range
        x = math.inf
    low = -STRENGTH_LIMIT if allow_negative else 0.0
    if not math.isfinite(x) or not low <= x <= STRENGTH_LIMIT:
        raise ValueError(f"{where}: strength {str(value)[:40]} is not a finite number in "
                         f"[{low:g}, {STRENGTH_LIMIT:g}]")
    return x


_INVISIBLE = {0x200B, 0x200C, 0x200D, 0x2060, 0xFEFF} | set(range(0x202A, 0x202F)) | set(range(0x2066, 0x206A))


def clean_name(name: str, max_chars: int = 200) -> str:
    """A name fit to show: control and bidi/zero-width characters removed, whitespace runs made one space,
    cut to ``max_chars`` (with an ellipsis). Used for names read from files, messages and UI text."""
    text = "".join(" " if c.isspace() else c for c in str(name)
                   if c.isspace() or (ord(c) >= 32 and ord(c) != 0x7F and not 0x80 <= ord(c) < 0xA0
                                      and ord(c) not in _INVISIBLE))
    text = " ".join(text.split())
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"

"""Per-entry gate settings and the gate report users read."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

#: ``context`` (ConceptGate's default: a calibrated detector on content-token states, see :mod:`.context`),
#: ``ft`` (SPM's Facilitated Transport as published), its halves ``cos`` / ``tokens``, ``always`` (gate 1).
RULES = ("context", "ft", "cos", "tokens", "always")
DEFAULT_RULE = "context"


@dataclass
class GateSettings:
    """Per-entry gate configuration.

    ``rule``: ``"context"`` (the default: the eraser's calibrated detector on the prompt's content-token
    states, or a listed name among its tokens; :mod:`.context`), ``"ft"`` (official Facilitated
    Transport), ``"cos"`` / ``"tokens"`` (one half of FT, as the reference's other metrics), ``"always"``
    (gate 1, a plain LoRA at ``strength``). ``factor`` is FT's facilitate factor f. ``threshold`` /
    ``temperature`` re-map any rule's output: ``sigmoid((gamma - threshold) / temperature)`` (a hard
    step when temperature is 0; non-official for ``ft``). ``cond_only`` applies the eraser to
    conditional rows only (non-official; keeps the unconditional score of the base model).
    """

    rule: str = DEFAULT_RULE
    factor: float = 1.0
    threshold: float | None = None
    temperature: float | None = None
    cond_only: bool = False

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"unknown gate rule {self.rule!r} ({', '.join(RULES)})")
        for name in ("factor", "threshold", "temperature"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise ValueError(f"gate {name} must be a finite number, got {v!r}")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"gate temperature must be >= 0, got {self.temperature}")

    @property
    def official(self) -> bool:
        return self.rule == "ft" and self.threshold is None and not self.cond_only

    def calibrate(self, gamma: float) -> float:
        if self.threshold is None:
            return gamma
        t = self.temperature or 0.0
        if t <= 0:
            return 1.0 if gamma >= self.threshold else 0.0
        return 1.0 / (1.0 + math.exp(-(gamma - self.threshold) / t))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "GateSettings":
        d = dict(d or {})
        return cls(**{k: d[k] for k in ("rule", "factor", "threshold", "temperature", "cond_only") if k in d})


@dataclass
class GateReport:
    """What fired, for the user: one line per eraser."""

    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. best-effort entries that were skipped

    def add(self, name: str, gate: float, strength: float, enabled: bool, detail: str = "", locked: bool = False):
        self.rows.append({"eraser": name, "gate": float(gate), "strength": float(strength),
                          "enabled": bool(enabled), "detail": detail, "locked": bool(locked)})

    def text(self) -> str:
        if not self.rows and not self.notes:
            return "ConceptGate: no erasers"
        lines = []
        for r in self.rows:
            state = "off" if not r["enabled"] else f"gate {r['gate']:.3f} x strength {r['strength']:.2f}"
            lock = " [locked by the operator]" if r.get("locked") else ""
            lines.append(f"{r['eraser']}: {state}{lock}{(' (' + r['detail'] + ')') if r['detail'] else ''}")
        return "\n".join(lines + self.notes)

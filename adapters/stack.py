"""The stack: ordered erasers with per-entry enable / strength / gate settings.

A stack is immutable from the hosts' point of view (ComfyUI passes it between nodes): every
``with_*`` method returns a new stack sharing the loaded erasers.

Two ways to combine several weight erasers on one module (SPM section 1.5 of the reference notes):

* ``additive`` (default): ``delta = sum_i m_i * s_i * U_i D_i``, each eraser at its own gate.
* ``official``: the reference code's arithmetic, which sums the factors first:
  ``delta = s * (sum_i m_i U_i)(sum_i m_i D_i)``. A single SPM then acts with ``m**2`` and several
  SPMs produce cross terms ``U_i D_j``. Kept for parity with published results.

``m_i = strength_i * gate_i(prompt)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .eraser import Eraser
from .gate import BankCache, EncodedText, GateReport, GateSettings, TextEncoderLike, entry_gates
from .registry import default_gate_rule

COMBINE_MODES = ("additive", "official")


@dataclass(frozen=True)
class StackEntry:
    eraser: Eraser
    enabled: bool = True
    strength: float = 1.0
    gate: GateSettings = field(default_factory=GateSettings)
    # set by an operator policy (adapters/policy.py): always on, strength never lowered by the user
    locked: bool = False
    # the user's opt-out of fail-closed: an entry that cannot be applied is skipped with a note
    best_effort: bool = False

    def __post_init__(self):  # finite and bounded (adapters/limits.py), never NaN / inf
        from .limits import check_strength
        check_strength(self.strength, f"eraser {self.eraser.name!r}")
        if self.locked and (self.best_effort or not self.enabled):
            raise ValueError(f"eraser {self.eraser.name!r} is locked by the operator: it cannot be disabled "
                             "or made best-effort")


@dataclass(frozen=True)
class EraserStack:
    entries: tuple[StackEntry, ...] = ()
    combine: str = "additive"
    # best-effort entries that were left out because they could not be applied, with the reason
    skipped: tuple[str, ...] = ()

    def __post_init__(self):
        if self.combine not in COMBINE_MODES:
            raise ValueError(f"unknown combine mode {self.combine!r} ({', '.join(COMBINE_MODES)})")

    # ------------------------------------------------------------- building
    def with_eraser(self, eraser: Eraser, enabled=True, strength=1.0, gate: GateSettings | None = None,
                    locked: bool = False, best_effort: bool = False) -> "EraserStack":
        entry = StackEntry(eraser, bool(enabled), float(strength), gate or GateSettings(rule=default_gate_rule(eraser)),
                           bool(locked), bool(best_effort))
        return replace(self, entries=self.entries + (entry,))

    def without(self, index: int, reason: str) -> "EraserStack":
        """The stack without entry ``index`` (a best-effort entry that cannot be applied), noting why."""
        entry = self.entries[index]
        if not entry.best_effort:
            raise ValueError(f"eraser {entry.eraser.name!r} was asked for and cannot be applied: {reason}")
        return replace(self, entries=self.entries[:index] + self.entries[index + 1:],
                       skipped=self.skipped + (f"{entry.eraser.name}: {reason}",))

    def applicable(self, problem, error=None) -> "EraserStack":
        """Fail closed, per entry: ``problem(entry)`` returns why an entry cannot be applied, or None.
        A best-effort entry with a problem is dropped with a note; for any other the stack raises
        ``error(entry, why)`` (default ``ValueError``), so nothing runs without an eraser asked for."""
        stack = self
        for i in range(len(self.entries) - 1, -1, -1):
            entry = self.entries[i]
            why = problem(entry)
            if not why:
                continue
            if not entry.best_effort:
                if error is not None:
                    raise error(entry, why)
                raise ValueError(f"eraser {entry.eraser.name!r} was asked for and cannot be applied: {why}")
            stack = stack.without(i, why)
        return stack

    def with_combine(self, combine: str) -> "EraserStack":
        return replace(self, combine=combine)

    def with_entry(self, index: int, **changes) -> "EraserStack":
        entries = list(self.entries)
        entries[index] = replace(entries[index], **changes)
        return replace(self, entries=tuple(entries))

    def __len__(self):
        return len(self.entries)

    @property
    def weight_entries(self) -> list[tuple[int, StackEntry]]:
        return [(i, e) for i, e in enumerate(self.entries) if e.eraser.kind == "weight"]

    def modules(self) -> list[str]:
        names: dict[str, None] = {}
        for _, e in self.weight_entries:
            names.update(dict.fromkeys(e.eraser.modules))
        return list(names)

    def check_official_combinable(self):
        ranks = {e.eraser.rank for _, e in self.weight_entries}
        if len(ranks) > 1:
            raise ValueError(f"official stacking needs erasers of one rank (the reference asserts it); got {sorted(ranks)}")
        if any(not d.is_low_rank for _, e in self.weight_entries for d in e.eraser.modules.values()):
            raise ValueError("official stacking needs low-rank erasers (full 'diff' deltas have no factors to sum)")

    # ------------------------------------------------------------- gates
    def gates(self, prompt: EncodedText, encoder: TextEncoderLike | None = None, banks: "BankCache | None" = None,
              tokens_known: bool = True) -> tuple[torch.Tensor, GateReport]:
        """Coefficients ``m`` [P, E] (strength x gate, 0 when disabled) for P prompts, and a report
        for the first prompt. ``banks`` caches the concepts' encodings between calls."""
        banks = banks or BankCache(encoder)
        n = prompt.hidden.shape[0]
        coeffs = torch.zeros(n, len(self.entries))
        report = GateReport(notes=[f"skipped (best effort): {s}" for s in self.skipped])
        for i, entry in enumerate(self.entries):
            result = entry_gates(prompt, entry.eraser, entry.gate, banks, tokens_known)
            if entry.enabled:
                coeffs[:, i] = result.values * entry.strength
            note = banks.notes.get(entry.eraser.name)
            detail = result.details[0] + (f"; {note}" if note and note != "stored calibration" else "")
            report.add(entry.eraser.name, float(result.values[0]), entry.strength, entry.enabled, detail, entry.locked)
        return coeffs, report

    # ------------------------------------------------------------- files
    def to_manifest(self, path) -> dict:
        """Write a JSON manifest referencing the eraser files by relative path and sha256 (:mod:`.manifest`)."""
        from .manifest import write_manifest
        return write_manifest(self, path)

    @classmethod
    def from_manifest(cls, path, search_dirs=(), allow_unhashed: bool = False) -> "EraserStack":
        """The stack a manifest describes, strictly validated (:func:`.manifest.read_manifest`)."""
        from .manifest import read_manifest
        return read_manifest(path, search_dirs, allow_unhashed, cls)

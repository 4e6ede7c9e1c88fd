"""The eraser: one loaded artifact of any of the four mechanisms.

Three kinds cover the mission:

* ``weight``: low-rank or full deltas on named UNet modules (SPM membranes, UCE/RECE edits,
  All-but-One fine-tuned adapters). Applied as ``W + gate * strength * delta``.
* ``conditioning``: additions in text-conditioning space (Geom-Erasing's learned tokens, used in
  the negative prompt).
* ``guidance``: a rule on the sampler's guidance term (All-but-One at sampling time).

Every eraser names the concepts its gate compares the prompt with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .gate.context import ContextDetector  # noqa: F401  (the type of Eraser.gate)
from .lowrank import ModuleDelta
from .naming import UNetLayout

KINDS = ("weight", "conditioning", "guidance")


@dataclass
class Eraser:
    name: str
    kind: str
    concepts: list[str]
    method: str = "lora"  # spm | uce | rece | abo | geom | lora
    modules: dict[str, ModuleDelta] = field(default_factory=dict)  # canonical (diffusers) names
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # conditioning kind: learned vectors
    settings: dict = field(default_factory=dict)  # method parameters (e.g. alternative concept)
    base_family: str | None = None
    base_fingerprint: str | None = None
    text_fingerprint: str | None = None
    metadata: dict = field(default_factory=dict)  # the file's raw metadata
    source: str | None = None
    sha256: str | None = None
    official_format: bool = False  # loaded from a file without ConceptGate metadata
    gate: "ContextDetector | None" = None  # the calibrated ``context`` gate stored with the file, if any

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown eraser kind {self.kind!r}")

    @property
    def rank(self) -> int:
        return max((d.rank for d in self.modules.values()), default=0)

    def num_parameters(self) -> int:
        n = sum(t.numel() for d in self.modules.values() for t in d.tensors())
        return n + sum(t.numel() for t in self.tensors.values())

    def check_against(self, layout: UNetLayout, where: str | None = None) -> list[str]:
        """Problems binding this eraser to a UNet with ``layout`` (empty list when it fits)."""
        problems = []
        specs = {m.name: m for m in layout.modules("spm")}
        unknown = [n for n in self.modules if n not in specs]
        if unknown:
            problems.append(f"{len(unknown)} module(s) not in this UNet, e.g. {unknown[0]}")
        for name, delta in self.modules.items():
            spec = specs.get(name)
            if spec is None:
                continue
            shape = delta.weight_shape()
            if shape[:2] != spec.weight_shape[:2]:
                problems.append(
                    f"shape mismatch at {name}: file has {tuple(shape)}, model has {spec.weight_shape}"
                )
                break
        if self.base_family and layout.family not in ("custom", self.base_family):
            problems.insert(0, f"made for base family {self.base_family}, model is {layout.family}")
        return problems

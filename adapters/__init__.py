"""The host-agnostic core of ConceptGate: erasers, gates, stacks, files and the four mechanisms.

One model of the world for every mechanism: a file loads as an :class:`Eraser` (kind ``weight``,
``conditioning`` or ``guidance``), erasers go into an :class:`EraserStack` with per-entry settings, each
entry's gate (:mod:`.gate`) says per prompt how strongly it acts, and a host applies the stack: weight
erasers through the one hook mechanism (:mod:`.hooks`) or the host's LoRA patching, conditioning and
guidance erasers through the handlers their mechanism registered (:mod:`.registry`).

The mechanisms, one subpackage each: :mod:`.spm`, :mod:`.rece` (UCE and RECE), :mod:`.geom`,
:mod:`.abo`. The diffusers host is :mod:`.diffusers_host`. Nothing in this package imports ComfyUI,
A1111, the benchmark, the toy world or the command line; their glue lives in ``conceptgate.nodes``
(ComfyUI), ``conceptgate.extension`` (A1111/Forge), ``conceptgate.bench``, ``conceptgate.toyworld``
and ``conceptgate.cli``, which import this package (ARCHITECTURE.md).
"""

from .eraser import Eraser
from .errors import EraserFileError, IncompatibleModelError, UnsupportedEraser
from .files import describe, load_eraser, save_eraser
from .gate import BankCache, ConceptBank, EncodedText, GateReport, GateSettings, entry_gates, facilitated_transport
from .hooks import RowGatedDeltas, dense_deltas
from .lowrank import ModuleDelta
from .naming import UNetLayout, layout_from_diffusers_config, reference_layout
from .stack import EraserStack, StackEntry

# The mechanisms register their checks and handlers on import.
from . import abo, geom, rece, spm  # noqa: E402,F401  (isort: skip)

__all__ = [
    "BankCache", "ConceptBank", "EncodedText", "Eraser", "EraserFileError", "EraserStack", "GateReport", "GateSettings",
    "IncompatibleModelError", "ModuleDelta", "RowGatedDeltas", "StackEntry", "UNetLayout", "UnsupportedEraser",
    "abo", "dense_deltas", "describe", "entry_gates", "facilitated_transport", "geom", "layout_from_diffusers_config",
    "load_eraser", "rece", "reference_layout", "save_eraser", "spm",
]

"""The host-agnostic core of ConceptGate: erasers, gates, stacks, files and the four mechanisms.

Nothing in this package imports ComfyUI or A1111; host glue lives in ``conceptgate.nodes``
(ComfyUI) and ``conceptgate.extension`` (A1111/Forge).
"""

from .apply import RowGatedDeltas, dense_deltas
from .eraser import Eraser
from .errors import EraserFileError, IncompatibleModelError
from .files import describe, load_eraser, save_eraser
from .gate import ConceptBank, EncodedText, GateReport, GateSettings, facilitated_transport
from .lowrank import ModuleDelta
from .naming import UNetLayout, layout_from_diffusers_config, reference_layout
from .stack import EraserStack, StackEntry

__all__ = [
    "ConceptBank", "EncodedText", "Eraser", "EraserFileError", "EraserStack", "GateReport", "GateSettings",
    "IncompatibleModelError", "ModuleDelta", "RowGatedDeltas", "StackEntry", "UNetLayout", "dense_deltas",
    "describe", "facilitated_transport", "layout_from_diffusers_config", "load_eraser", "reference_layout",
    "save_eraser",
]

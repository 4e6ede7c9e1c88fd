"""Pieces of ComfyUI's V3 node schema (``comfy_api.latest.io``) that every ConceptGate node file uses.

The V3 API is in ComfyUI from 0.3.48 on (``comfy_api/latest``, ``comfy_entrypoint`` in
``nodes.load_custom_node``); the pack supports 0.3.60 and later (``pyproject.toml``).
"""

from __future__ import annotations

from comfy_api.latest import io

CATEGORY = "ConceptGate"

# Custom socket types: the names are what saved graphs and the example workflows store, never change them.
ERASER = "CONCEPTGATE_ERASER"
STACK = "CONCEPTGATE_STACK"
Eraser = io.Custom(ERASER)
Stack = io.Custom(STACK)


def check_choices(cls, **values) -> bool | str:
    """A node's ``validate_inputs`` for its dropdowns (``io.Combo`` inputs): ComfyUI up to 0.7 checks a
    widget value against a dropdown's options only for V1 nodes, so without this a queued graph naming a
    file that is not there (or a mode no dropdown offers) would run until the node fails, or worse, run.
    0.8.0 checks V3 dropdowns itself, except those a node's ``validate_inputs`` takes: these. True, or
    ComfyUI's own wording for every value not offered (a linked value is None here: not known yet)."""
    bad = []
    for i in cls.define_schema().inputs:
        value = values.get(i.id)
        if isinstance(i, io.Combo.Input) and value is not None and value not in i.options:
            listed = f"(list of length {len(i.options)})" if len(i.options) > 20 else str(list(i.options))
            bad.append(f"{i.id}: '{value}' not in {listed}")
    return "; ".join(bad) or True

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


class Choice(io.Combo.Input):
    """A dropdown whose type, as ComfyUI lists it to the frontend and to its validator, is its option list,
    as V1 nodes declare dropdowns. ComfyUI up to 0.7 checks a widget value against a dropdown's options
    only for that form (a plain V3 ``io.Combo.Input`` is typed ``"COMBO"`` and any value passes
    validation; 0.8.0 checks both forms), so a queued graph naming a file that is not there is still
    refused before it runs, with ComfyUI's own message ``NAME: 'VALUE' not in [...]``."""

    def get_io_type(self):
        return list(self.options or [])


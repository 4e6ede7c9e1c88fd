"""AUTOMATIC1111 / Forge entry point of ConceptGate (every ``scripts/*.py`` file is imported by
the webui; every ``scripts.Script`` subclass found in this module's namespace is registered, so
this module exposes exactly one: :class:`ConceptGateScript`).

The extension folder is the ``conceptgate`` package itself, whatever the folder is called
(``extensions/conceptgate``, ``extensions/ConceptGate-main``...). If ``conceptgate`` is not already
importable from this checkout, the checkout's ``__init__.py`` is loaded under the name
``conceptgate``; the glue itself lives in ``conceptgate.extension``.
"""

import importlib
import importlib.util
import os
import sys


def _import_checkout():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    loaded = sys.modules.get("conceptgate")
    if loaded is not None:
        return loaded
    try:
        spec = importlib.util.find_spec("conceptgate")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin and os.path.dirname(os.path.abspath(spec.origin)) == root:
        return importlib.import_module("conceptgate")
    spec = importlib.util.spec_from_file_location("conceptgate", os.path.join(root, "__init__.py"),
                                                  submodule_search_locations=[root])
    module = importlib.util.module_from_spec(spec)
    sys.modules["conceptgate"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["conceptgate"]
        raise
    return module


_import_checkout()

from conceptgate.extension import callbacks as _callbacks  # noqa: E402
from conceptgate.extension.script import ConceptGateScript  # noqa: E402,F401

_callbacks.register()

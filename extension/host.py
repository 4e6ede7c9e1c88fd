"""Which webui is running, decided once when the extension is imported.

The probes follow the order the host report recommends: the old Forge / reForge line ships
``ldm_patched`` (a January 2024 ComfyUI copy), the current Forge line ships ``backend``, and plain
AUTOMATIC1111 has neither but has ``modules.sd_samplers_kdiffusion``.
"""

from __future__ import annotations

import importlib

A1111 = "a1111"
FORGE_LEGACY = "forge-legacy"  # lllyasviel/stable-diffusion-webui-forge tag `previous`, reForge
FORGE = "forge"  # Forge HEAD (backend/, Aug 2024 onwards)
NONE = "none"

PROBES = (
    (FORGE_LEGACY, "ldm_patched.modules.model_patcher"),
    (FORGE, "backend.patcher.base"),
    (A1111, "modules.sd_samplers_kdiffusion"),
)


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except Exception:  # ImportError, or a host module failing outside its host
        return False


def detect() -> str:
    for host, module in PROBES:
        if _importable(module):
            return host
    return NONE


HOST = detect()


def is_forge(host: str | None = None) -> bool:
    return (host or HOST) in (FORGE, FORGE_LEGACY)

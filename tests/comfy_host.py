"""Tests reach ComfyUI through the same boot code as the benchmarks."""

from conceptgate.bench.comfyui_host import REPO, Executor, boot_comfyui, comfyui_root  # noqa: F401

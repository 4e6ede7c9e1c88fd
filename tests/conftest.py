import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import comfy_host  # noqa: E402


@pytest.fixture(scope="module")
def pipe():
    """The committed toy model's diffusers pipeline (one per test module: tests may attach hooks to it;
    modules that need another model define their own ``pipe``)."""
    from conceptgate import toyworld

    p = toyworld.load_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="session")
def comfy():
    """The real ComfyUI 0.3.75, booted for CPU (skips nothing: a missing ComfyUI is an error)."""
    return comfy_host.boot_comfyui()


@pytest.fixture(scope="session")
def executor(comfy):
    """ComfyUI's PromptExecutor with this checkout and the test pack loaded as custom nodes."""
    return comfy_host.Executor(packs=(comfy_host.REPO, os.path.join(HERE, "comfy_test_pack")))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny float64 factorisations: intra-op threads only add contention on a shared 2-core CPU."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

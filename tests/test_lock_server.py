"""The operator lock through a real ComfyUI server (issue 13): the vendored ComfyUI's ``main.py --cpu`` is
started bound to 127.0.0.1 with ``CONCEPTGATE_POLICY`` set, and graphs are posted to ``/prompt`` over
HTTP. Every bypass graph gives the erased latent (equal to the reference made in this process without a
policy by our own nodes) or an error in the history, never the unerased one. The server is stopped at
the end.
"""

import glob
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conceptgate.adapters import layout_from_diffusers_config, save_eraser
from conceptgate.adapters.files import sha256_file
from conceptgate.adapters.synthetic import random_eraser
from comfy_host import REPO
from tiny_models import tiny_unet
from test_lock_comfy import our_graph, sampler_custom_advanced_graph, stock_graph
from test_comfy_executor import run
from comfy_server import Server

pytestmark = pytest.mark.slow
HERE = os.path.dirname(os.path.abspath(__file__))


def _saved(graph, prefix):
    """``graph`` with its latent written by the stock SaveLatent node (what the test reads back)."""
    g = dict(graph)
    del g["capture"]
    g["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sampler", 0], "filename_prefix": f"latents/{prefix}"}}
    return g


@pytest.fixture(scope="module")
def server(tmp_path_factory, executor):
    import folder_paths

    base = tmp_path_factory.mktemp("comfy_server")
    nodes_dir = base / "custom_nodes"
    nodes_dir.mkdir()
    os.symlink(REPO, nodes_dir / "conceptgate")
    os.symlink(os.path.join(HERE, "comfy_test_pack"), nodes_dir / "cg_test_pack")
    models = base / "models" / "conceptgate"
    models.mkdir(parents=True)
    layout = layout_from_diffusers_config(tiny_unet().config)
    # the same eraser as test_lock_comfy's (same seed), so the in-process references apply
    save_eraser(random_eraser(layout, concepts=["red triangle"], seed=21, scale=0.3, name="tri"), models / "tri.safetensors")
    folder_paths.add_model_folder_path("conceptgate", str(models), is_default=True)
    policy = base / "conceptgate_policy.json"
    entry = {"file": "models/conceptgate/tri.safetensors", "sha256": sha256_file(models / "tri.safetensors"),
             "strength": 1.0, "gate": {"rule": "tokens"}}
    policy.write_text(json.dumps({"conceptgate_policy": 1, "locked": [entry]}))
    env = dict(os.environ, CONCEPTGATE_POLICY=str(policy))
    srv = Server(str(base), env)
    srv.base, srv.policy, srv.entry = base, policy, entry
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def refs(executor, server):
    old = os.environ.get("CONCEPTGATE_POLICY")
    os.environ["CONCEPTGATE_POLICY"] = ""
    try:
        out = {"unerased": run(executor, stock_graph())[0], "erased": run(executor, our_graph())[0]}
    finally:
        os.environ.pop("CONCEPTGATE_POLICY") if old is None else os.environ.__setitem__("CONCEPTGATE_POLICY", old)
    return out


def _latent(server, prefix):
    files = sorted(glob.glob(str(server.base / "output" / "latents" / f"{prefix}_*.latent")))
    assert files, f"no latent saved for {prefix}: {server.tail()}"
    return load_file(files[-1])["latent_tensor"]


def _bypass_graphs():
    strength0 = our_graph(strength=0.0)
    disabled = our_graph(enabled=False)
    second = our_graph(strength=0.0)
    second["ckpt2"] = {"class_type": "CGTest_TinyCheckpoint", "inputs": {"seed": 0}}
    second["sampler"]["inputs"]["model"] = ["ckpt2", 0]
    custom = sampler_custom_advanced_graph()
    return {"stock": stock_graph(), "strength0": strength0, "disabled": disabled, "second_loader": second,
            "sampler_custom_advanced": custom}


@pytest.mark.parametrize("name", list(_bypass_graphs()))
def test_bypass_graph_posted_over_http_is_erased(server, refs, name):
    g = _bypass_graphs()[name]
    entry = server.post(_saved(g, name))
    assert entry.get("status", {}).get("status_str") == "success", entry
    out = _latent(server, name)
    assert torch.allclose(out, refs["erased"], atol=1e-3, rtol=1e-5), (out - refs["erased"]).abs().max()
    assert (out - refs["unerased"]).abs().max() > 1e-1


def test_broken_policy_over_http_is_an_error_not_an_image(server, refs):
    """The operator's policy is edited while the server runs (a wrong sha256): the next prompt, even one
    identical to a prompt already served, fails with the reason and saves nothing."""
    good = server.policy.read_text()
    server.policy.write_text(json.dumps({"conceptgate_policy": 1, "locked": [dict(server.entry, sha256="0" * 64)]}))
    try:
        before = set(glob.glob(str(server.base / "output" / "latents" / "broken_*")))
        entry = server.post(_saved(stock_graph(), "broken"))
        assert entry["status"]["status_str"] == "error", entry
        errors = [m for m in entry["status"]["messages"] if m[0] == "execution_error"]
        assert errors and "sha256 differs" in errors[0][1]["exception_message"]
        assert set(glob.glob(str(server.base / "output" / "latents" / "broken_*"))) == before
    finally:
        server.policy.write_text(good)
    entry = server.post(_saved(stock_graph(), "restored"))
    assert entry["status"]["status_str"] == "success"
    assert torch.allclose(_latent(server, "restored"), refs["erased"], atol=1e-3, rtol=1e-5)

"""The pack inside ComfyUI's real executor: loaded by ComfyUI's custom-node loader, run by
``execution.PromptExecutor`` with the stock CLIPTextEncode / KSampler / VAEDecode nodes."""

import pytest
import torch

from conceptgate.adapters import layout_from_diffusers_config, save_eraser
from conceptgate.adapters.synthetic import random_eraser
from tiny_models import tiny_unet


@pytest.fixture(scope="module")
def eraser_dir(executor, tmp_path_factory):
    import folder_paths

    folder = tmp_path_factory.mktemp("conceptgate_models")
    layout = layout_from_diffusers_config(tiny_unet().config)
    save_eraser(random_eraser(layout, concepts=["red triangle"], seed=21, scale=0.3, name="tri"), folder / "tri.safetensors")
    folder_paths.add_model_folder_path("conceptgate", str(folder), is_default=True)
    return folder


def graph(prompt="a red triangle", erase=True, enabled=True, mode="per-row", gate="tokens", encoder="ConceptGateTextEncode",
          key="out", decode=False):
    g = {
        "ckpt": {"class_type": "CGTest_TinyCheckpoint", "inputs": {"seed": 0}},
        "pos": {"class_type": encoder, "inputs": {"clip": ["ckpt", 1], "text": prompt}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": ""}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": ["ckpt", 0], "seed": 7, "steps": 3, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0}},
        "capture": {"class_type": "CGTest_CaptureLatent", "inputs": {"samples": ["sampler", 0], "key": key}},
    }
    if erase:
        g["load"] = {"class_type": "ConceptGateLoadEraser", "inputs": {"eraser_name": "tri.safetensors", "concepts": ""}}
        g["stack"] = {"class_type": "ConceptGateAddToStack", "inputs": {
            "eraser": ["load", 0], "enabled": enabled, "strength": 1.0, "gate": gate, "cond_only": False}}
        g["apply"] = {"class_type": "ConceptGateApplyStack", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "stack": ["stack", 0], "positive": ["pos", 0],
            "mode": mode, "combine": "additive"}}
        g["sampler"]["inputs"]["model"] = ["apply", 0]
    if decode:
        g["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["ckpt", 2]}}
        g["preview"] = {"class_type": "PreviewImage", "inputs": {"images": ["decode", 0]}}
    return g


def run(executor, g):
    import sys

    import nodes

    outputs = executor.run(g)
    key = g["capture"]["inputs"]["key"]
    # the copy of the test pack that ComfyUI's loader imported
    pack = sys.modules[nodes.NODE_CLASS_MAPPINGS["CGTest_CaptureLatent"].__module__]
    return pack.CAPTURED.pop(key), outputs


def test_nodes_are_registered_by_comfyui(executor):
    import nodes

    for name in ("ConceptGateLoadEraser", "ConceptGateAddToStack", "ConceptGateApplyStack", "ConceptGateTextEncode"):
        cls = nodes.NODE_CLASS_MAPPINGS[name]
        assert cls.CATEGORY == "ConceptGate"
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):  # not "hidden" (prompt / extra_pnginfo of an output node)
            for arg, (_, *opts) in spec.get(section, {}).items():
                assert opts and opts[0].get("tooltip"), f"{name}.{arg} has no tooltip"
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["ConceptGateApplyStack"] == "Apply Eraser Stack"


@pytest.mark.parametrize("mode", ["per-row", "batch"])
def test_erasure_in_the_executor(executor, eraser_dir, mode):
    base, _ = run(executor, graph(erase=False))
    erased, outputs = run(executor, graph(mode=mode))
    assert (erased - base).abs().max() > 1e-2  # the target prompt is changed
    report = outputs["apply"]["text"][0]
    assert "tri: gate 1.000" in report
    unrelated_base, _ = run(executor, graph(prompt="a green square", erase=False))
    unrelated, outputs = run(executor, graph(prompt="a green square", mode=mode))
    assert "tri: gate 0.000" in outputs["apply"]["text"][0]
    assert torch.equal(unrelated, unrelated_base)  # gate 0: untouched


@pytest.mark.parametrize("mode", ["per-row", "batch"])
def test_disabled_toggle_is_bit_identical(executor, eraser_dir, mode):
    base, _ = run(executor, graph(erase=False))
    off, outputs = run(executor, graph(enabled=False, mode=mode))
    assert torch.equal(off, base)
    assert "tri: off" in outputs["apply"]["text"][0]


def test_stock_text_encode_uses_cosine_half_and_decodes(executor, eraser_dir):
    """With the stock CLIPTextEncode the token overlap is unknown: the gate falls back to the cosine
    half and says so; the full graph through VAEDecode runs."""
    _, outputs = run(executor, graph(encoder="CLIPTextEncode", gate="ft", decode=True))
    assert "token overlap unknown" in outputs["apply"]["text"][0]
    assert outputs["preview"]["images"]


def test_bad_file_fails_with_its_name(executor, eraser_dir):
    (eraser_dir / "broken.safetensors").write_bytes(b"\x00" * 4)
    g = graph()
    g["load"]["inputs"]["eraser_name"] = "broken.safetensors"
    with pytest.raises(AssertionError, match="broken.safetensors.*truncated"):
        executor.run(g)


@pytest.mark.parametrize("mode", ["per-row", "batch"])
def test_default_context_gate_in_the_executor(executor, eraser_dir, mode):
    """The default rule through ComfyUI's executor: the eraser (calibrated on first use on this CLIP) acts
    on its prompt and leaves an unrelated one bit-identical; with the stock CLIPTextEncode, which records no
    tokens, it fails closed (acts) and says why."""
    base, _ = run(executor, graph(erase=False))
    erased, outputs = run(executor, graph(mode=mode, gate="context"))
    report = outputs["apply"]["text"][0]
    assert (erased - base).abs().max() > 1e-2 and "tri: gate 1.000" in report and "context" in report
    unrelated_base, _ = run(executor, graph(prompt="a green square", erase=False))
    unrelated, outputs = run(executor, graph(prompt="a green square", mode=mode, gate="context"))
    assert "tri: gate 0.000" in outputs["apply"]["text"][0]
    assert torch.equal(unrelated, unrelated_base)
    blind, outputs = run(executor, graph(prompt="a green square", mode=mode, gate="context", encoder="CLIPTextEncode"))
    assert "acting as if the concept were present" in outputs["apply"]["text"][0]
    assert (blind - unrelated_base).abs().max() > 1e-2

"""Base-model fingerprints are checked (issue 13): a UCE/RECE edit file is refused on a model whose
cross-attention weights are not the ones it was solved on, with a message naming the file and the
override; the override applies it; trained erasers are not refused for another base."""

import copy
import os

import pytest
import torch

from conceptgate.adapters import EraserStack, GateSettings, IncompatibleModelError, layout_from_diffusers_config, load_eraser, save_eraser
from conceptgate.adapters.rece import DiffusersEditHost, compute_edit
from conceptgate.adapters.synthetic import random_eraser
from tiny_models import tiny_text_encoder, tiny_unet, tiny_vae

TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "toyworld", "data", "tokenizer")


def _pipe(seed):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    p = StableDiffusionPipeline(vae=tiny_vae(seed), text_encoder=tiny_text_encoder(seed),
                                tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER), unet=tiny_unet(seed),
                                scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def edit_file(tmp_path_factory):
    pipe = _pipe(0)
    out = compute_edit(DiffusersEditHost.from_pipeline(pipe), method="uce", concepts=("red triangle",), cache=None)
    path = tmp_path_factory.mktemp("edit") / "uce_tri.safetensors"
    save_eraser(out.eraser, path)
    return path


def _stack(path):
    return EraserStack().with_eraser(load_eraser(path), gate=GateSettings(rule="tokens"))


def test_diffusers_refuses_an_edit_on_other_weights(edit_file):
    from conceptgate.adapters.diffusers_host import GatedPipeline

    GatedPipeline(_pipe(0), _stack(edit_file))  # its own base: fine
    other = _pipe(0)
    with torch.no_grad():  # a "fine-tune": one cross-attention weight moved a little
        next(m for n, m in other.unet.named_modules() if n.endswith("attn2.to_k")).weight.add_(1e-3)
    with pytest.raises(IncompatibleModelError, match=r"uce_tri\.safetensors: this UCE edit was solved on other weights"):
        GatedPipeline(other, _stack(edit_file))
    GatedPipeline(other, _stack(edit_file), allow_other_base=True)  # explicit override
    best_effort = EraserStack().with_eraser(load_eraser(edit_file), gate=GateSettings(rule="tokens"), best_effort=True)
    gated = GatedPipeline(other, best_effort)
    assert not gated.stack.entries and "solved on other weights" in gated.stack.skipped[0]


def test_diffusers_half_precision_model_is_not_compared(edit_file):
    from conceptgate.adapters.fingerprint import edit_base_note
    from conceptgate.adapters.diffusers_host import GatedPipeline, cross_attention_weights

    half = _pipe(0)
    half.unet = copy.deepcopy(half.unet).half()
    GatedPipeline(half, _stack(edit_file))  # fp16 weights cannot match an fp32 fingerprint: not refused ...
    assert "not checked" in edit_base_note(load_eraser(edit_file), cross_attention_weights(half.unet))  # ... and said


def test_trained_erasers_are_not_refused_on_another_base(tmp_path):
    from conceptgate.adapters.diffusers_host import GatedPipeline

    e = random_eraser(layout_from_diffusers_config(tiny_unet().config), concepts=["x"], seed=3, name="spm_x")
    e.base_fingerprint = "0123456789abcdef"
    save_eraser(e, tmp_path / "spm_x.safetensors")
    GatedPipeline(_pipe(0), EraserStack().with_eraser(load_eraser(tmp_path / "spm_x.safetensors")))


def test_comfyui_refuses_an_edit_on_other_weights(executor, edit_file, tmp_path):
    import shutil

    import folder_paths
    from test_comfy_executor import graph, run

    folder = tmp_path / "fp_models"
    folder.mkdir()
    shutil.copy(edit_file, folder / "uce_tri.safetensors")
    folder_paths.add_model_folder_path("conceptgate", str(folder), is_default=True)
    os.environ["CONCEPTGATE_POLICY"] = ""
    try:
        g = graph()
        g["load"]["inputs"]["eraser_name"] = "uce_tri.safetensors"
        run(executor, g)  # the tiny checkpoint of seed 0 is the edit's base (converted by ComfyUI: same weights)
        g["ckpt"]["inputs"]["seed"] = 1
        with pytest.raises(AssertionError, match="solved on other weights"):
            run(executor, g)
        g["apply"]["inputs"]["allow_other_base"] = True
        run(executor, g)
    finally:
        del os.environ["CONCEPTGATE_POLICY"]

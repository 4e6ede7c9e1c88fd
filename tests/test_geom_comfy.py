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

"""The All-but-One adapter file in ComfyUI: stock LoraLoaderModelOnly, the ConceptGate stack (gated per row) and a
hand merge agree (tiny model); the shipped toy adapter turns a triangle prompt into a square in the real executor."""

import os
import sys

import pytest
import torch

from conceptgate.adapters import EraserStack, GateSettings, load_eraser
from conceptgate.adapters.abo.adapter import ABOConfig, ABOTrainer
from comfy_sampling import close, encode, merged_model, sample
from tiny_models import tiny_text_encoder, tiny_unet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(REPO, "toyworld", "erasers", "abo_triangle_to_square.safetensors")
SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
             "set_alpha_to_one": False, "steps_offset": 1, "num_train_timesteps": 1000, "prediction_type": "epsilon"}

pytestmark = pytest.mark.usefixtures("one_thread")


def test_adapter_file_in_stock_lora_loader_and_as_gated_eraser(comfy, tmp_path):
    import folder_paths
    import nodes
    from transformers import CLIPTokenizer

    from conceptgate.nodes import comfy_glue, comfy_models
    from conceptgate.toyworld import HERE as TOY_HERE

    unet, te = tiny_unet(seed=6), tiny_text_encoder(seed=6)
    tok = CLIPTokenizer.from_pretrained(os.path.join(TOY_HERE, "data", "tokenizer"))
    tr = ABOTrainer(unet, te, tok, SCHEDULER, ABOConfig("red triangle", "blue circle", context="generic", iterations=1,
                                                        rank=2, modules="attn2", pool_size=1, pool_steps=1, save_every=0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a visible adapter (one training step barely moves lora_up)
        for p in tr.adapter.up.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    path = str(tmp_path / "abo_tiny.safetensors")
    tr.save(path)
    tr.close()
    model, clip = comfy_models.unet_to_comfy(unet), comfy_models.text_encoder_to_comfy(te)
    eraser = load_eraser(path)
    assert eraser.method == "abo" and eraser.kind == "weight"
    dense = {n: d.full() for n, d in eraser.modules.items()}
    pos, neg = encode(clip, "red triangle"), encode(clip, "")
    base = sample(model, pos, neg)
    reference = sample(merged_model(unet, dense), pos, neg)
    assert (reference - base).abs().max() > 1e-2
    folder_paths.add_model_folder_path("loras", str(tmp_path), is_default=True)
    (stock,) = nodes.LoraLoaderModelOnly().load_lora_model_only(model, os.path.basename(path), 1.0)
    assert close(sample(stock, pos, neg), reference)
    always = comfy_glue.row_gated(model, EraserStack().with_eraser(eraser, gate=GateSettings(rule="always")), clip)
    assert close(sample(always, pos, neg), reference)
    # the token gate: closed for a prompt without the concept's words, the sample is the base model's
    tokens = comfy_glue.row_gated(model, EraserStack().with_eraser(eraser, gate=GateSettings(rule="tokens")), clip)
    other = encode(clip, "green square")
    assert torch.equal(sample(tokens, other, neg), sample(model, other, neg))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(SHIPPED), reason="the shipped toy adapter is not built yet")
def test_shipped_toy_adapter_in_the_executor(executor):
    """Toy loader -> Load Eraser -> Add To Stack (tokens gate) -> Apply Stack -> KSampler, and the stock
    LoraLoaderModelOnly: a red triangle prompt comes out as a square (judged) in most seeds; a circle prompt
    with the gate closed is bit-identical to the unerased model."""
    import folder_paths
    import nodes

    from conceptgate import toyworld
    from conceptgate.toyworld import judges as J

    folder_paths.add_model_folder_path("conceptgate", os.path.dirname(SHIPPED), is_default=True)
    folder_paths.add_model_folder_path("loras", os.path.dirname(SHIPPED), is_default=True)
    judge = toyworld.load_judges()
    pack = None

    def run(text, seed, how):
        nonlocal pack
        g = {
            "ckpt": {"class_type": "ConceptGateToyModelLoader", "inputs": {}},
            "pos": {"class_type": "ConceptGateTextEncode", "inputs": {"clip": ["ckpt", 1], "text": text}},
            "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": ""}},
            "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
            "sampler": {"class_type": "KSampler", "inputs": {
                "model": ["ckpt", 0], "seed": seed, "steps": 20, "cfg": 5.0, "sampler_name": "euler",
                "scheduler": "normal", "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
                "denoise": 1.0}},
            "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["ckpt", 2]}},
            "capture": {"class_type": "CGTest_CaptureImage", "inputs": {"images": ["decode", 0], "key": "abo"}},
        }
        if how == "stack":
            g["load"] = {"class_type": "ConceptGateLoadEraser", "inputs": {
                "eraser_name": os.path.basename(SHIPPED), "concepts": ""}}
            g["stack"] = {"class_type": "ConceptGateAddToStack", "inputs": {
                "eraser": ["load", 0], "enabled": True, "strength": 1.0, "gate": "tokens", "cond_only": False,
                "threshold": 0.0}}
            g["apply"] = {"class_type": "ConceptGateApplyStack", "inputs": {
                "model": ["ckpt", 0], "clip": ["ckpt", 1], "stack": ["stack", 0], "positive": ["pos", 0],
                "mode": "per-row", "combine": "additive"}}
            g["sampler"]["inputs"]["model"] = ["apply", 0]
        elif how == "stock":
            g["lora"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
                "model": ["ckpt", 0], "lora_name": os.path.basename(SHIPPED), "strength_model": 1.0}}
            g["sampler"]["inputs"]["model"] = ["lora", 0]
        executor.run(g)
        pack = sys.modules[nodes.NODE_CLASS_MAPPINGS["CGTest_CaptureImage"].__module__]
        return pack.CAPTURED.pop("abo")

    seeds = (1, 2, 3, 4)
    for how in ("stack", "stock"):
        imgs = torch.cat([run("a red triangle in striped style", s, how) for s in seeds]).permute(0, 3, 1, 2)
        pred = J.classify(judge, imgs)
        squares = int((pred["object"] == 1).sum())
        assert squares >= 3, f"{how}: square judged in {squares}/{len(seeds)} generations"
    closed = run("a blue circle in checkered style", 5, "stack")
    assert torch.equal(closed, run("a blue circle in checkered style", 5, "base"))


def test_example_workflow_is_consistent_and_names_the_shipped_file(comfy):
    import json

    from conceptgate.nodes.nodes_conceptgate import NODES

    classes = {cls.GET_SCHEMA().node_id: cls for cls in NODES}

    wf = json.load(open(os.path.join(REPO, "example_workflows", "toy_abo_adapter.json")))
    by_id = {n["id"]: n for n in wf["nodes"]}
    assert wf["last_node_id"] == max(by_id) and wf["last_link_id"] == max(l[0] for l in wf["links"])
    for lid, src, sslot, dst, dslot, typ in wf["links"]:
        out, inp = by_id[src]["outputs"][sslot], by_id[dst]["inputs"][dslot]
        assert lid in out["links"] and inp["link"] == lid and out["type"] == inp["type"] == typ, lid
    for n in wf["nodes"]:
        for inp in n.get("inputs", []):
            assert inp["link"] is None or any(l[0] == inp["link"] for l in wf["links"])
        cls = classes.get(n["type"])
        if cls is None:
            continue
        spec = cls.INPUT_TYPES()
        widgets = [a for s in ("required", "optional") for a, (t, *_) in spec.get(s, {}).items()
                   if isinstance(t, (list, tuple)) or t in ("STRING", "INT", "FLOAT", "BOOLEAN", "COMBO")]
        assert len(n["widgets_values"]) == len(widgets), (n["type"], n["widgets_values"])
    loads = [n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "ConceptGateLoadEraser"]
    assert loads == [os.path.basename(SHIPPED)] and os.path.exists(SHIPPED)
    gates = [n["widgets_values"][2] for n in wf["nodes"] if n["type"] == "ConceptGateAddToStack"]
    assert gates == ["tokens"]

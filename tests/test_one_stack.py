"""One stack, one apply (issue 16): a stack holding one eraser of each mechanism (SPM membrane, UCE edit,
Geom-Erasing tokens, All-but-One guidance) applied by the one node / the one pipeline gives the same
result as today's separate paths with the same seeds; all gates 0 is bit-identical to no stack."""

import os

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ERASERS = os.path.join(os.path.dirname(HERE), "toyworld", "erasers")
PROMPT = "a red triangle, a star and a circle"


@pytest.fixture(scope="module")
def toy_folder(executor):
    import folder_paths

    folder_paths.add_model_folder_path("conceptgate", ERASERS, is_default=False)
    return ERASERS


def _base(prompt, key):
    return {
        "ckpt": {"class_type": "ConceptGateToyModelLoader", "inputs": {}},
        "pos": {"class_type": "ConceptGateTextEncode", "inputs": {"clip": ["ckpt", 1], "text": prompt}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "blurry"}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": ["ckpt", 0], "seed": 3, "steps": 4, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0}},
        "capture": {"class_type": "CGTest_CaptureLatent", "inputs": {"samples": ["sampler", 0], "key": key}},
    }


def _add(eraser_ref, rule, stack=None):
    inputs = {"eraser": eraser_ref, "enabled": True, "strength": 1.0, "gate": rule, "cond_only": False}
    if stack is not None:
        inputs["stack"] = stack
    return {"class_type": "ConceptGateAddToStack", "inputs": inputs}


def _erasers(g):
    g["spm"] = {"class_type": "ConceptGateLoadEraser", "inputs": {"eraser_name": "spm_triangle.safetensors", "concepts": ""}}
    g["uce"] = {"class_type": "ConceptGateEraseConcepts", "inputs": {
        "model": ["ckpt", 0], "clip": ["ckpt", 1], "method": "UCE", "concepts": "star", "concept_type": "object",
        "guide": "", "preserve": "", "epochs": 0, "lam": 0.5, "strength": 1.0}}
    g["geom"] = {"class_type": "ConceptGateLoadEraser", "inputs": {"eraser_name": "geom_watermark.safetensors", "concepts": ""}}
    g["abo"] = {"class_type": "ConceptGateAboEraser", "inputs": {"erase": "circle", "alternative": "square"}}


def one_node(prompt, rules, key):
    g = _base(prompt, key)
    _erasers(g)
    g["s1"] = _add(["spm", 0], rules[0])
    g["s2"] = _add(["uce", 1], rules[1], ["s1", 0])
    g["s3"] = _add(["geom", 0], rules[2], ["s2", 0])
    g["s4"] = _add(["abo", 0], rules[3], ["s3", 0])
    g["apply"] = {"class_type": "ConceptGateApplyStack", "inputs": {
        "model": ["ckpt", 0], "clip": ["ckpt", 1], "stack": ["s4", 0], "positive": ["pos", 0], "negative": ["neg", 0],
        "mode": "per-row", "combine": "additive"}}
    g["sampler"]["inputs"]["model"] = ["apply", 0]
    g["sampler"]["inputs"]["negative"] = ["apply", 2]
    return g


def separate_nodes(prompt, rules, key):
    g = _base(prompt, key)
    _erasers(g)
    g["s1"] = _add(["spm", 0], rules[0])
    g["s2"] = _add(["uce", 1], rules[1], ["s1", 0])
    g["apply"] = {"class_type": "ConceptGateApplyStack", "inputs": {
        "model": ["ckpt", 0], "clip": ["ckpt", 1], "stack": ["s2", 0], "positive": ["pos", 0],
        "mode": "per-row", "combine": "additive"}}
    g["s4"] = _add(["abo", 0], rules[3])
    g["abo_patch"] = {"class_type": "ConceptGateAboGuidance", "inputs": {"model": ["apply", 0], "clip": ["ckpt", 1],
                                                                          "stack": ["s4", 0]}}
    g["s3"] = _add(["geom", 0], rules[2])
    g["geom_neg"] = {"class_type": "ConceptGateGeomNegative", "inputs": {
        "clip": ["ckpt", 1], "source": "none", "token_set": "observed", "top_k": 8, "overflow": "drop",
        "negative": ["neg", 0], "stack": ["s3", 0]}}
    g["sampler"]["inputs"]["model"] = ["abo_patch", 0]
    g["sampler"]["inputs"]["negative"] = ["geom_neg", 0]
    return g


def _run(executor, g):
    from test_comfy_executor import run

    return run(executor, g)


def test_one_node_equals_the_separate_nodes(executor, toy_folder):
    rules = ("tokens", "tokens", "always", "tokens")
    one, outputs = _run(executor, one_node(PROMPT, rules, "one"))
    report = outputs["apply"]["text"][0]
    assert "All-but-One guidance attached" in report and "appended to the negative" in report
    separate, _ = _run(executor, separate_nodes(PROMPT, rules, "sep"))
    plain, _ = _run(executor, _base(PROMPT, "plain"))
    assert (one - plain).abs().max() > 1e-2
    assert torch.allclose(one, separate, atol=1e-4, rtol=1e-4), (one - separate).abs().max()


def test_every_gate_zero_is_bit_identical_to_no_stack(executor, toy_folder):
    prompt = "a green square in stripes"
    one, outputs = _run(executor, one_node(prompt, ("tokens",) * 4, "zero"))
    assert "not appended, gate 0.000" in outputs["apply"]["text"][0]
    plain, _ = _run(executor, _base(prompt, "zero_plain"))
    assert torch.equal(one, plain)


def test_apply_once_not_twice(executor, toy_folder):
    g = one_node(PROMPT, ("tokens", "tokens", "always", "tokens"), "twice")
    g["abo_patch"] = {"class_type": "ConceptGateAboGuidance", "inputs": {"model": ["apply", 0], "clip": ["ckpt", 1],
                                                                          "stack": ["s4", 0]}}
    g["sampler"]["inputs"]["model"] = ["abo_patch", 0]
    with pytest.raises(AssertionError, match="already attached"):
        _run(executor, g)
    g = one_node(PROMPT, ("tokens", "tokens", "always", "tokens"), "twice_geom")
    g["geom_neg"] = {"class_type": "ConceptGateGeomNegative", "inputs": {
        "clip": ["ckpt", 1], "source": "none", "token_set": "observed", "top_k": 8, "overflow": "drop",
        "negative": ["apply", 2], "stack": ["s4", 0]}}
    g["sampler"]["inputs"]["negative"] = ["geom_neg", 0]
    once, _ = _run(executor, g)  # the Geom node sees the tokens already appended and adds nothing
    ref, _ = _run(executor, one_node(PROMPT, ("tokens", "tokens", "always", "tokens"), "once_ref"))
    assert torch.equal(once, ref)


# ------------------------------------------------------------------ diffusers: one GatedPipeline for every kind
@pytest.fixture(scope="module")
def toy_four():
    from conceptgate import toyworld
    from conceptgate.adapters import GateSettings, load_eraser
    from conceptgate.adapters.abo import abo_eraser
    from conceptgate.adapters.rece import DiffusersEditHost, compute_edit

    pipe = toyworld.load_pipeline()
    uce = compute_edit(DiffusersEditHost.from_pipeline(pipe), method="uce", concepts=("star",), cache=None).eraser
    tokens = GateSettings(rule="tokens")
    erasers = [load_eraser(os.path.join(ERASERS, "spm_triangle.safetensors")), uce,
               load_eraser(os.path.join(ERASERS, "geom_watermark.safetensors")), abo_eraser(["circle"], "square")]
    return pipe, erasers, tokens


def _four_stack(erasers, tokens, geom_rule="always"):
    from conceptgate.adapters import EraserStack, GateSettings

    stack = EraserStack()
    for e in erasers:
        stack = stack.with_eraser(e, gate=GateSettings(rule=geom_rule) if e.kind == "conditioning" else tokens)
    return stack


KW = dict(num_inference_steps=4, guidance_scale=5.0, height=64, width=64, output_type="latent")


def _gen(n):
    return [torch.Generator().manual_seed(10 + i) for i in range(n)]


def test_gated_pipeline_applies_all_four_kinds_like_the_separate_paths(toy_four):
    from conceptgate.adapters.abo import AboGuidedPipeline
    from conceptgate.adapters.diffusers_host import GatedPipeline
    from conceptgate.adapters.geom import encode_negative

    pipe, erasers, tokens = toy_four
    prompts = [PROMPT, "a green square in stripes"]
    with GatedPipeline(pipe, _four_stack(erasers, tokens)) as gated:
        one = gated(prompts, negative_prompt="blurry", generator=_gen(2), **KW).images
        assert {r["eraser"] for r in gated.last_report.rows} == {e.name for e in erasers}
        assert gated.sessions["abo"].last_terms[0] and not gated.sessions["abo"].last_terms[1]
        coeffs = gated.last_coefficients  # each row its own treatment: the target row fires, the other not
        assert (coeffs[0, :2] > 0).all() and (coeffs[1, :2] == 0).all()
    # today's separate paths: weights + guidance through AboGuidedPipeline, Geom's negative embeddings by hand
    without_geom = _four_stack([e for e in erasers if e.kind != "conditioning"], tokens)
    neg = encode_negative(erasers[2], pipe.tokenizer, pipe.text_encoder, ["blurry"] * 2, on=[True, True])
    with AboGuidedPipeline(pipe, without_geom) as guided:
        embeds = guided.encoder(prompts).hidden
        separate = guided(prompts, prompt_embeds=embeds, negative_prompt_embeds=neg, generator=_gen(2), **KW).images
    plain = pipe(prompts, negative_prompt=["blurry"] * 2, generator=_gen(2), **KW).images
    assert (one[0] - plain[0]).abs().max() > 1e-2  # the target row is changed
    assert torch.allclose(one, separate, atol=1e-5, rtol=1e-5), (one - separate).abs().max()


def test_gated_pipeline_all_gates_zero_is_bit_identical(toy_four):
    from conceptgate.adapters.diffusers_host import GatedPipeline

    pipe, erasers, tokens = toy_four
    prompts = ["a green square in stripes", "a blue circle"][:1]
    with GatedPipeline(pipe, _four_stack(erasers, tokens, geom_rule="tokens")) as gated:
        out = gated(prompts, negative_prompt="blurry", generator=_gen(1), **KW).images
        assert all(r["gate"] == 0.0 for r in gated.last_report.rows)
    # with a conditioning eraser in the stack the negative goes in as embeddings: compare with that call
    embeds = gated.encoder(prompts).hidden
    neg = gated.encoder(["blurry"]).hidden
    plain = pipe(prompt_embeds=embeds, negative_prompt_embeds=neg, generator=_gen(1), **KW).images
    assert torch.equal(out, plain)


# ------------------------------------------------------------------ the shipped stack of four, as a manifest
MANIFEST = os.path.join(ERASERS, "stack_of_four.json")


def _entries(stack):
    return [(e.eraser.name, e.eraser.kind, e.eraser.sha256, e.enabled, e.strength, e.gate.to_dict()) for e in stack.entries]


def test_manifest_of_four_loads_the_same_everywhere(executor):
    import nodes
    from conceptgate.adapters import EraserStack
    from conceptgate.extension.library import Library

    core = EraserStack.from_manifest(MANIFEST)
    assert sorted(e.eraser.kind for e in core.entries) == ["conditioning", "guidance", "weight", "weight"]
    node = nodes.NODE_CLASS_MAPPINGS["ConceptGateLoadStack"]
    comfy_stack, info = node.execute(manifest="stack_of_four.json").result  # ComfyUI finds it among the shipped files
    assert _entries(comfy_stack) == _entries(core) and "abo_circle_to_square" in info
    webui = Library(ERASERS).load_preset("stack_of_four.json")
    assert _entries(webui) == _entries(core)


def test_manifest_stack_through_the_one_node_equals_the_node_chain(executor):
    g = _base(PROMPT, "manifest")
    g["stack"] = {"class_type": "ConceptGateLoadStack", "inputs": {"manifest": "stack_of_four.json"}}
    g["apply"] = {"class_type": "ConceptGateApplyStack", "inputs": {
        "model": ["ckpt", 0], "clip": ["ckpt", 1], "stack": ["stack", 0], "positive": ["pos", 0], "negative": ["neg", 0],
        "mode": "per-row", "combine": "additive"}}
    g["sampler"]["inputs"]["model"] = ["apply", 0]
    g["sampler"]["inputs"]["negative"] = ["apply", 2]
    from_manifest, outputs = _run(executor, g)
    report = outputs["apply"]["text"][0]
    assert "triangle: gate 1.000" in report and "uce_star: gate 1.000" in report and "abo_circle_to_square: gate 1.000" in report
    chain = _base(PROMPT, "chain")
    names = ["spm_triangle", "uce_star", "geom_watermark", "abo_circle_to_square"]
    prev = None
    for i, name in enumerate(names):
        chain[f"l{i}"] = {"class_type": "ConceptGateLoadEraser", "inputs": {"eraser_name": f"{name}.safetensors", "concepts": ""}}
        chain[f"s{i}"] = _add([f"l{i}", 0], "always" if name.startswith("geom") else "context", prev)
        prev = [f"s{i}", 0]
    chain["apply"] = dict(g["apply"], inputs=dict(g["apply"]["inputs"], stack=prev))
    chain["sampler"]["inputs"]["model"] = ["apply", 0]
    chain["sampler"]["inputs"]["negative"] = ["apply", 2]
    by_nodes, _ = _run(executor, chain)
    assert torch.equal(from_manifest, by_nodes)

"""All-but-One guidance in ComfyUI 0.3.75 on the embedded toy model: the KSampler patch and the GUIDER in
ComfyUI's real PromptExecutor, gate 0 bit-identical to the stock graph, both paths equal to each other and
to the rule evaluated on the diffusers UNet, one batched UNet call per step."""

import sys

import pytest
import torch

from conceptgate import toyworld
from conceptgate.adapters import EraserStack, GateSettings
from conceptgate.adapters.abo.guidance import abo_eraser, abo_rule
from conceptgate.adapters.errors import EraserFileError

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, CFG, SEED = 4, 5.0, 11
ERASED, CLEAN = "a red triangle in striped style", "a blue circle in flat style"


@pytest.fixture(scope="module")
def toy(comfy):
    from conceptgate.nodes.nodes_toy import load_toy_for_comfy

    return load_toy_for_comfy()


def graph(prompt, path="stock", alternative="square", threshold=0.91, cfg=CFG, key="out", gate="ft"):
    g = {
        "ckpt": {"class_type": "ConceptGateToyModelLoader", "inputs": {}},
        "pos": {"class_type": "ConceptGateTextEncode", "inputs": {"clip": ["ckpt", 1], "text": prompt}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": ""}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "eraser": {"class_type": "ConceptGateAboEraser", "inputs": {"erase": "triangle", "alternative": alternative}},
        "stack": {"class_type": "ConceptGateAddToStack", "inputs": {
            "eraser": ["eraser", 0], "enabled": True, "strength": 1.0, "gate": gate, "cond_only": False,
            "threshold": threshold}},
    }
    model = ["ckpt", 0]
    if path in ("stock", "patch"):
        if path == "patch":
            g["abo"] = {"class_type": "ConceptGateAboGuidance", "inputs": {
                "model": ["ckpt", 0], "clip": ["ckpt", 1], "stack": ["stack", 0], "positive": ["pos", 0]}}
            model = ["abo", 0]
        g["sampler"] = {"class_type": "KSampler", "inputs": {
            "model": model, "seed": SEED, "steps": STEPS, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0}}
    else:
        if path == "guider":
            g["guider"] = {"class_type": "ConceptGateAboGuider", "inputs": {
                "model": ["ckpt", 0], "clip": ["ckpt", 1], "stack": ["stack", 0], "positive": ["pos", 0],
                "negative": ["neg", 0], "cfg": cfg}}
        else:  # stock CFGGuider
            g["guider"] = {"class_type": "CFGGuider", "inputs": {
                "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0], "cfg": cfg}}
        g["noise"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}}
        g["select"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
        g["sigmas"] = {"class_type": "BasicScheduler", "inputs": {
            "model": ["ckpt", 0], "scheduler": "normal", "steps": STEPS, "denoise": 1.0}}
        g["sampler"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["select", 0], "sigmas": ["sigmas", 0],
            "latent_image": ["latent", 0]}}
    g["capture"] = {"class_type": "CGTest_CaptureLatent", "inputs": {"samples": ["sampler", 0], "key": key}}
    return g


def run(executor, g):
    import nodes

    executor.run(g)
    pack = sys.modules[nodes.NODE_CLASS_MAPPINGS["CGTest_CaptureLatent"].__module__]
    return pack.CAPTURED.pop(g["capture"]["inputs"]["key"])


def close(a, b, tol=1e-4):
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


def test_nodes_registered_with_tooltips(executor):
    import nodes

    for name in ("ConceptGateAboEraser", "ConceptGateAboGuider", "ConceptGateAboGuidance"):
        cls = nodes.NODE_CLASS_MAPPINGS[name]
        assert cls.CATEGORY == "ConceptGate"
        for section in ("required", "optional"):
            for arg, (_, *opts) in cls.INPUT_TYPES().get(section, {}).items():
                assert opts and opts[0].get("tooltip"), f"{name}.{arg} has no tooltip"


@pytest.mark.slow
def test_executor_patch_and_guider(executor, toy):
    """Real executor: the erase prompt changes, a clean prompt is bit-identical to the stock graph, and the
    KSampler patch and the GUIDER agree."""
    base_ks = run(executor, graph(ERASED, "stock"))
    base_cg = run(executor, graph(ERASED, "stock_guider"))
    assert close(base_ks, base_cg, 1e-5)                              # the two stock samplers agree
    patch = run(executor, graph(ERASED, "patch"))
    guider = run(executor, graph(ERASED, "guider"))
    assert (patch - base_ks).abs().max() > 0.05
    assert close(patch, guider)
    # gate 0 (calibrated threshold, no token match): bit-identical to the stock graphs
    assert torch.equal(run(executor, graph(CLEAN, "patch")), run(executor, graph(CLEAN, "stock")))
    assert torch.equal(run(executor, graph(CLEAN, "guider")), run(executor, graph(CLEAN, "stock_guider")))
    # erase to nothing, and cfg == 1 (ComfyUI skips the negative branch)
    for kw in ({"alternative": ""}, {"cfg": 1.0}):
        p = run(executor, graph(ERASED, "patch", **kw))
        assert close(p, run(executor, graph(ERASED, "guider", **kw)))
        assert (p - run(executor, graph(ERASED, "stock", cfg=kw.get("cfg", CFG)))).abs().max() > 0.05


# --------------------------------------------------------------------------- direct sampling checks


def _stack(alternative="square", rule="ft", threshold=0.91):
    gate = GateSettings(rule=rule, threshold=threshold if rule == "ft" else None,
                        temperature=0.0 if rule == "ft" else None)
    return EraserStack().with_eraser(abo_eraser("triangle", alternative), gate=gate)


def _encode(clip, text, tokens=True):
    from conceptgate.nodes.nodes_conceptgate import TextEncode

    if tokens:
        return TextEncode.execute(text=text, clip=clip).result[0]
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def _sample(model, positive, negative, steps=STEPS, cfg=CFG, guider=None):
    import comfy.sample
    import comfy.samplers

    latent = torch.zeros(1, 4, 16, 16)
    noise = comfy.sample.prepare_noise(latent, SEED)
    if guider is None:
        return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative, latent,
                                   denoise=1.0, seed=SEED, disable_pbar=True)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)
    return guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, disable_pbar=True, seed=SEED)


class Counter:
    def __init__(self, model):
        self.calls, self.rows = 0, 0
        self.h = model.model.diffusion_model.register_forward_pre_hook(self.count)

    def count(self, module, args):
        self.calls += 1
        self.rows += args[0].shape[0]


@pytest.mark.parametrize("alternative,cfg", [("square", CFG), ("", CFG), ("square", 1.0)])
def test_one_step_equals_the_rule_on_the_diffusers_unet(toy, alternative, cfg):
    """One euler step from sigma_max returns the guided x0: compare with the rule evaluated on the diffusers
    UNet's epsilons (x0 = x - sigma * eps_hat; ComfyUI's latent out = x0 / scale factor)."""
    import comfy.sample

    from conceptgate.nodes.nodes_abo import AboGuider, AboRuntime, patched_model

    model, clip, _ = toy
    pipe = toyworld.load_pipeline()
    stack = _stack(alternative)
    pos, neg = _encode(clip, ERASED), _encode(clip, "", tokens=False)
    patched, runtime = patched_model(model, stack, clip)
    out_patch = _sample(patched, pos, neg, steps=1, cfg=cfg)
    guider = AboGuider(model)
    guider.set_conds(pos, neg)
    guider.set_cfg(cfg)
    guider.set_abo(AboRuntime(stack, clip))
    out_guider = _sample(model, pos, neg, steps=1, guider=guider)
    ms = model.get_model_object("model_sampling")
    sigma = float(ms.sigma_max)
    x = comfy.sample.prepare_noise(torch.zeros(1, 4, 16, 16), SEED) * (1.0 + sigma ** 2) ** 0.5
    t = ms.timestep(torch.tensor([sigma])).float()
    ids = pipe.tokenizer(["", ERASED, "triangle", alternative], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        hid = pipe.text_encoder(ids)[0]
        eps = pipe.unet((x / (sigma ** 2 + 1) ** 0.5).repeat(4, 1, 1, 1), t.repeat(4), hid).sample
    eps_hat = abo_rule(eps[:1], eps[1:2], cfg, [(1.0, eps[2:3], eps[3:4])]) if cfg > 1 else eps[1:2] - (eps[2:3] - eps[3:4])
    expected = (x - sigma * eps_hat) / model.model.latent_format.scale_factor
    plain = _sample(model, pos, neg, steps=1, cfg=cfg)
    assert (expected - plain).abs().max() > 0.05
    scale = float(expected.abs().max())
    assert float((out_patch - expected).abs().max()) < 2e-3 * scale
    assert float((out_guider - expected).abs().max()) < 2e-3 * scale
    assert close(out_patch, out_guider)


def test_identity_and_batched_calls(toy):
    """p = erase with gamma = 1 equals stock CFG sampling with the alternative as prompt (the fine-tuned
    optimum's output); every step is ONE UNet call carrying the extra rows; gate 0 adds nothing."""
    from conceptgate.nodes.nodes_abo import AboGuider, AboRuntime, patched_model

    model, clip, _ = toy
    neg = _encode(clip, "", tokens=False)
    for alternative in ("square", ""):
        stack = _stack(alternative, rule="always")
        patched, runtime = patched_model(model, stack, clip)
        counter = Counter(model)
        try:
            ours = _sample(patched, _encode(clip, "triangle"), neg)
            # p = erase reuses the positive row; "" reuses the (empty) negative row
            assert counter.calls == STEPS and counter.rows == STEPS * (3 if alternative else 2)
        finally:
            counter.h.remove()
        oracle = _sample(model, _encode(clip, alternative or ""), neg)
        assert close(ours, oracle, 1e-4)
    # gate 0: no extra row, bit-identical, for both paths
    stack = _stack("square")
    pos = _encode(clip, CLEAN)
    patched, runtime = patched_model(model, stack, clip)
    counter = Counter(model)
    try:
        a = _sample(patched, pos, neg)
        guider = AboGuider(model)
        guider.set_conds(pos, neg)
        guider.set_cfg(CFG)
        guider.set_abo(AboRuntime(stack, clip))
        b = _sample(model, pos, neg, guider=guider)
        assert counter.calls == 2 * STEPS and counter.rows == 2 * STEPS * 2
    finally:
        counter.h.remove()
    base = _sample(model, pos, neg)
    assert torch.equal(a, base) and torch.equal(b, base) and runtime.extra_rows == 0


def test_in_prompt_form_equals_sampling_the_swapped_prompt_in_both_paths(toy):
    """In-prompt eraser at gate 1: eps_n + w (eps_p - eps_n) - w (eps_p - eps_swapped) is stock CFG sampling of
    the prompt with the concept replaced by the alternative; the erase row is the positive's own (3 rows per
    step). Without the recorded text (stock CLIP Text Encode) or with a conditioning changed after encoding,
    the bare-word rule runs instead."""
    from conceptgate.nodes.nodes_abo import AboGuider, AboRuntime, patched_model

    model, clip, _ = toy
    neg = _encode(clip, "", tokens=False)
    stack = EraserStack().with_eraser(abo_eraser("triangle", "square", in_prompt=True), gate=GateSettings(rule="always"))
    pos = _encode(clip, ERASED)
    patched, runtime = patched_model(model, stack, clip)
    counter = Counter(model)
    try:
        ours = _sample(patched, pos, neg)
        assert counter.calls == STEPS and counter.rows == STEPS * 3
    finally:
        counter.h.remove()
    guider = AboGuider(model)
    guider.set_conds(pos, neg)
    guider.set_cfg(CFG)
    guider.set_abo(AboRuntime(stack, clip))
    via_guider = _sample(model, pos, neg, guider=guider)
    oracle = _sample(model, _encode(clip, "a red square in striped style", tokens=False), neg)
    assert close(ours, oracle, 1e-4) and close(via_guider, oracle, 1e-4)
    assert [t.label for t in runtime.terms_for(guider.original_conds["positive"])] == [("triangle", "square")]
    # the bare-word rule where the text is not known or no longer matches the tensor
    bare_stack = EraserStack().with_eraser(abo_eraser("triangle", "square"), gate=GateSettings(rule="always"))
    bare = _sample(patched_model(model, bare_stack, clip)[0], pos, neg)
    assert (bare - oracle).abs().max() > 1e-2
    assert close(_sample(patched_model(model, stack, clip)[0], _encode(clip, ERASED, tokens=False), neg), bare, 1e-5)
    changed = [[c * 1.01, extra] for c, extra in pos]
    rt = AboRuntime(stack, clip)
    assert rt.prompt_text(pos[0]) == ERASED and rt.prompt_text(changed[0]) is None
    from comfy.sampler_helpers import convert_cond

    assert [(t.erase, t.alternative) for t in rt.terms_for(convert_cond(changed))] == [("triangle", "square")]


def test_patch_is_stackable_and_refuses_stacks_without_abo(toy):
    import nodes as comfy_nodes

    from conceptgate.nodes.nodes_abo import patched_model

    model, clip, _ = toy
    other = model.clone()
    other.set_model_sampler_post_cfg_function(lambda args: args["denoised"])  # someone else's post-CFG patch
    patched, _ = patched_model(other, _stack(), clip)
    assert len(patched.model_options["sampler_post_cfg_function"]) == 2
    assert "model_function_wrapper" not in patched.model_options and "sampler_cfg_function" not in patched.model_options
    zero_star = comfy_nodes.NODE_CLASS_MAPPINGS["CFGZeroStar"].execute(patched)  # a stock post-CFG node after ours
    zero_star = zero_star[0] if isinstance(zero_star, tuple) else zero_star.result[0]
    assert len(zero_star.model_options["sampler_post_cfg_function"]) == 3
    assert zero_star.model_options["sampler_post_cfg_function"][1] is patched.model_options["sampler_post_cfg_function"][1]
    # a later clone (any node downstream) still erases: wrapper and post-CFG function share one runtime
    pos, neg = _encode(clip, ERASED), _encode(clip, "", tokens=False)
    assert torch.equal(_sample(patched.clone(), pos, neg, steps=2), _sample(patched, pos, neg, steps=2))
    assert (_sample(patched, pos, neg, steps=2) - _sample(other, pos, neg, steps=2)).abs().max() > 0.05
    assert model.model_options.get("sampler_post_cfg_function", []) == []   # the user's MODEL got nothing
    from conceptgate.adapters.synthetic import random_eraser
    from conceptgate.nodes.comfy_glue import unet_layout

    weights_only = EraserStack().with_eraser(random_eraser(unet_layout(model), which="attn2_kv"))
    with pytest.raises(EraserFileError, match="no enabled All-but-One guidance eraser"):
        patched_model(model, weights_only, clip)

"""The ComfyUI application paths, run by ComfyUI's own sampler on a tiny SD1.x-family model.

weight patches (one gate) == per-row hooks (all rows at that gate) == a model whose weights were
merged with ``W + delta`` by hand; the stock LoraLoader reads our files the same way.
"""

import copy

import pytest
import torch

from conceptgate.adapters import EraserStack, GateSettings, dense_deltas, layout_from_diffusers_config, save_eraser
from conceptgate.adapters.synthetic import random_eraser
from comfy_sampling import close, encode, merged_model, sample
from tiny_models import tiny_text_encoder, tiny_unet


@pytest.fixture(scope="module")
def world(comfy):
    from conceptgate.nodes import comfy_models

    unet = tiny_unet(seed=5)
    clip = comfy_models.text_encoder_to_comfy(tiny_text_encoder(seed=5))
    layout = layout_from_diffusers_config(unet.config)
    erasers = [random_eraser(layout, concepts=["red triangle"], seed=11, scale=0.25, name="tri"),
               random_eraser(layout, concepts=["blue circle"], seed=12, scale=0.25, rank=1, name="circ")]
    return {"unet": unet, "model": comfy_models.unet_to_comfy(unet), "clip": clip, "erasers": erasers}


@pytest.mark.parametrize("combine", ["additive", "official"])
def test_weight_path_and_row_path_equal_hand_merge(world, combine):
    from conceptgate.nodes import comfy_glue

    stack = EraserStack(combine=combine)
    for e, s in zip(world["erasers"], (0.9, 0.6)):
        stack = stack.with_eraser(e, strength=s, gate=GateSettings(rule="always"))
    coeffs = torch.tensor([0.9, 0.6])
    pos, neg = encode(world["clip"], "a red triangle"), encode(world["clip"], "")
    base = sample(world["model"], pos, neg)
    reference = sample(merged_model(world["unet"], dense_deltas(stack, coeffs)), pos, neg)
    by_weights = sample(comfy_glue.weight_patched(world["model"], stack, coeffs), pos, neg)
    by_rows = sample(comfy_glue.row_gated(world["model"], stack, world["clip"]), pos, neg)
    assert (reference - base).abs().max() > 1e-2
    assert close(by_weights, reference)
    assert close(by_rows, reference)
    # the user's model is left as it was
    assert torch.equal(sample(world["model"], pos, neg), base)


def test_row_path_gates_each_conditioning(world):
    """Two positive prompts combined + a negative: each chunk carries its own gate, the
    unconditional chunk the prompt's (official semantics) or zero with cond_only."""
    import comfy.patcher_extension
    from conceptgate.nodes import comfy_glue

    tri = world["erasers"][0]
    for cond_only in (False, True):
        stack = EraserStack().with_eraser(tri, gate=GateSettings(rule="tokens", cond_only=cond_only))
        model = comfy_glue.row_gated(world["model"], stack, world["clip"])
        seen = []
        runtime_hooks = None

        def spy(executor, *args, **kwargs):
            opts = args[5]
            seen.append((list(opts["cond_or_uncond"]), runtime_hooks_current()))
            return executor(*args, **kwargs)

        wrapper = model.wrappers[comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL][comfy_glue.KEY][0]
        runtime_hooks = wrapper.__self__.hooks
        runtime_hooks_current = runtime_hooks.current
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "spy", spy)
        pos = encode(world["clip"], "a red triangle") + encode(world["clip"], "a green square")
        # the token half needs the tags our text-encode node sets
        for (c, extra), text in zip(pos, ("a red triangle", "a green square")):
            extra[comfy_glue.TOKENS_KEY] = sorted(comfy_glue.content_tokens(world["clip"], world["clip"].tokenize(text)))
        sample(model, pos, encode(world["clip"], "blurry"), steps=2)
        assert seen
        for kinds, coeffs in seen:
            gates = coeffs[:, 0].tolist()
            for kind, g in zip(kinds, gates):
                if kind == 1:
                    assert g == (0.0 if cond_only else 1.0)
            assert sorted(g for k, g in zip(kinds, gates) if k == 0) == [0.0, 1.0]


def test_row_path_copies_no_weights(world):
    from conceptgate.nodes import comfy_glue

    stack = EraserStack().with_eraser(world["erasers"][0], gate=GateSettings(rule="always"))
    model = comfy_glue.row_gated(world["model"], stack, world["clip"])
    before = {k: v.clone() for k, v in world["model"].model.state_dict().items()}
    sample(model, encode(world["clip"], "x"), encode(world["clip"], ""))
    assert model.backup == {}  # ComfyUI backs up a weight only when it patches it
    assert all(torch.equal(before[k], v) for k, v in world["model"].model.state_dict().items())
    # the hooks stay while ComfyUI keeps this clone loaded; sampling with another clone ejects them
    sample(world["model"], encode(world["clip"], "x"), encode(world["clip"], ""))
    assert all(not m._forward_hooks for m in world["model"].model.modules())


def test_stock_lora_loader_reads_our_file(world, tmp_path, comfy):
    """A ConceptGate file loads in ComfyUI's own LoraLoaderModelOnly at a fixed strength, with the
    same result as our batch path at the same coefficient."""
    import folder_paths
    import nodes
    from conceptgate.nodes import comfy_glue

    tri = world["erasers"][0]
    save_eraser(tri, tmp_path / "tri.safetensors")
    folder_paths.add_model_folder_path("loras", str(tmp_path), is_default=True)
    (stock,) = nodes.LoraLoaderModelOnly().load_lora_model_only(world["model"], "tri.safetensors", 0.7)
    ours = comfy_glue.weight_patched(world["model"], EraserStack().with_eraser(tri), torch.tensor([0.7]))
    pos, neg = encode(world["clip"], "a red triangle"), encode(world["clip"], "")
    assert close(sample(ours, pos, neg), sample(stock, pos, neg))


def test_incompatible_eraser_is_refused_on_comfy_model(world):
    from conceptgate.adapters import IncompatibleModelError, reference_layout
    from conceptgate.nodes import comfy_glue

    sdxl = random_eraser(reference_layout("sdxl"), name="xl")
    sdxl.source = "xl.safetensors"
    with pytest.raises(IncompatibleModelError, match="xl.safetensors"):
        comfy_glue.weight_patched(world["model"], EraserStack().with_eraser(sdxl), torch.tensor([1.0]))


def test_official_spm_file_through_every_path(world, tmp_path, comfy):
    """An official-format SPM file (kohya keys + prompts/rank/alpha, no ConceptGate metadata): inspected,
    then applied through diffusers hooks, ComfyUI weight patches, ComfyUI per-row hooks and ComfyUI's
    stock LoraLoader; every path matches the hand merge."""
    import folder_paths
    import nodes
    from conceptgate.adapters import describe, load_eraser
    from conceptgate.adapters.diffusers_host import attach
    from conceptgate.nodes import comfy_glue
    from spm_files import write_official_spm

    layout = layout_from_diffusers_config(world["unet"].config)
    path = write_official_spm(tmp_path / "tri_last.safetensors", layout, prompts="red triangle", seed=31, scale=0.25)
    info, problems = describe(path)
    assert problems == [] and info["concepts"] == ["red triangle"] and info["modules"] == len(layout.modules())
    eraser = load_eraser(path)
    stack = EraserStack().with_eraser(eraser, strength=0.8, gate=GateSettings(rule="always"))
    coeffs = torch.tensor([0.8])
    deltas = dense_deltas(stack, coeffs)

    # diffusers: one UNet call, hooks vs hand merge
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.full((2,), 300), torch.randn(2, 77, 64)
    unet = world["unet"]
    with torch.no_grad():
        with attach(unet, stack) as hooks, hooks.coefficients(coeffs):
            hooked = unet(x, t, ctx).sample
        merged_unet = copy.deepcopy(unet)
        for name, d in deltas.items():
            merged_unet.get_submodule(name).weight += d
        assert close(hooked, merged_unet(x, t, ctx).sample)

    # ComfyUI: sampler outputs
    pos, neg = encode(world["clip"], "a red triangle"), encode(world["clip"], "")
    reference = sample(merged_model(world["unet"], deltas), pos, neg)
    folder_paths.add_model_folder_path("loras", str(tmp_path), is_default=True)
    (stock,) = nodes.LoraLoaderModelOnly().load_lora_model_only(world["model"], "tri_last.safetensors", 0.8)
    for patched in (comfy_glue.weight_patched(world["model"], stack, coeffs),
                    comfy_glue.row_gated(world["model"], stack, world["clip"]), stock):
        assert close(sample(patched, pos, neg), reference)

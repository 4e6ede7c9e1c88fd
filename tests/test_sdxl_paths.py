"""SDXL end to end on tiny SDXL-architecture models (issue 18; random weights, built in-process by
``tiny_models.tiny_sdxl_*``): two CLIP text encoders (the second with a projection for the pooled
embedding), a UNet with the added text/time embedding, no attention at the highest resolution and depth-2
transformers below it.

* diffusers (``GatedPipeline`` on ``StableDiffusionXLPipeline``): the gate reads the concatenated context
  the UNet gets; a weight eraser, a UCE edit of that context, Geom tokens for both encoders and All-but-One
  guidance (pooled embedding and time ids in its extra rows);
* ComfyUI's executor: a tiny SDXL checkpoint converted to ComfyUI's own SDXL classes, weight erasers per row
  and in batch through Apply Eraser Stack;
* SD1.5 erasers refused on SDXL models and the reverse, with both families named, in both hosts;
* key maps of the tiny SDXL layout equal ComfyUI's.
"""

import copy

import pytest
import torch

from conceptgate.adapters import EraserStack, GateSettings, dense_deltas, layout_from_diffusers_config
from conceptgate.adapters.diffusers_host import DiffusersSDXLGateEncoder, GatedPipeline
from conceptgate.adapters.errors import IncompatibleModelError
from conceptgate.adapters.synthetic import random_eraser
from tiny_models import XL_CONTEXT, XL_WIDTHS, tiny_sdxl_pipeline

STEPS = 2
TOKENS = GateSettings(rule="tokens")
PROMPTS = ["a red triangle", "a green square"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return tiny_sdxl_pipeline(seed=3)


@pytest.fixture(scope="module")
def layout(pipe):
    return layout_from_diffusers_config(pipe.unet.config)


def latents(n):
    return torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in range(n)])


def run(call, prompts=PROMPTS, cfg=5.0, negative=None):
    return call(prompt=list(prompts), negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=cfg,
                height=16, width=16, latents=latents(len(prompts)), output_type="latent").images


def merged_pipe(pipe, deltas):
    p = copy.copy(pipe)
    unet = copy.deepcopy(pipe.unet)
    with torch.no_grad():
        for name, d in deltas.items():
            unet.get_submodule(name).weight += d.to(torch.float32).reshape(unet.get_submodule(name).weight.shape)
    p.unet = unet
    return p


# ------------------------------------------------------------------ the gate's text encoding

def test_layout_is_sdxl_shaped(layout):
    assert layout.context_dim == XL_CONTEXT and layout.linear_proj
    assert [d for *_, d in layout.transformers] == [2, 2, 2, 2]  # level 1 (depth 2), middle, two up blocks
    assert not any(n.startswith("down_blocks.0.") for n, *_ in layout.transformers)  # no attention at full res


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_gate_reads_the_context_the_unet_gets(pipe, clip_skip):
    """The gate's states are StableDiffusionXLPipeline.encode_prompt's own prompt_embeds (both encoders'
    penultimate layers, concatenated), and its pooled embeddings the pipeline's pooled_prompt_embeds."""
    gated = GatedPipeline(pipe, EraserStack(), clip_skip=clip_skip)
    assert isinstance(gated.encoder, DiffusersSDXLGateEncoder)
    with torch.no_grad():
        ref, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                               do_classifier_free_guidance=False, clip_skip=clip_skip)
    enc, ours_pooled = gated.encoder.encode(PROMPTS)
    assert enc.hidden.shape == (2, 77, XL_CONTEXT) and torch.equal(enc.hidden, ref.float())
    assert torch.equal(ours_pooled, pooled)
    ids = pipe.tokenizer(PROMPTS[0]).input_ids
    assert enc.tokens[0] == set(ids[1:-1]) and int(enc.mask[0].sum()) == len(ids) - 2


# ------------------------------------------------------------------ weight erasers

def test_weight_eraser_per_row_on_sdxl(pipe, layout):
    """A random SPM-shaped eraser on all 88 modules: the prompt whose gate fires equals the hand-merged
    model, the other row of the same batch is bit-identical to the plain pipeline."""
    e = random_eraser(layout, concepts=["red triangle"], seed=4, scale=0.3, name="tri")
    assert len(e.modules) == len(layout.modules("spm")) == 88
    stack = EraserStack().with_eraser(e, gate=TOKENS)
    base = run(pipe)
    with GatedPipeline(pipe, stack) as gated:
        erased = run(gated)
        assert gated.last_coefficients[:, 0].tolist() == [1.0, 0.0]
    reference = run(merged_pipe(pipe, dense_deltas(stack, torch.tensor([1.0]))))
    assert (erased[0] - base[0]).abs().max() > 1e-3
    assert torch.allclose(erased[0], reference[0], rtol=1e-4, atol=1e-3)  # latents x init sigma (~15)
    assert torch.equal(erased[1], base[1])


def test_uce_edit_of_the_concatenated_context(pipe):
    """UCE solved on the 64-wide (32 + 32) context: exact, fits its base, applied per row."""
    from conceptgate.adapters.rece.edit import compute_edit
    from conceptgate.adapters.rece.hosts import DiffusersEditHost

    host = DiffusersEditHost.from_pipeline(pipe)
    assert host.sdxl and host.encode(["x"])[0].shape[-1] == XL_CONTEXT
    out = compute_edit(host, method="uce", concepts=("red triangle",), cache=None)
    assert out.report["rel_error_max"] < 1e-5
    assert all(d.weight_shape()[1] == XL_CONTEXT for d in out.eraser.modules.values())
    # the edit host's gate encoder is the one GatedPipeline uses
    assert torch.equal(host.gate_encoder()(PROMPTS).hidden, GatedPipeline(pipe, EraserStack()).encoder(PROMPTS).hidden)
    base = run(pipe)
    with GatedPipeline(pipe, EraserStack().with_eraser(out.eraser, gate=TOKENS)) as gated:
        erased = run(gated)
    assert (erased[0] - base[0]).abs().max() > 1e-4 and torch.equal(erased[1], base[1])


# ------------------------------------------------------------------ Geom tokens

def sdxl_geom(pipe, grid=2, with_g=True):
    from conceptgate.adapters.geom.tokens import make_eraser, text_fingerprint

    g = torch.Generator().manual_seed(5)
    w1 = pipe.text_encoder.get_input_embeddings().weight
    e = make_eraser("watermark", torch.randn(grid * grid, XL_WIDTHS[0], generator=g) * 0.5,
                    torch.randn(1, XL_WIDTHS[0], generator=g) * 0.5, grid, [3, 1, 0, 2], text_fingerprint(w1))
    if with_g:
        e.tensors["locations_g"] = torch.randn(grid * grid, XL_WIDTHS[1], generator=g) * 0.5
        e.tensors["concept_g"] = torch.randn(1, XL_WIDTHS[1], generator=g) * 0.5
        e.settings["text_fingerprint_g"] = text_fingerprint(pipe.text_encoder_2.get_input_embeddings().weight)
    e.concepts = ["red triangle"]
    return e


@pytest.mark.parametrize("negative", [None, "blurry"])
def test_geom_tokens_for_both_encoders(pipe, negative):
    """Geom tokens in the SDXL negative: each encoder gets its own vectors; the row whose gate is off
    gets exactly the pipeline's own negative (zeros when none is given: force_zeros_for_empty_prompt)."""
    from conceptgate.adapters.geom.negative import sdxl_negative

    e = sdxl_geom(pipe)
    base = run(pipe, negative=negative)
    with GatedPipeline(pipe, EraserStack().with_eraser(e, gate=TOKENS)) as gated:
        erased = run(gated, negative=negative)
    assert (erased[0] - base[0]).abs().max() > 1e-4
    assert torch.allclose(erased[1], base[1], atol=1e-6)
    neg = sdxl_negative(e, pipe, None if negative is None else [negative] * 2, [True, False])
    assert neg["negative_prompt_embeds"].shape == (2, 77, XL_CONTEXT)
    assert neg["negative_pooled_prompt_embeds"].shape == (2, XL_WIDTHS[1])
    if negative is None:
        assert not neg["negative_prompt_embeds"][1].any() and neg["negative_prompt_embeds"][0].any()


def test_one_encoder_geom_tokens_refused_on_sdxl(pipe):
    e = sdxl_geom(pipe, with_g=False)
    e.source = "sd1_tokens.safetensors"
    with GatedPipeline(pipe, EraserStack().with_eraser(e, gate=TOKENS)) as gated:
        with pytest.raises(IncompatibleModelError, match="sd1_tokens.safetensors.*both text encoders"):
            run(gated)


# ------------------------------------------------------------------ All-but-One guidance

def test_abo_extra_rows_carry_pooled_and_time_ids(pipe):
    """The extra rows of All-but-One guidance carry their own text's pooled embedding and their prompt
    row's time ids; an unrelated prompt of the same batch is left as it was."""
    from conceptgate.adapters.abo.guidance import abo_eraser

    seen = []

    def capture(module, args, kwargs):
        seen.append((kwargs["encoder_hidden_states"].clone(), {k: v.clone() for k, v in kwargs["added_cond_kwargs"].items()}))

    stack = EraserStack().with_eraser(abo_eraser("triangle", "square"), gate=TOKENS)
    base = run(pipe)
    with GatedPipeline(pipe, stack) as gated:
        handle = pipe.unet.register_forward_pre_hook(capture, with_kwargs=True)  # after ABO's own pre-hook
        try:
            guided = run(gated)
        finally:
            handle.remove()
        enc, pooled = gated.encoder.encode(["triangle", "square"])
    assert len(seen) == STEPS
    ehs, added = seen[0]
    assert ehs.shape[0] == 6  # uncond x 2, cond x 2, erase + alternative rows of prompt 0
    assert torch.equal(ehs[4:], enc.hidden) and torch.equal(added["text_embeds"][4:], pooled)
    assert torch.equal(added["time_ids"][4:], added["time_ids"][2:3].expand(2, -1))
    assert (guided[0] - base[0]).abs().max() > 1e-2
    # the unrelated row: unchanged up to the float noise of a 6-row instead of a 4-row UNet batch
    assert torch.allclose(guided[1], base[1], rtol=1e-4, atol=1e-3)


# ------------------------------------------------------------------ families: refused, both named

def _full_size_pipe(family):
    """A pipeline whose UNet is the full public architecture on the meta device (fits are checked from
    the config before anything runs)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from test_naming import SD15, SDXL

    p = tiny_sdxl_pipeline(0)
    if family == "sd1":
        p = StableDiffusionPipeline(vae=p.vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer, unet=p.unet,
                                    scheduler=p.scheduler, safety_checker=None, feature_extractor=None,
                                    requires_safety_checker=False)
    with torch.device("meta"):
        p.unet = UNet2DConditionModel(**(SDXL if family == "sdxl" else SD15))
    return p


@pytest.mark.parametrize("eraser_family,model_family", [("sd1", "sdxl"), ("sdxl", "sd1")])
def test_other_family_eraser_refused_in_diffusers(eraser_family, model_family):
    from conceptgate.adapters import reference_layout

    e = random_eraser(reference_layout(eraser_family), name=f"{eraser_family}_eraser")
    e.source = f"{eraser_family}_eraser.safetensors"
    assert e.base_family == eraser_family
    with pytest.raises(IncompatibleModelError) as err:
        GatedPipeline(_full_size_pipe(model_family), EraserStack().with_eraser(e))
    msg = str(err.value)
    assert e.source in msg and f"base family {eraser_family}, model is {model_family}" in msg


# ------------------------------------------------------------------ ComfyUI

@pytest.fixture(scope="module")
def comfy_xl(comfy, pipe):
    from conceptgate.nodes import comfy_models

    return {"model": comfy_models.unet_to_comfy(pipe.unet),
            "clip": comfy_models.sdxl_text_encoders_to_comfy(pipe.text_encoder, pipe.text_encoder_2)}


def test_components_equal_in_comfyui(pipe, comfy_xl):
    """The tiny SDXL model in ComfyUI's own SDXL classes computes what diffusers computes: the CLIP's
    context and pooled output, and the UNet (ComfyUI's label_emb from its own encode_adm)."""
    clip, model = comfy_xl["clip"], comfy_xl["model"]
    assert type(model.model).__name__ == "SDXL"
    cond, pooled = clip.encode_from_tokens(clip.tokenize(PROMPTS[0]), return_pooled=True)
    with torch.no_grad():
        ref, _, ref_pooled, _ = pipe.encode_prompt(PROMPTS[:1], device="cpu", num_images_per_prompt=1,
                                                   do_classifier_free_guidance=False)
    assert torch.allclose(cond, ref, atol=1e-5) and torch.allclose(pooled, ref_pooled, atol=1e-5)
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500.0])
    with torch.no_grad():
        d = pipe.unet(x, t, encoder_hidden_states=ref, added_cond_kwargs={
            "text_embeds": ref_pooled, "time_ids": torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]])}).sample
        c = model.model.diffusion_model(x, t, context=ref, y=model.model.encode_adm(pooled_output=ref_pooled,
                                                                                     width=16, height=16))
    assert torch.allclose(c, d, atol=1e-5)


def test_key_maps_equal_comfyuis(comfy, layout, comfy_xl):
    """The tiny SDXL layout's module names (diffusers <-> LDM, kohya) are ComfyUI's own: its converter's map
    for this config, the names of the converted model's real modules, and its LoRA key map (both kohya
    spellings); the full-size SDXL LoRA key map too (the SD1.5 one is in test_naming)."""
    import comfy.lora
    import comfy.supported_models
    import comfy.utils
    from conceptgate.adapters import reference_layout
    from conceptgate.adapters.naming import kohya_map
    from conceptgate.nodes import comfy_glue, comfy_models

    cfg = comfy_models.comfy_unet_config(tiny_sdxl_pipeline(0).unet.config)
    comfy_map = comfy.utils.unet_to_diffusers(cfg)
    ours = layout.to_ldm()
    assert len(ours) == 88 and all(comfy_map[n + ".weight"] == l + ".weight" for n, l in ours.items())
    targets = {k[:-7] for k in comfy_map if k.endswith(".weight") and ".attentions." in k
               and (".proj_" in k or ".attn" in k or ".ff.net." in k)}
    assert targets == set(ours)
    names = comfy_glue.module_names(comfy_xl["model"])
    assert all(names[n] == "diffusion_model." + l for n, l in ours.items())
    assert comfy_glue.unet_layout(comfy_xl["model"]).modules("spm") == layout.modules("spm")
    key_map = comfy.lora.model_lora_keys_unet(comfy_xl["model"].model, {})
    for kohya, name in kohya_map(layout).items():
        assert key_map[kohya] == f"diffusion_model.{ours[name]}.weight", kohya
    full = meta_comfy_model(comfy, "sdxl")
    key_map = comfy.lora.model_lora_keys_unet(full.model, {})
    ref = reference_layout("sdxl")
    for kohya, name in kohya_map(ref).items():
        assert key_map[kohya] == f"diffusion_model.{ref.to_ldm()[name]}.weight", kohya


def meta_comfy_model(comfy, family):
    """A ComfyUI ModelPatcher of the full public SD1.5 / SDXL architecture on the meta device."""
    import comfy.model_patcher
    import comfy.supported_models
    from conceptgate.adapters import reference_layout

    cfg = dict(reference_layout(family).config, use_checkpoint=False, image_size=32, use_spatial_transformer=True,
               legacy=False, in_channels=4, out_channels=4, use_temporal_attention=False, use_temporal_resblock=False,
               dtype=torch.float32)
    if family == "sdxl":
        cfg.update(adm_in_channels=2816, num_classes="sequential", num_heads=-1, num_head_channels=64)
        cls = comfy.supported_models.SDXL
    else:
        cfg.update(adm_in_channels=None, num_heads=8, num_head_channels=-1)
        cls = comfy.supported_models.SD15
    with torch.device("meta"):
        model = cls(cfg).get_model({}, device=torch.device("meta"))
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


@pytest.mark.parametrize("eraser_family,model_family", [("sd1", "sdxl"), ("sdxl", "sd1")])
def test_other_family_eraser_refused_in_comfyui(comfy, comfy_xl, eraser_family, model_family):
    """What Apply Eraser Stack calls in both modes (the batch path's weight patches, the per-row path)."""
    from conceptgate.adapters import reference_layout
    from conceptgate.nodes import comfy_glue

    model = meta_comfy_model(comfy, model_family)
    assert comfy_glue.unet_layout(model).family == model_family
    e = random_eraser(reference_layout(eraser_family), name=f"{eraser_family}_eraser")
    e.source = f"{eraser_family}_eraser.safetensors"
    stack = EraserStack().with_eraser(e)
    for apply in (lambda: comfy_glue.weight_patched(model, stack, torch.tensor([1.0])),
                  lambda: comfy_glue.row_gated(model, stack, comfy_xl["clip"])):
        with pytest.raises(IncompatibleModelError) as err:
            apply()
        assert e.source in str(err.value) and f"base family {eraser_family}, model is {model_family}" in str(err.value)


# ------------------------------------------------------------------ ComfyUI's executor

@pytest.fixture(scope="module")
def xl_eraser_dir(executor, layout, tmp_path_factory):
    import folder_paths
    from conceptgate.adapters import save_eraser
    from tiny_models import tiny_unet

    folder = tmp_path_factory.mktemp("conceptgate_sdxl")
    save_eraser(random_eraser(layout, concepts=["red triangle"], seed=21, scale=0.3, name="xl_tri"),
                folder / "xl_tri.safetensors")
    sd1 = random_eraser(layout_from_diffusers_config(tiny_unet().config), concepts=["red triangle"], name="sd1_tri")
    save_eraser(sd1, folder / "sd1_tri.safetensors")
    folder_paths.add_model_folder_path("conceptgate", str(folder), is_default=True)
    return folder


def xl_graph(prompt="a red triangle", erase=True, mode="per-row", eraser="xl_tri.safetensors"):
    from test_comfy_executor import graph

    g = graph(prompt=prompt, erase=erase, mode=mode, key="xl")
    g["ckpt"]["class_type"] = "CGTest_TinySDXLCheckpoint"
    if erase:
        g["load"]["inputs"]["eraser_name"] = eraser
    return g


@pytest.mark.parametrize("mode", ["per-row", "batch"])
def test_weight_eraser_in_the_executor_on_sdxl(executor, xl_eraser_dir, mode):
    """Apply Eraser Stack on the tiny SDXL checkpoint, stock KSampler: the target prompt changes, an
    unrelated one is bit-identical (gate 0), per row and in batch mode."""
    from test_comfy_executor import run as run_graph

    base, _ = run_graph(executor, xl_graph(erase=False))
    erased, outputs = run_graph(executor, xl_graph(mode=mode))
    assert (erased - base).abs().max() > 1e-2
    assert "xl_tri: gate 1.000" in outputs["apply"]["text"][0]
    unrelated_base, _ = run_graph(executor, xl_graph(prompt="a green square", erase=False))
    unrelated, outputs = run_graph(executor, xl_graph(prompt="a green square", mode=mode))
    assert "xl_tri: gate 0.000" in outputs["apply"]["text"][0]
    assert torch.equal(unrelated, unrelated_base)


def test_sd1_layout_eraser_refused_in_the_executor_on_sdxl(executor, xl_eraser_dir):
    """A tiny SD1.x-layout eraser on the tiny SDXL checkpoint stops the run with the file's name (both are
    'custom' families, so the modules are what differ)."""
    with pytest.raises(AssertionError, match="sd1_tri.safetensors.*not in this model"):
        executor.run(xl_graph(eraser="sd1_tri.safetensors"))

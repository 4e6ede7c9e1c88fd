"""Module names: one canonical space, exact converters, checked on full-size architectures."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from conceptgate.adapters.naming import (
    from_kohya, kohya_map, layout_from_diffusers_config, reference_layout, to_kohya,
)

SD15 = dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, layers_per_block=2)
SDXL = dict(block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
            transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
SD21 = dict(SD15, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)


def meta_unet(cfg):
    with torch.device("meta"):
        return UNet2DConditionModel(**cfg)


@pytest.mark.parametrize("family,cfg,n_transformer_blocks,n_spm,n_kv", [
    ("sd1", SD15, 16, 192, 32), ("sd2", SD21, 16, 192, 32), ("sdxl", SDXL, 70, 722, 140)])
def test_full_size_architecture_names_and_shapes(family, cfg, n_transformer_blocks, n_spm, n_kv):
    unet = meta_unet(cfg)
    layout = layout_from_diffusers_config(unet.config)
    assert layout.family == family
    assert layout.config == reference_layout(family).config
    assert sum(d for *_, d in layout.transformers) == n_transformer_blocks
    specs = layout.modules("spm")
    assert len(specs) == n_spm and len(layout.modules("attn2_kv")) == n_kv
    for spec in specs:
        module = unet.get_submodule(spec.name)  # every canonical name is a real diffusers module
        assert tuple(module.weight.shape) == spec.weight_shape, spec.name
        assert isinstance(module, torch.nn.Conv2d) == spec.is_conv


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_ldm_names_agree_with_comfyui(comfy, family):
    import comfy.utils

    layout = reference_layout(family)
    comfy_map = comfy.utils.unet_to_diffusers(dict(layout.config))
    ours = layout.to_ldm()
    assert ours, "empty map"
    for name, ldm in ours.items():
        assert comfy_map[name + ".weight"] == ldm + ".weight"
    # and nothing of SPM's target set in ComfyUI's map is missing from ours
    targets = {k[:-7] for k in comfy_map if k.endswith(".weight") and ".attentions." in k
               and (".proj_" in k or ".attn" in k or ".ff.net." in k)}
    assert targets == set(ours)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_kohya_round_trip_is_lossless(family):
    layout = reference_layout(family)
    exact = kohya_map(layout)
    for spec in layout.modules("spm"):
        diffusers_key = to_kohya(spec.name)
        ldm_key = "lora_unet_" + spec.ldm_name.replace(".", "_")
        assert from_kohya(diffusers_key) == spec.name  # grammar alone
        assert from_kohya(ldm_key) == spec.ldm_name
        assert exact[diffusers_key] == spec.name and exact[ldm_key] == spec.name


def test_comfyui_lora_key_map_covers_an_official_spm_layout(comfy):
    """ComfyUI's own LoRA key map (what stock LoraLoader uses) knows all 192 SD1.5 SPM keys."""
    import comfy.lora
    import comfy.supported_models

    cfg = dict(reference_layout("sd1").config, use_checkpoint=False, image_size=32, use_spatial_transformer=True,
               legacy=False, adm_in_channels=None, in_channels=4, out_channels=4, num_heads=8, num_head_channels=-1,
               use_temporal_attention=False, dtype=torch.float32)
    with torch.device("meta"):
        model = comfy.supported_models.SD15(cfg).get_model({}, device=torch.device("meta"))
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    for spec in reference_layout("sd1").modules("spm"):
        assert key_map[to_kohya(spec.name)] == f"diffusion_model.{spec.ldm_name}.weight"


def test_unparseable_kohya_key():
    with pytest.raises(KeyError):
        from_kohya("lora_te_text_model_encoder_layers_0_mlp_fc1")

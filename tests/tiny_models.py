"""Tiny, seeded, randomly initialised SD1.x-family models (diffusers) for fast tests."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

WIDTH = 64  # text width = cross-attention context width


def tiny_unet(seed: int = 0, linear_proj: bool = False) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=WIDTH, attention_head_dim=4, norm_num_groups=32, use_linear_projection=linear_proj,
    ).eval()


def tiny_text_encoder(seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=WIDTH, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    return CLIPTextModel(cfg).eval()


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=32, sample_size=32).eval()


# ------------------------------------------------------------------ SDXL family (issue 18)
# The SDXL layout in miniature: no attention at the highest resolution, deeper transformers lower down
# (depth 2 at level 1 and in the middle block), linear proj_in/out, the added "text_time" embedding
# (pooled text of the second encoder + 6 time ids, each embedded 256-wide as ComfyUI hard-codes), and two
# CLIP text encoders whose penultimate states are concatenated into the context (32 + 32 = 64).
XL_WIDTHS = (32, 32)  # CLIP-L-like, bigG-like (the latter with a square projection for the pooled embedding)
XL_CONTEXT = sum(XL_WIDTHS)
XL_TIME_DIM = 256


def tiny_sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), cross_attention_dim=XL_CONTEXT, attention_head_dim=(2, 4),
        norm_num_groups=32, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=XL_TIME_DIM, projection_class_embeddings_input_dim=XL_WIDTHS[1] + 6 * XL_TIME_DIM,
    ).eval()


def _xl_text_config(width: int, layers: int):
    return CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                          num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                          bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=width)


def tiny_sdxl_text_encoders(seed: int = 0):
    """(CLIPTextModel, CLIPTextModelWithProjection), 3 layers each (the penultimate one is the context)."""
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    te1 = CLIPTextModel(_xl_text_config(XL_WIDTHS[0], 3)).eval()
    te2 = CLIPTextModelWithProjection(_xl_text_config(XL_WIDTHS[1], 3)).eval()
    return te1, te2


def tiny_sdxl_pipeline(seed: int = 0):
    """A ``StableDiffusionXLPipeline`` of the tiny SDXL parts (the toy world's CLIP tokenizer for both;
    the second pads with "!" as SDXL's tokenizer_2 does)."""
    import os

    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    tok_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "toyworld", "data", "tokenizer")
    te1, te2 = tiny_sdxl_text_encoders(seed)
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(seed), text_encoder=te1, text_encoder_2=te2, tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
        tokenizer_2=CLIPTokenizer.from_pretrained(tok_dir, pad_token="!"), unet=tiny_sdxl_unet(seed),
        scheduler=EulerDiscreteScheduler(), force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe

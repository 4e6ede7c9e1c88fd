"""Diffusers SD1.x- and SDXL-family components -> ComfyUI MODEL / CLIP / VAE, with ComfyUI's own classes.

Used by the toy-model loader node (the embedded toy world is stored in diffusers layout) and by
the tests. The UNet's key conversion is ComfyUI's ``unet_to_diffusers`` map; the VAE goes through
ComfyUI's diffusers VAE converter; the text encoder is ComfyUI's own ``SDClipModel`` built with the
model's config.
"""

from __future__ import annotations

import functools

import torch

import comfy.latent_formats
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.sdxl_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.utils

from ..adapters.naming import layout_from_diffusers_config


def comfy_unet_config(diffusers_config) -> dict:
    """ComfyUI ``unet_config`` for a diffusers SD1.x-style ``UNet2DConditionModel`` config."""
    layout = layout_from_diffusers_config(diffusers_config)
    get = diffusers_config.get if isinstance(diffusers_config, dict) else (lambda k, d=None: getattr(diffusers_config, k, d))
    cfg = dict(layout.config)
    heads = get("attention_head_dim")
    heads = heads[0] if isinstance(heads, (list, tuple)) else heads
    cfg.update(
        use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False,
        adm_in_channels=None, in_channels=get("in_channels"), out_channels=get("out_channels"),
        # diffusers' SD1.x "attention_head_dim" is really the number of heads
        num_heads=int(heads), num_head_channels=-1, use_temporal_attention=False, use_temporal_resblock=False,
        dtype=torch.float32,
    )
    if cfg["transformer_depth_middle"] is None:
        cfg["transformer_depth_middle"] = -1
    if is_sdxl_config(diffusers_config):
        # SDXL: the added "text_time" embedding is ComfyUI's label_emb (pooled text + 6 time ids embedded
        # 256-wide, a width ComfyUI hard-codes), and heads are given by their width (constant across levels)
        if get("addition_time_embed_dim") != 256:
            raise ValueError("ComfyUI's SDXL embeds the time ids 256-wide; this UNet uses "
                             f"{get('addition_time_embed_dim')}")
        blocks = list(get("block_out_channels"))
        all_heads = get("num_attention_heads") or get("attention_head_dim")
        all_heads = list(all_heads) if isinstance(all_heads, (list, tuple)) else [all_heads] * len(blocks)
        widths = {c // h for c, h in zip(blocks, all_heads)}
        if len(widths) != 1:
            raise ValueError(f"attention heads of different widths per level ({sorted(widths)}): not ComfyUI's SDXL")
        cfg.update(adm_in_channels=int(get("projection_class_embeddings_input_dim")), num_classes="sequential",
                   num_heads=-1, num_head_channels=widths.pop())
    return cfg


def is_sdxl_config(diffusers_config) -> bool:
    """An SDXL-family UNet (the added text/time embedding), whatever its size."""
    get = diffusers_config.get if isinstance(diffusers_config, dict) else (lambda k, d=None: getattr(diffusers_config, k, d))
    return get("addition_embed_type") == "text_time"


def unet_to_comfy(unet, latent_scale: float | None = None, device=None):
    """A ComfyUI ``ModelPatcher`` holding a copy of the diffusers ``unet``'s weights."""
    cfg = comfy_unet_config(unet.config)
    sdxl = is_sdxl_config(unet.config)
    model_config = (comfy.supported_models.SDXL if sdxl else comfy.supported_models.SD15)(dict(cfg))
    # unet_extra_config forces SD1.5's 8 heads / SDXL's 64-wide heads; the model's own heads win
    model_config.unet_config.update(num_heads=cfg["num_heads"], num_head_channels=cfg["num_head_channels"])
    if latent_scale is not None:
        fmt = comfy.latent_formats.SDXL if sdxl else comfy.latent_formats.SD15
        model_config.latent_format = fmt(scale_factor=latent_scale)
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({}, device=torch.device("cpu"))
    mapping = comfy.utils.unet_to_diffusers(cfg)
    src = unet.state_dict()
    converted = {"diffusion_model." + mapping[k]: v.float() for k, v in src.items() if k in mapping}
    unmapped = [k for k in src if k not in mapping]
    if unmapped:
        raise ValueError(f"UNet keys ComfyUI's map does not cover, e.g. {unmapped[:3]}")
    missing, unexpected = base.load_state_dict(converted, strict=False)
    missing = [k for k in missing if k.startswith("diffusion_model.")]
    if missing:
        raise ValueError(f"ComfyUI UNet keys left unset: {missing[:3]}")
    load = device or comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(base, load_device=load, offload_device=comfy.model_management.unet_offload_device())


def text_encoder_to_comfy(text_encoder, tokenizer_dir: str | None = None, embedding_directory=None):
    """A ComfyUI ``CLIP`` with the weights of a transformers ``CLIPTextModel`` (any width)."""
    cfg = text_encoder.config.to_dict()
    width = int(cfg["hidden_size"])
    json_config = {k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                                        "hidden_act", "vocab_size", "max_position_embeddings", "eos_token_id",
                                        "bos_token_id", "layer_norm_eps", "projection_dim") if k in cfg}
    json_config["architectures"] = ["CLIPTextModel"]

    # ComfyUI only calls the tokenizer class, so a partial carries the embedding width
    tokenizer_cls = functools.partial(comfy.sd1_clip.SDTokenizer, tokenizer_path=tokenizer_dir, embedding_size=width)

    class Tokenizer(comfy.sd1_clip.SD1Tokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):
            super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data, tokenizer=tokenizer_cls)

    class ClipModel(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
            super().__init__(device=device, dtype=dtype, model_options=model_options,
                             clip_model=comfy.sd1_clip.SDClipModel, textmodel_json_config=json_config)

    target = comfy.supported_models_base.ClipTarget(Tokenizer, ClipModel)
    clip = comfy.sd.CLIP(target, embedding_directory=embedding_directory, model_options={"dtype": torch.float32})
    # transformers 4.x names keys "text_model.*", 5.x drops that prefix: accept both
    sd = {"clip_l.transformer.text_model." + k.removeprefix("text_model."): v.float()
          for k, v in text_encoder.state_dict().items()}
    missing, _ = clip.cond_stage_model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if "position_ids" not in k and "logit_scale" not in k and "text_projection" not in k]
    if missing:
        raise ValueError(f"CLIP keys left unset: {missing[:3]}")
    return clip


def _json_config(text_encoder) -> dict:
    cfg = text_encoder.config.to_dict()
    out = {k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                                "hidden_act", "vocab_size", "max_position_embeddings", "eos_token_id",
                                "bos_token_id", "layer_norm_eps", "projection_dim") if k in cfg}
    out["architectures"] = ["CLIPTextModel"]
    return out


def sdxl_text_encoders_to_comfy(text_encoder, text_encoder_2, tokenizer_dir: str | None = None, embedding_directory=None):
    """A ComfyUI SDXL ``CLIP`` (ComfyUI's ``SDXLClipModel`` / ``SDXLTokenizer`` with these encoders' sizes)
    from a ``CLIPTextModel`` (CLIP-L's place) and a ``CLIPTextModelWithProjection`` (bigG's place): both
    read at the penultimate layer, concatenated; the pooled output is the second's projected EoT state."""
    j1, j2 = _json_config(text_encoder), _json_config(text_encoder_2)
    if j2.get("projection_dim", j2["hidden_size"]) != j2["hidden_size"]:
        raise ValueError("ComfyUI's clip_g projection is square: projection_dim must equal hidden_size")
    w1, w2 = j1["hidden_size"], j2["hidden_size"]

    class Tokenizer(comfy.sdxl_clip.SDXLTokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):
            self.clip_l = comfy.sd1_clip.SDTokenizer(tokenizer_dir, embedding_directory=embedding_directory,
                                                     embedding_size=w1, embedding_key="clip_l", tokenizer_data=tokenizer_data)
            self.clip_g = comfy.sd1_clip.SDTokenizer(tokenizer_dir, pad_with_end=False, embedding_directory=embedding_directory,
                                                     embedding_size=w2, embedding_key="clip_g", tokenizer_data=tokenizer_data)

    class ClipModel(comfy.sdxl_clip.SDXLClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            torch.nn.Module.__init__(self)  # SDXLClipModel's own __init__ builds the full-size encoders
            self.clip_l = comfy.sd1_clip.SDClipModel(
                layer="hidden", layer_idx=-2, device=device, dtype=dtype, layer_norm_hidden_state=False,
                textmodel_json_config=dict(j1), model_options={**model_options, "model_name": "clip_l"})
            self.clip_g = comfy.sd1_clip.SDClipModel(
                layer="hidden", layer_idx=-2, device=device, dtype=dtype, layer_norm_hidden_state=False,
                textmodel_json_config=dict(j2), special_tokens={"start": 49406, "end": 49407, "pad": 0},
                return_projected_pooled=True, model_options={**model_options, "model_name": "clip_g"})
            self.dtypes = {dtype}

    target = comfy.supported_models_base.ClipTarget(Tokenizer, ClipModel)
    clip = comfy.sd.CLIP(target, embedding_directory=embedding_directory, model_options={"dtype": torch.float32})
    sd = {}
    for prefix, te in (("clip_l", text_encoder), ("clip_g", text_encoder_2)):
        for k, v in te.state_dict().items():
            if k == "text_projection.weight":
                sd[f"{prefix}.transformer.text_projection.weight"] = v.float()
            else:
                sd[f"{prefix}.transformer.text_model." + k.removeprefix("text_model.")] = v.float()
    missing, _ = clip.cond_stage_model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if "position_ids" not in k and "logit_scale" not in k
               and not k.startswith("clip_l.transformer.text_projection")]
    if missing:
        raise ValueError(f"CLIP keys left unset: {missing[:3]}")
    return clip


def vae_to_comfy(vae):
    """A ComfyUI ``VAE`` from a diffusers ``AutoencoderKL`` of any depth / width."""
    cfg = vae.config
    blocks = list(cfg.block_out_channels)
    ddconfig = {
        "double_z": True, "z_channels": cfg.latent_channels, "resolution": cfg.sample_size, "in_channels": cfg.in_channels,
        "out_ch": cfg.out_channels, "ch": blocks[0], "ch_mult": [b // blocks[0] for b in blocks],
        "num_res_blocks": cfg.layers_per_block, "attn_resolutions": [], "dropout": 0.0,
    }
    sd = {k: v.float() for k, v in vae.state_dict().items()}
    from comfy import diffusers_convert

    sd = diffusers_convert.convert_vae_state_dict(sd)
    # ComfyUI's converter numbers decoder levels as if there were always 4 (SD's VAE): shift them
    shift = 4 - len(blocks)
    if shift:
        fixed = {}
        for k, v in sd.items():
            if k.startswith("decoder.up."):
                level, rest = k[len("decoder.up."):].split(".", 1)
                k = f"decoder.up.{int(level) - shift}.{rest}"
            fixed[k] = v
        sd = fixed
    out = comfy.sd.VAE(sd=sd, config={"params": {"embed_dim": cfg.latent_channels, "ddconfig": ddconfig}})
    factor = 2 ** (len(blocks) - 1)
    out.downscale_ratio = out.upscale_ratio = factor
    out.latent_channels = cfg.latent_channels
    return out

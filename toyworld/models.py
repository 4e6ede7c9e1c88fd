"""Architectures of the toy world: SD1.x-family text encoder, VAE and UNet (diffusers/transformers
classes, so every host code path runs unchanged), the mini-CLIP image tower and the judges."""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from .render import COLOURS, OBJECTS, STYLES

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER_DIR = os.path.join(HERE, "data", "tokenizer")

BOS_ID, EOS_ID, PAD_ID = 49406, 49407, 49407

# Architecture hyper-parameters (part of the training config written to MANIFEST.json).
ARCH = {
    "text_hidden": 128,
    "text_layers": 4,
    "text_heads": 4,
    "vae_channels": [32, 64, 128],
    "unet_channels": [64, 128, 256],
    "unet_layers_per_block": 1,
    "unet_heads": 4,
    "image_tower_width": 24,
    "judge_width": 16,
}


def load_tokenizer(path: str = TOKENIZER_DIR):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(path)


def make_text_encoder(arch=ARCH):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=arch["text_hidden"],
        intermediate_size=4 * arch["text_hidden"],
        projection_dim=arch["text_hidden"],
        num_hidden_layers=arch["text_layers"],
        num_attention_heads=arch["text_heads"],
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    return CLIPTextModel(cfg)


def make_vae(arch=ARCH):
    from diffusers import AutoencoderKL

    ch = list(arch["vae_channels"])
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(ch),
        up_block_types=("UpDecoderBlock2D",) * len(ch),
        block_out_channels=tuple(ch),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=1.0,  # set from data after training
    )


def make_unet(arch=ARCH):
    from diffusers import UNet2DConditionModel

    ch = tuple(arch["unet_channels"])
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=ch,
        layers_per_block=arch["unet_layers_per_block"],
        cross_attention_dim=arch["text_hidden"],
        attention_head_dim=arch["unet_heads"],  # diffusers' SD1.x naming: this is the number of heads
        use_linear_projection=False,
        norm_num_groups=32,
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def comfy_unet_config(arch=ARCH) -> dict:
    """The ComfyUI (0.3.x) SD1.x-family ``unet_config`` equivalent to :func:`make_unet`.

    Use as ``comfy.supported_models.SD15(unet_config)`` (then ``get_model``), with the diffusers
    weights converted by ``comfy.utils.unet_to_diffusers(unet_config)`` key map.  Levels 0 and 1
    have one transformer per res block, level 2 none, the middle block one.
    ``transformer_depth_output`` follows ComfyUI's convention (it is popped from the end, so the
    list runs from the highest-resolution output block back to the lowest)."""
    ch = list(arch["unet_channels"])
    base = ch[0]
    assert all(c % base == 0 for c in ch), "channel_mult must be integer"
    nrb = arch["unet_layers_per_block"]
    levels = len(ch)
    has_attn = [True, True, False]
    depth = []
    for lvl in range(levels):
        depth += [1 if has_attn[lvl] else 0] * nrb
    depth_out_natural = []  # output_blocks in natural order: lowest resolution first
    for lvl in reversed(range(levels)):
        depth_out_natural += [1 if has_attn[lvl] else 0] * (nrb + 1)
    return {
        "use_checkpoint": False,
        "image_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": base,
        "num_res_blocks": [nrb] * levels,
        "channel_mult": [c // base for c in ch],
        "transformer_depth": depth,
        "transformer_depth_middle": 1,
        "transformer_depth_output": list(reversed(depth_out_natural)),
        "context_dim": arch["text_hidden"],
        "num_heads": arch["unet_heads"],
        "num_head_channels": -1,
        "use_linear_in_transformer": False,
        "use_spatial_transformer": True,
        "legacy": False,
        "adm_in_channels": None,
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
    }


def make_scheduler(kind: str = "ddim"):
    from diffusers import DDIMScheduler, DDPMScheduler

    kw = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
    )
    if kind == "ddpm":
        return DDPMScheduler(**kw)
    return DDIMScheduler(set_alpha_to_one=False, steps_offset=1, **kw)


# ----------------------------------------------------------------------------- small conv towers


def _block(cin, cout, stride):
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.SiLU(),
        nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.SiLU(),
    )


class ConvTower(nn.Module):
    """64x64 RGB in [0,1] -> feature vector (avg and max pooled, so small glyphs survive)."""

    def __init__(self, width=32):
        super().__init__()
        w = width
        # the first convolution works at full resolution (small glyphs, 4-px stripes), then 32x32
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.SiLU())
        self.body = nn.Sequential(_block(w, w, 2), _block(w, 2 * w, 2), _block(2 * w, 4 * w, 2), _block(4 * w, 6 * w, 2))
        self.out_dim = 12 * w

    def forward(self, x):
        h = self.body(self.stem((x - 0.5) / 0.25))
        return torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)


class ImageTower(nn.Module):
    """Mini-CLIP image tower: images -> unit-norm embedding in the text encoder's projection space."""

    def __init__(self, width=32, dim=128):
        super().__init__()
        self.tower = ConvTower(width)
        self.proj = nn.Linear(self.tower.out_dim, dim)

    def forward(self, x):
        return F.normalize(self.proj(self.tower(x)), dim=-1)


class TextHead(nn.Module):
    """Mini-CLIP text projection on the CLIPTextModel pooled (EOS) output, plus the temperature."""

    def __init__(self, hidden=128, dim=128):
        super().__init__()
        self.proj = nn.Linear(hidden, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(2.659))  # log(1/0.07)

    def forward(self, pooled):
        return F.normalize(self.proj(pooled), dim=-1)


# Judge heads: each has an explicit last class "none" (garbage / unrecognisable).
JUDGE_HEADS = {
    "object": OBJECTS + ["none"],
    "style": STYLES + ["none"],
    "colour": COLOURS + ["none"],
    "watermark": ["absent", "present", "none"],
}


class Judge(nn.Module):
    """One classifier per attribute (separate towers, so the judges do not share features)."""

    def __init__(self, width=32):
        super().__init__()
        self.towers = nn.ModuleDict({k: ConvTower(width) for k in JUDGE_HEADS})
        self.heads = nn.ModuleDict({k: nn.Linear(self.towers[k].out_dim, len(v)) for k, v in JUDGE_HEADS.items()})

    def features(self, x):
        return {k: t(x) for k, t in self.towers.items()}

    def forward(self, x):
        f = self.features(x)
        return {k: self.heads[k](f[k]) for k in JUDGE_HEADS}

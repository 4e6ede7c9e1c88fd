"""The toy world: a miniature Stable-Diffusion stack trained from scratch on procedural renders,
with independent judges.  See ``conceptgate.toyworld.train`` for the training recipe.

Core API::

    from conceptgate import toyworld as tw
    pipe = tw.load_pipeline()              # diffusers StableDiffusionPipeline (offline, committed weights)
    judge = tw.load_judges()               # learned judges (object/style/colour/watermark, with "none")
    imgs = tw.generate(pipe, ["a red star in striped style"], [0])   # (n,3,64,64) in [0,1]
"""

from __future__ import annotations

import os

import torch

from .models import ARCH, comfy_unet_config  # noqa: F401

HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS_DIR = os.path.join(HERE, "weights")


def load_pipeline(path: str | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """The toy-world ``StableDiffusionPipeline``, loaded offline from the committed folder."""
    from diffusers import StableDiffusionPipeline

    path = path or WEIGHTS_DIR
    pipe = StableDiffusionPipeline.from_pretrained(
        path, safety_checker=None, requires_safety_checker=False, torch_dtype=dtype, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_judges(path: str | None = None, device: str = "cpu"):
    """The learned judges (a :class:`~.models.Judge`, eval mode)."""
    from safetensors.torch import load_file

    from .models import Judge

    path = path or WEIGHTS_DIR
    j = Judge(ARCH["judge_width"])
    j.load_state_dict(load_file(os.path.join(path, "judges.safetensors")))
    return j.to(device).eval()


def load_clip_judge(path: str | None = None, device: str = "cpu"):
    """The mini-CLIP image tower and text head (a CLIP-score stand-in): returns (tower, head)."""
    from safetensors.torch import load_file

    from .models import ImageTower, TextHead

    path = path or WEIGHTS_DIR
    sd = load_file(os.path.join(path, "clip_judge.safetensors"))
    tower = ImageTower(ARCH["image_tower_width"], ARCH["text_hidden"])
    head = TextHead(ARCH["text_hidden"], ARCH["text_hidden"])
    tower.load_state_dict({k[6:]: v for k, v in sd.items() if k.startswith("tower.")})
    head.load_state_dict({k[5:]: v for k, v in sd.items() if k.startswith("head.")})
    return tower.to(device).eval(), head.to(device).eval()


@torch.no_grad()
def clip_score(pipe, tower, head, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Cosine similarity between mini-CLIP image and text embeddings (one per image/prompt pair)."""
    dev = next(tower.parameters()).device
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    te = pipe.text_encoder
    pooled = te(input_ids=ids.to(te.device)).pooler_output.float().to(dev)
    return (head(pooled) * tower(images.to(dev).float())).sum(-1).cpu()


def generate(pipe, prompts, seeds, steps: int = 25, cfg: float = 5.0, negative_prompt=None) -> torch.Tensor:
    """Generate one 64x64 image per prompt (seed i for prompt i): a float tensor (n,3,64,64) in [0,1].

    Plain ``pipe(...)`` call with one CPU generator per seed (so results do not depend on the
    batch), the pipeline's own scheduler (DDIM) and CFG.  Hooks on ``pipe.unet`` apply."""
    if isinstance(prompts, str):
        prompts = [prompts]
    seeds = list(seeds)
    assert len(seeds) == len(prompts), "one seed per prompt"
    if isinstance(negative_prompt, str):
        negative_prompt = [negative_prompt] * len(prompts)
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    # draw latents on the CPU (device independent), then move them
    unet = pipe.unet
    shape = (4, unet.config.sample_size, unet.config.sample_size)
    latents = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(pipe.device, unet.dtype)
    out = pipe(
        prompt=list(prompts), negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=cfg,
        latents=latents, output_type="pt", height=64, width=64,
    )
    return out.images.float().cpu().clamp(0, 1)


def _register_with_core() -> None:
    # the toy world offers its caption templates to the trainers ("--context toy")
    from ..adapters.registry import register_prompt_context
    from .contexts import abo_prompt_pairs

    register_prompt_context("toy", abo_prompt_pairs)


_register_with_core()

"""The embedded toy model as a ComfyUI checkpoint loader (MODEL, CLIP, VAE for the stock nodes)."""

from __future__ import annotations

import os

from comfy_api.latest import io

from .v3 import CATEGORY

_LOADED: dict = {}


def load_toy_for_comfy(path: str | None = None):
    """(MODEL, CLIP, VAE) of the toy world, converted with ComfyUI's own classes (cached)."""
    from ..toyworld import WEIGHTS_DIR
    from . import comfy_models

    path = os.path.abspath(path or WEIGHTS_DIR)
    key = (path, os.path.getmtime(os.path.join(path, "unet", "diffusion_pytorch_model.safetensors")))
    if key not in _LOADED:
        try:
            from diffusers import AutoencoderKL, UNet2DConditionModel
            from transformers import CLIPTextModel
        except ImportError as e:  # pragma: no cover - ComfyUI envs without diffusers
            raise RuntimeError("the toy model loader needs the 'diffusers' package (pip install diffusers)") from e
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True).float()
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True).float()
        te = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True).float()
        _LOADED.clear()
        _LOADED[key] = (
            comfy_models.unet_to_comfy(unet, latent_scale=float(vae.config.scaling_factor)),
            comfy_models.text_encoder_to_comfy(te, tokenizer_dir=os.path.join(path, "tokenizer"),
                                               embedding_directory=_embedding_dirs()),
            comfy_models.vae_to_comfy(vae),
        )
    return _LOADED[key]


def _embedding_dirs():
    """ComfyUI's own list of embedding folders (the live list, so folders added later are searched too),
    as the stock checkpoint loader passes it: ``embedding:NAME`` works with the toy CLIP."""
    try:
        import folder_paths

        return folder_paths.folder_names_and_paths["embeddings"][0]
    except (ImportError, KeyError):
        return None


class ToyModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptGateToyModelLoader",
            display_name="Load Toy Model (ConceptGate)",
            category=CATEGORY,
            description=("Loads ConceptGate's embedded toy world: a tiny, honestly trained Stable-Diffusion-architecture "
                         "model (64x64 images of 8 shapes x 6 styles x 6 colours, with an uncaptioned watermark). Use it "
                         "to try erasers in seconds on a CPU. Its VAE downsamples by 4: an Empty Latent Image of 128x128 "
                         "gives 64x64 images."),
            inputs=[],
            outputs=[
                io.Model.Output("model", display_name="MODEL", tooltip="The toy UNet (SD1.x family, 16x16x4 latents)."),
                io.Clip.Output("clip", display_name="CLIP", tooltip="The toy text encoder (CLIP BPE tokenizer, 128 "
                               "wide): use with the stock CLIP Text Encode."),
                io.Vae.Output("vae", display_name="VAE", tooltip="The toy VAE (64x64 images <-> 16x16x4 latents)."),
            ],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(*load_toy_for_comfy())


NODES = [ToyModelLoader]

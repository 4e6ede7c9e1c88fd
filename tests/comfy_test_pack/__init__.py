"""A test-only ComfyUI node pack (the pattern of ComfyUI's own tests/execution/testing_nodes).

It provides what a real install gets from checkpoints on disk: a tiny SD1.x-family MODEL, CLIP
and VAE (and a tiny SDXL-family one) built in-process with seeded random weights, and a node that hands the sampled latent
back to the test.
"""

import sys
import os

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))  # realpath: also when linked into custom_nodes/

import tiny_models  # noqa: E402

CAPTURED: dict = {}
_MODELS: dict = {}


def tiny_checkpoint(seed: int):
    if seed not in _MODELS:
        from conceptgate.nodes import comfy_models

        _MODELS[seed] = (
            comfy_models.unet_to_comfy(tiny_models.tiny_unet(seed)),
            comfy_models.text_encoder_to_comfy(tiny_models.tiny_text_encoder(seed)),
            comfy_models.vae_to_comfy(tiny_models.tiny_vae(seed)),
        )
    return _MODELS[seed]


class TinyCheckpoint:
    CATEGORY = "ConceptGateTests"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0})}}

    def load(self, seed):
        return tiny_checkpoint(seed)


_XL_MODELS: dict = {}


def tiny_sdxl_checkpoint(seed: int):
    """The tiny SDXL-architecture model (tiny_models.tiny_sdxl_pipeline) in ComfyUI's own SDXL classes."""
    if seed not in _XL_MODELS:
        from conceptgate.nodes import comfy_models

        pipe = tiny_models.tiny_sdxl_pipeline(seed)
        _XL_MODELS[seed] = (
            comfy_models.unet_to_comfy(pipe.unet),
            comfy_models.sdxl_text_encoders_to_comfy(pipe.text_encoder, pipe.text_encoder_2),
            comfy_models.vae_to_comfy(pipe.vae),
        )
    return _XL_MODELS[seed]


class TinySDXLCheckpoint(TinyCheckpoint):
    def load(self, seed):
        return tiny_sdxl_checkpoint(seed)


class CaptureLatent:
    CATEGORY = "ConceptGateTests"
    FUNCTION = "capture"
    OUTPUT_NODE = True
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "key": ("STRING", {"default": "out"})}}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")  # always run, so every test sees its own result

    def capture(self, samples, key):
        CAPTURED[key] = samples["samples"].clone()
        return {}


class CaptureImage(CaptureLatent):
    FUNCTION = "capture_image"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "key": ("STRING", {"default": "out"})}}

    def capture_image(self, images, key):
        CAPTURED[key] = images.clone()
        return {}


NODE_CLASS_MAPPINGS = {"CGTest_TinyCheckpoint": TinyCheckpoint, "CGTest_TinySDXLCheckpoint": TinySDXLCheckpoint,
                       "CGTest_CaptureLatent": CaptureLatent,
                       "CGTest_CaptureImage": CaptureImage}

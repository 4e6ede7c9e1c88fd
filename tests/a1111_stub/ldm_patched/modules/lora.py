"""Stand-in for old Forge ldm_patched/modules/lora.py (a ComfyUI copy): load_lora returns the patch dict."""
import comfy.lora


def load_lora(lora, to_load):
    return comfy.lora.load_lora(lora, to_load, log_missing=False)


def model_lora_keys_unet(model, key_map={}):
    return comfy.lora.model_lora_keys_unet(model, key_map)

"""Stand-in for Forge HEAD backend/patcher/lora.py: load_lora returns (patches, remaining); the key
map and patch format are ComfyUI's (delegated to the real comfy.lora)."""
import comfy.lora


def load_lora(lora, to_load):
    patch_dict = comfy.lora.load_lora(lora, to_load, log_missing=False)
    used = set(to_load)
    remaining = {k: v for k, v in lora.items() if k.split(".")[0] not in used}
    return patch_dict, remaining


def model_lora_keys_unet(model, key_map={}):
    return comfy.lora.model_lora_keys_unet(model, key_map)

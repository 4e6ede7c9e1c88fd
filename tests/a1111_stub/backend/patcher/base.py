"""Stand-in for Forge HEAD backend/patcher/base.py::ModelPatcher (the patch bookkeeping only)."""
import copy


class LoraLoaderStub:
    """backend/patcher/lora.py::LoraLoader.refresh's skip rule: re-merge only when the keys changed."""

    def __init__(self):
        self.loaded_hash = str([])
        self.merges = 0

    def refresh(self, lora_patches):
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash:
            return False
        self.loaded_hash = hashes
        self.merges += 1
        return True


class ModelPatcher:
    def __init__(self, model, load_device=None, offload_device=None, size=0, current_device=None):
        self.model = model
        self.load_device, self.offload_device, self.size, self.current_device = load_device, offload_device, size, current_device
        self.lora_patches = {}
        self.object_patches = {}
        self.model_options = {"transformer_options": {}}
        if not hasattr(model, "lora_loader"):
            model.lora_loader = LoraLoaderStub()

    def clone(self):
        n = ModelPatcher(self.model, self.load_device, self.offload_device, self.size, self.current_device)
        n.lora_patches = self.lora_patches.copy()
        n.object_patches = self.object_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        return n

    def add_patches(self, *, filename, patches, strength_patch=1.0, strength_model=1.0, online_mode=False):
        lora_identifier = (filename, strength_patch, strength_model, online_mode)
        this_patches = {}
        p = set()
        model_keys = {k for k, _ in self.model.named_parameters()}
        for k in patches:
            if k in model_keys:
                p.add(k)
                this_patches.setdefault(k, []).append([strength_patch, patches[k], strength_model, None, None])
        self.lora_patches[lora_identifier] = this_patches
        return p

    def refresh_loras(self):
        return self.model.lora_loader.refresh(self.lora_patches)

    # the sampling hooks the glue uses (model_options, as the host keeps them)
    def set_model_sampler_post_cfg_function(self, post_cfg_function, disable_cfg1_optimization=False):
        self.model_options["sampler_post_cfg_function"] = self.model_options.get("sampler_post_cfg_function", []) + [post_cfg_function]
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True

    def set_model_unet_function_wrapper(self, unet_wrapper_function):
        self.model_options["model_function_wrapper"] = unet_wrapper_function

    def add_conditioning_modifier(self, modifier, ensure_uniqueness=False):  # UnetPatcher (both Forge lines)
        self.model_options.setdefault("conditioning_modifiers", []).append(modifier)

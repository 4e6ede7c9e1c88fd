"""Stand-in for old Forge ldm_patched/modules/model_patcher.py::ModelPatcher (ComfyUI's positional API)."""
import copy


class ModelPatcher:
    def __init__(self, model, load_device=None, offload_device=None, size=0, current_device=None, weight_inplace_update=False):
        self.model = model
        self.patches = {}
        self.object_patches = {}
        self.model_options = {"transformer_options": {}}

    def clone(self):
        n = ModelPatcher(self.model)
        n.patches = {k: v[:] for k, v in self.patches.items()}
        n.object_patches = self.object_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        return n

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        p = set()
        keys = {k for k, _ in self.model.named_parameters()}
        for k in patches:
            if k in keys:
                p.add(k)
                self.patches.setdefault(k, []).append((strength_patch, patches[k], strength_model))
        return list(p)

    # the sampling hooks the glue uses (model_options, as the host keeps them)
    def set_model_sampler_post_cfg_function(self, post_cfg_function, disable_cfg1_optimization=False):
        self.model_options["sampler_post_cfg_function"] = self.model_options.get("sampler_post_cfg_function", []) + [post_cfg_function]
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True

    def set_model_unet_function_wrapper(self, unet_wrapper_function):
        self.model_options["model_function_wrapper"] = unet_wrapper_function

    def add_conditioning_modifier(self, modifier, ensure_uniqueness=False):  # UnetPatcher (both Forge lines)
        self.model_options.setdefault("conditioning_modifiers", []).append(modifier)

"""The Forge glue (current `backend` line and old `ldm_patched` line) against the host stand-in.

Checks: host detection; patches added in process_before_every_sampling on a clone of
forge_objects.unet (the original keeps none), with the host's own LoRA loader; the merged weight
equals W + m * delta at the ComfyUI path's gate; patch filenames (the identifier Forge compares
before re-merging) change exactly when the gate or the file changes; hires pass patched again.
"""

import copy
import sys

import pytest
import torch

import a1111_stub
from conceptgate.adapters import EraserStack, GateSettings, dense_deltas
from test_a1111_webui import loaded, world  # noqa: F401  (module fixture)


class ForgeHost:
    def __init__(self, world, processing, legacy=False):
        from a1111_stub.models import ForgeModel

        kind = "forge-legacy" if legacy else "forge"
        patcher_mod = sys.modules["ldm_patched.modules.model_patcher" if legacy else "backend.patcher.base"]
        self.shared = sys.modules["modules.shared"]
        self.shared.models_path = world["models"]
        self.processing = processing
        self.entry = a1111_stub.load_entry_script()
        sys.modules["modules.extra_networks"].initialize()
        sys.modules["modules.script_callbacks"].before_ui_callback()
        self.script = self.entry.ConceptGateScript()
        self.script.args_from, self.script.args_to = 0, 6
        self.base = copy.deepcopy(world["model"].model)  # comfy BaseModel: .diffusion_model + model_config
        self.unet = patcher_mod.ModelPatcher(self.base)
        self.sd_model = ForgeModel(self.unet, world["te"], world["tok"], legacy=legacy)
        self.shared.sd_model = self.sd_model
        self.kind = kind

    def run(self, prompt, args, **kw):
        from modules.scripts import ScriptRunnerStub

        p = self.processing.StableDiffusionProcessing(prompt, sd_model=self.sd_model, scripts=ScriptRunnerStub([self.script], forge=True),
                                                      script_args=args, **kw)
        return p, self.processing.process_images(p)


@pytest.fixture(params=["forge", "forge-legacy"])
def forge(world, request):
    with a1111_stub.installed(request.param) as processing:
        yield ForgeHost(world, processing, legacy=request.param == "forge-legacy")


def merged_weights(patcher, key, weight):
    import comfy.lora

    if hasattr(patcher, "lora_patches"):  # Forge HEAD: identifier -> {key: [patch, ...]}
        patches = [tuple(pp) for per in patcher.lora_patches.values() for pp in per.get(key, [])]
    else:
        patches = patcher.patches.get(key, [])  # old Forge: (strength_patch, patch, strength_model)
    patches = [tuple(pp) + (None,) * (5 - len(pp)) for pp in patches]
    return comfy.lora.calculate_weight(patches, weight.clone().float(), key)


def comfy_coeff(world, stack, prompt):
    from conceptgate.nodes import comfy_glue
    from conceptgate.nodes.nodes_conceptgate import TextEncode

    (cond,) = TextEncode.execute(text=prompt, clip=world["clip"]).result
    return comfy_glue.gates_for_conditioning(stack, world["clip"], cond)[0]


def test_host_detection(forge):
    from conceptgate.extension import host

    assert host.HOST == forge.kind and host.is_forge()


@pytest.mark.parametrize("combine", ["additive", "official"])
def test_patches_equal_hand_merge_at_the_comfyui_gate(forge, world, combine):
    before = {k: v.clone() for k, v in forge.base.state_dict().items()}
    p, _ = forge.run("a red triangle AND a green square", [True, "tri:1, circ:0.6", "None", combine, "ft", False])
    (unet,) = p.sampled_unets
    assert unet is not forge.unet  # a clone; the original patcher keeps no patches
    assert not getattr(forge.unet, "lora_patches", None) and not getattr(forge.unet, "patches", None)
    tri, circ = loaded(world, "tri", "circ")
    ft = GateSettings(rule="ft")  # the rule the webui run above was given
    stack = EraserStack(combine=combine).with_eraser(tri, gate=ft).with_eraser(circ, strength=0.6, gate=ft)
    # the batch coefficient: per eraser, the strongest gate over the AND parts (ComfyUI gates each part)
    parts = [comfy_coeff(world, stack, t) for t in ("a red triangle", "a green square")]
    want = torch.where(parts[0].abs() >= parts[1].abs(), parts[0], parts[1])
    assert torch.allclose(torch.tensor([r["gate"] * s for r, s in zip(p.conceptgate.report.rows, (1, 0.6))]), parts[0], atol=1e-5)
    deltas = dense_deltas(stack, want)
    from conceptgate.extension import ldm

    _, names = ldm.module_map(forge.base.diffusion_model)
    for canon in ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", "up_blocks.1.attentions.1.proj_in",
                  "mid_block.attentions.0.transformer_blocks.0.ff.net.2"):
        key = f"diffusion_model.{names[canon]}.weight"
        w = forge.base.get_parameter(key).detach()
        got = merged_weights(unet, key, w)
        assert (got - (w + deltas[canon])).abs().max() < 1e-5, canon
    assert all(torch.equal(before[k], v) for k, v in forge.base.state_dict().items())  # nothing merged in place
    assert "ConceptGate" in p.extra_generation_params


def test_filenames_change_with_the_gate(world):
    with a1111_stub.installed("forge") as processing:
        f = ForgeHost(world, processing)
        args = [True, "tri:1", "None", "additive", "ft", False]
        keys, merges = [], []
        for prompt in ("a red triangle", "a green square", "a red triangle", "a red triangle"):
            p, _ = f.run(prompt, args)
            unet = p.sampled_unets[0]
            keys.append(list(unet.lora_patches))
            merges.append(unet.refresh_loras())
        (a,), (b,), (c,), (d,) = keys
        assert a[0] != b[0] and a[0].startswith("conceptgate:tri:")  # gate changed -> filename changed
        assert a == c == d  # same file, same gate -> same identifier
        assert merges == [True, True, True, False]  # Forge re-merges only when the identifier list changes
        p, _ = f.run("a red triangle", [True, "tri:0.5", "None", "additive", "ft", False])
        assert list(p.sampled_unets[0].lora_patches)[0] != a[0]  # strength is part of the coefficient


def test_hires_pass_is_patched_again_with_its_own_prompt(world):
    with a1111_stub.installed("forge") as processing:
        f = ForgeHost(world, processing)
        p, _ = f.run(["a green square"], [True, "tri:1", "None", "additive", "ft", False], enable_hr=True,
                     hr_prompt=["a red triangle"])
        first, hires = p.sampled_unets
        assert first is not hires and list(first.lora_patches) != list(hires.lora_patches)
        tri = loaded(world, "tri")[0]
        m = float(comfy_coeff(world, EraserStack().with_eraser(tri), "a red triangle")[0])
        ((_, strength, _, _),) = hires.lora_patches
        assert abs(strength - m) < 1e-5


def test_no_erasers_no_patches(forge):
    p, _ = forge.run("a red triangle <lora:x:1>", [False, "", "None", "additive", "ft", False])
    (unet,) = p.sampled_unets
    assert unet is forge.unet and "ConceptGate" not in p.extra_generation_params

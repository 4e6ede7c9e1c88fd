"""LoRA files in peft's layout (what peft's ``get_peft_model_state_dict`` and diffusers' ``save_lora_weights``
write) load as erasers (issue 15): the same function as the peft-injected model, with the scale from the
LoraConfig diffusers stores (``lora_alpha``, ``alpha_pattern``, rsLoRA), and clear refusals."""

import json

import pytest
import torch
from safetensors.torch import save_file

from conceptgate.adapters import EraserStack, RowGatedDeltas
from conceptgate.adapters.errors import EraserFileError
from conceptgate.adapters.files import load_eraser
from tiny_models import tiny_unet

peft = pytest.importorskip("peft")
PATTERN = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"


def _peft_lora(config):
    """A tiny UNet with peft's LoRA injected (random lora_B), its state dict, and the frozen UNet."""
    from peft import get_peft_model_state_dict, inject_adapter_in_model

    base = tiny_unet()
    lora = tiny_unet()
    inject_adapter_in_model(config, lora)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return base, lora, get_peft_model_state_dict(lora)


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=g), torch.full((2,), 400), torch.randn(2, 77, 64, generator=g)


def _through_eraser(path, base):
    e = load_eraser(path, concepts=["star"])
    x, t, ctx = _inputs()
    with torch.no_grad(), RowGatedDeltas(EraserStack().with_eraser(e), base.get_submodule) as hooks:
        with hooks.coefficients(torch.tensor([[1.0], [1.0]])):
            return e, base(x, t, ctx).sample


@pytest.mark.parametrize("rslora", [False, True])
def test_a_diffusers_saved_peft_lora_is_the_same_function(tmp_path, rslora):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    config = LoraConfig(r=2, lora_alpha=4, target_modules=["to_k", "to_v"], alpha_pattern={PATTERN: 8},
                        use_rslora=rslora)
    base, lora, state = _peft_lora(config)
    StableDiffusionPipeline.save_lora_weights(str(tmp_path), unet_lora_layers=state,
                                              unet_lora_adapter_metadata=config.to_dict())
    x, t, ctx = _inputs()
    with torch.no_grad():
        want, plain = lora(x, t, ctx).sample, base(x, t, ctx).sample
    e, got = _through_eraser(tmp_path / "pytorch_lora_weights.safetensors", base)
    assert e.method == "lora" and len(e.modules) == 28 and e.rank == 2
    assert (want - plain).abs().max() > 1e-3
    assert (got - want).abs().max() < 1e-5
    scale = 1 / (2 ** 0.5) if rslora else 1 / 2
    assert e.modules[PATTERN].scale == pytest.approx(8 * scale)
    other = next(n for n in e.modules if n != PATTERN)
    assert e.modules[other].scale == pytest.approx(4 * scale)


def test_without_metadata_the_scale_is_one(tmp_path):
    """A bare peft state dict (no LoraConfig stored) loads at scale 1, as diffusers loads it."""
    from peft import LoraConfig

    base, lora, state = _peft_lora(LoraConfig(r=2, lora_alpha=2, target_modules=["to_k"]))
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "bare.safetensors"))
    x, t, ctx = _inputs()
    with torch.no_grad():
        want = lora(x, t, ctx).sample
    e, got = _through_eraser(tmp_path / "bare.safetensors", base)
    assert all(d.scale == pytest.approx(1.0) for d in e.modules.values())
    assert (got - want).abs().max() < 1e-5


@pytest.mark.parametrize("extra, message", [
    ({"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 8)}, "text-encoder"),
    ({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_magnitude_vector": torch.ones(64)}, "DoRA"),
])
def test_what_a_peft_lora_cannot_be_is_refused_naming_the_file(tmp_path, extra, message):
    from peft import LoraConfig

    _, _, state = _peft_lora(LoraConfig(r=2, lora_alpha=2, target_modules=["to_k"]))
    path = tmp_path / "odd.safetensors"
    save_file({**{k: v.contiguous() for k, v in state.items()}, **extra}, str(path))
    with pytest.raises(EraserFileError, match=message) as info:
        load_eraser(path, concepts=["star"])
    assert "odd.safetensors" in str(info.value)


def test_broken_peft_metadata_is_refused(tmp_path):
    from peft import LoraConfig

    _, _, state = _peft_lora(LoraConfig(r=2, lora_alpha=2, target_modules=["to_k"]))
    path = tmp_path / "meta.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"lora_adapter_metadata": "{oops"})
    with pytest.raises(EraserFileError, match="not JSON"):
        load_eraser(path, concepts=["star"])
    save_file({k: v.contiguous() for k, v in state.items()}, str(path),
              metadata={"lora_adapter_metadata": json.dumps({"unet.use_dora": True, "unet.lora_alpha": 2})})
    with pytest.raises(EraserFileError, match="DoRA"):
        load_eraser(path, concepts=["star"])

"""The trainers' two LoRA backends (issue 15): peft's LoRA layers on a weight-sharing view of the UNet
(the default) and ConceptGate's forward hooks compute the same function, train to the same factors, and
neither leaves anything in the user's UNet."""

import pytest
import torch

from conceptgate.adapters.abo.adapter import ABOConfig, ABOTrainer
from conceptgate.adapters.spm import LatentAnchoringTrainer, Membranes, SPMConfig
from conceptgate.adapters.spm.membranes import spm_module_names
from test_spm_training import SCHEDULER, TOKENIZER, inputs, randomise_up
from tiny_models import tiny_text_encoder, tiny_unet

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(TOKENIZER)


def _pair(unet, rank=1):
    names = spm_module_names(unet)
    hooks = Membranes(unet, names, rank=rank, generator=torch.Generator().manual_seed(0))
    randomise_up(hooks)
    peft = Membranes(unet, names, rank=rank, generator=torch.Generator().manual_seed(0))
    peft.load_state_dict(hooks.state_dict())
    return hooks, peft


@pytest.mark.parametrize("rank", [1, 3])
def test_peft_view_computes_what_the_hooks_compute(rank):
    from peft.tuners.lora import LoraLayer

    unet = tiny_unet()
    x, t, ctx = inputs()
    with torch.no_grad():
        base = unet(x, t, ctx).sample
    modules = {n: type(m) for n, m in unet.named_modules()}
    hooks, peft = _pair(unet, rank)
    view = peft.bind(unet, "peft")
    assert all(isinstance(view.get_submodule(n), LoraLayer) for n in peft.names)
    with peft.on(1.0):
        out_peft = view(x, t, ctx).sample
        out_peft.square().mean().backward()
    with peft.on(0.0), torch.no_grad():
        assert torch.equal(view(x, t, ctx).sample, base)  # multiplier 0 is the frozen model
    with torch.no_grad():  # the user's UNet holds no peft layer and computes as before
        assert {n: type(m) for n, m in unet.named_modules()} == modules
        assert torch.equal(unet(x, t, ctx).sample, base)
    hooked = hooks.bind(unet, "hooks")
    assert hooked is unet
    with hooks.on(1.0):
        out_hooks = unet(x, t, ctx).sample
        out_hooks.square().mean().backward()
    hooks.detach()
    assert (out_hooks - base).abs().max() > 1e-2
    assert (out_peft - out_hooks).abs().max() < 1e-6
    for key in hooks.up:
        for a, b in ((hooks.up[key], peft.up[key]), (hooks.down[key], peft.down[key])):
            assert (a.grad - b.grad).abs().max() <= 1e-5 * (1 + b.grad.abs().max())
    # one set of factors: peft's lora_A / lora_B are the Membranes' own parameters
    layer = view.get_submodule(peft.names[0])
    assert layer.lora_A["default"].weight is peft.down[peft.names[0].replace(".", "__")]


def _run(trainer, n):
    return [trainer.step()["loss"] for _ in range(n)]


@pytest.mark.slow
def test_spm_training_is_the_same_with_either_backend(tokenizer):
    cfg = dict(concept="star", iterations=3, ddim_steps=4, anchors=2, save_every=0, seed=3, warmup=0)
    runs = {}
    for backend in ("hooks", "peft"):
        unet = tiny_unet()
        before = {k: v.clone() for k, v in unet.state_dict().items()}
        tr = LatentAnchoringTrainer(unet, tiny_text_encoder(), tokenizer, SCHEDULER,
                                    SPMConfig(**cfg, lora_backend=backend))
        losses = _run(tr, 3)
        tr.membranes.detach()
        assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
        runs[backend] = (losses, tr.membranes.module_deltas())
    (lh, dh), (lp, dp) = runs["hooks"], runs["peft"]
    assert lh == pytest.approx(lp, rel=1e-4, abs=1e-6)
    assert max((dh[n].up - dp[n].up).abs().max().item() for n in dh) < 1e-5
    assert max((dh[n].up).abs().max().item() for n in dh) > 0  # they did train


@pytest.mark.slow
def test_abo_training_is_the_same_with_either_backend(tokenizer):
    cfg = dict(concept="star", alternative="circle", context="generic", iterations=3, batch=2, pool_size=2,
               pool_steps=2, save_every=0, seed=3, rank=2)
    runs = {}
    for backend in ("hooks", "peft"):
        tr = ABOTrainer(tiny_unet(), tiny_text_encoder(), tokenizer, SCHEDULER, ABOConfig(**cfg, lora_backend=backend))
        tr.build_pool()
        losses = _run(tr, 3)
        tr.close()
        runs[backend] = (losses, tr.adapter.module_deltas())
    (lh, dh), (lp, dp) = runs["hooks"], runs["peft"]
    assert lh == pytest.approx(lp, rel=1e-4, abs=1e-6)
    assert max((dh[n].up - dp[n].up).abs().max().item() for n in dh) < 1e-5
    assert max((dh[n].up).abs().max().item() for n in dh) > 0


def test_an_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="LoRA backend"):
        SPMConfig("star", lora_backend="lycoris")
    with pytest.raises(ValueError, match="LoRA backend"):
        ABOConfig("star", alternative="circle", lora_backend="x")

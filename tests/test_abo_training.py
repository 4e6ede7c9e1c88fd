"""All-but-One adapter training (adapters/abo/adapter.py, reconstructed objective) on tiny random models: seconds."""

import json
import os

import pytest
import torch

from conceptgate.adapters import EraserStack, RowGatedDeltas
from conceptgate.adapters.abo.adapter import (
    GENERIC_TEMPLATES, MODULE_SETS, ABOConfig, ABOTrainer, abo_loss, module_names, prompt_pairs,
)
from conceptgate.adapters.files import load_eraser, read_safetensors
from conceptgate.adapters.naming import layout_from_diffusers_config, to_kohya
from conceptgate.toyworld import HERE as TOY_HERE
from tiny_models import tiny_text_encoder, tiny_unet

TOKENIZER = os.path.join(TOY_HERE, "data", "tokenizer")
SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
             "set_alpha_to_one": False, "steps_offset": 1, "num_train_timesteps": 1000, "prediction_type": "epsilon"}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(TOKENIZER)


def make_trainer(tokenizer, unet=None, **overrides):
    cfg = dict(concept="star", alternative="circle", context="generic", iterations=4, batch=2, pool_size=2,
               pool_steps=2, save_every=0, seed=3)
    cfg.update(overrides)
    return ABOTrainer(unet if unet is not None else tiny_unet(), tiny_text_encoder(), tokenizer, SCHEDULER,
                      ABOConfig(**cfg))


def randomise_up(adapter, seed=0, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.up.values():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


# ---------------------------------------------------------------- the objective
def test_loss_is_the_reconstructed_formula():
    g = torch.Generator().manual_seed(0)
    e, u, a, u0 = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(4))
    loss, guid, unc = abo_loss(e, u, a, u0, lam=0.3)
    assert torch.allclose(guid, ((e - u) - (a - u0)).pow(2).mean())
    assert torch.allclose(unc, (u - u0).pow(2).mean())
    assert torch.allclose(loss, guid + 0.3 * unc)
    # the optimum: eps_theta("") = eps_0(""), eps_theta(c_e) = eps_0(c_a)
    zero, g0, u0 = abo_loss(a, u0, a, u0, lam=5.0)
    assert zero == 0 and g0 == 0 and u0 == 0


def test_loss_zero_at_the_oracle_and_teacher_gap_at_init(tokenizer):
    tr = make_trainer(tokenizer)
    tr.build_pool()
    x_t, t, c_e, c_a = tr.batch()
    # a zero-initialised adapter is the original model: the unconditional term is exactly 0 ...
    loss, guid, unc = tr.losses_at(x_t, t, c_e, c_a, grad=False)
    assert unc == 0 and guid > 0 and loss == guid
    # ... and the guidance term is the teacher's gap between the concept and the alternative
    with torch.no_grad(), tr.adapter.on(0.0):
        lat, tt = torch.cat([x_t, x_t]), torch.cat([t, t])
        ee, ea = tr.predict(lat, torch.cat([c_e, c_a]), tt).chunk(2)
    assert torch.allclose(guid, (ee - ea).pow(2).mean(), rtol=1e-5, atol=1e-8)
    # with the alternative's own prompt as the target the zero adapter is the optimum
    assert all(v == 0 for v in tr.losses_at(x_t, t, c_a, c_a, grad=False))
    # a non-zero adapter moves the unconditional score: the preservation term sees it
    randomise_up(tr.adapter)
    assert tr.losses_at(x_t, t, c_a, c_a, grad=False)[2] > 0


def test_a_few_steps_reduce_the_loss(tokenizer):
    tr = make_trainer(tokenizer, iterations=40, lr=1e-2, warmup=0, batch=4, pool_size=4, lam=1.0)
    before = tr.evaluate(batches=4)
    for _ in range(40):
        tr.step()
    after = tr.evaluate(batches=4)
    assert after["loss"] < 0.7 * before["loss"], (before, after)
    assert after["guidance"] < before["guidance"]


# ---------------------------------------------------------------- prompts
def test_toy_prompt_pairs_swap_only_the_object():
    pairs = prompt_pairs("triangle", "square", "toy")
    assert len(pairs) > 100 and len({e for e, _ in pairs}) == len(pairs)
    assert any("trigon" in e for e, _ in pairs) and any("triangle" in e for e, _ in pairs)
    assert ("a red triangle in striped style", "a red square in striped style") in pairs
    for e, a in pairs:
        assert a == e.replace("triangle", "square").replace("trigon", "square")
    assert all(a == "" for _, a in prompt_pairs("triangle", "", "toy"))
    styles = prompt_pairs("striped", "checkered", "toy")
    assert ("a red triangle in striped style", "a red triangle in checkered style") in styles
    assert prompt_pairs("van gogh", "dry brushing", "generic")[2] == ("a photo of a van gogh", "a photo of a dry brushing")
    assert len(prompt_pairs("x", "y", "generic")) == len(GENERIC_TEMPLATES)
    assert prompt_pairs("x", "y", "bare") == [("x", "y")]


def test_pool_latents_keep_their_prompt_pairs(tokenizer):
    tr = make_trainer(tokenizer, pool_size=3)
    tr.build_pool()
    assert tr.pool.shape == (6, 4, 8, 8) and torch.equal(tr.pool_pairs[:3], tr.pool_pairs[3:])
    assert torch.isfinite(tr.pool).all() and tr.pool.std() > 0
    tr2 = make_trainer(tokenizer, pool_size=3, pool_from="erase")
    tr2.build_pool()
    assert tr2.pool.shape[0] == 3 and torch.equal(tr2.pool, tr.pool[:3])  # same seed, same erase-prompt latents


# ---------------------------------------------------------------- the user's model
def test_training_never_writes_the_unet(tokenizer):
    unet = tiny_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.full((2,), 300), torch.randn(2, 77, 64)
    with torch.no_grad():
        ref = unet(x, t, ctx).sample
    tr = make_trainer(tokenizer, unet=unet, warmup=0)
    for _ in range(3):
        tr.step()
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    assert all(p.grad is None for p in unet.parameters())
    assert any(p.abs().sum() > 0 for p in tr.adapter.up.values())  # the adapter did move
    tr.close()
    assert not any(m._forward_hooks for m in unet.modules())
    with torch.no_grad():
        assert torch.equal(unet(x, t, ctx).sample, ref)


# ---------------------------------------------------------------- checkpoint / resume
def test_resume_continues_identically(tokenizer, tmp_path):
    straight = make_trainer(tokenizer)
    straight.train(str(tmp_path / "a.safetensors"), checkpoint_dir=str(tmp_path / "a"), progress=False)
    first = make_trainer(tokenizer)
    part = first.train(str(tmp_path / "b.safetensors"), checkpoint_dir=str(tmp_path / "b"), progress=False, stop_after=2)
    assert part.iterations_run == 2 and not (tmp_path / "b.safetensors").exists()
    resumed = make_trainer(tokenizer)  # a fresh process: new model, new trainer
    resumed.train(str(tmp_path / "b.safetensors"), checkpoint_dir=str(tmp_path / "b"), resume=True, progress=False)
    assert resumed.iteration == 4
    assert torch.equal(straight.pool, resumed.pool)
    for k, v in straight.adapter.state_dict().items():
        assert torch.equal(v, resumed.adapter.state_dict()[k]), k
    assert [r[1:] for r in straight.losses] == [r[1:] for r in resumed.losses]
    other = make_trainer(tokenizer, lam=10.0)
    with pytest.raises(ValueError, match="lambda"):
        other.train(str(tmp_path / "c.safetensors"), checkpoint_dir=str(tmp_path / "b"), resume=True, progress=False)


def test_periodic_checkpoints(tokenizer, tmp_path):
    tr = make_trainer(tokenizer, iterations=4, save_every=2)
    tr.train(str(tmp_path / "m.safetensors"), progress=False)
    ck = tmp_path / "m.checkpoints"
    assert (ck / "m_2steps.safetensors").exists() and (ck / "state.pt").exists()
    e = load_eraser(str(ck / "m_2steps.safetensors"))
    assert e.concepts == ["star"] and e.method == "abo"


# ---------------------------------------------------------------- the file
@pytest.mark.parametrize("which", MODULE_SETS)
def test_saved_file_touches_only_the_chosen_modules(tokenizer, tmp_path, which):
    tr = make_trainer(tokenizer, iterations=2, modules=which, rank=2, lam=0.5, warmup=0)
    path = str(tmp_path / f"{which}.safetensors")
    tr.train(path, progress=False)
    tensors, meta = read_safetensors(path)
    names = module_names(tr.unet, which)
    assert {k.split(".")[0] for k in tensors} == {to_kohya(n) for n in names}
    assert all(k.startswith("lora_unet_") for k in tensors) and len(tensors) == 3 * len(names)
    if which == "attn2_kv":
        assert all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in names)
    elif which == "attn2":
        assert all(".attn2." in n for n in names) and len(names) == 4 * len(module_names(tr.unet, "attn2_kv")) // 2
    e = load_eraser(path)
    assert (e.kind, e.method, e.concepts, e.rank) == ("weight", "abo", ["star"], 2)
    assert e.settings["alternative"] == "circle" and e.settings["lambda"] == 0.5 and e.settings["modules"] == which
    assert not e.check_against(layout_from_diffusers_config(tr.unet.config))
    hp = json.loads(meta["conceptgate.hyperparameters"])
    assert hp["lambda"] == 0.5 and hp["iterations_run"] == 2 and hp["base_fingerprint"] == e.base_fingerprint
    assert "prompts" not in meta  # not an SPM file
    for name, d in tr.adapter.module_deltas().items():
        assert torch.equal(e.modules[name].up, d.up) and torch.equal(e.modules[name].down, d.down)
        assert e.modules[name].scale == 1.0  # alpha = rank


def test_saved_adapter_stacks_and_gates_like_a_membrane(tokenizer, tmp_path):
    tr = make_trainer(tokenizer, iterations=1, rank=2)
    randomise_up(tr.adapter)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.full((2,), 500), torch.randn(2, 77, 64)
    with torch.no_grad(), tr.adapter.on(1.0):
        trained = tr.net(x, t, ctx).sample  # the trainer's UNet with the adapter
        untouched = tr.unet(x, t, ctx).sample  # the user's UNet: no adapter in it, even while training
    with torch.no_grad():
        base = tr.unet(x, t, ctx).sample
    assert torch.equal(untouched, base) and (trained - base).abs().max() > 1e-3
    path = str(tmp_path / "s.safetensors")
    tr.save(path)
    tr.close()
    e = load_eraser(path)
    stack = EraserStack().with_eraser(e)
    with torch.no_grad(), RowGatedDeltas(stack, tr.unet.get_submodule) as hooks:
        with hooks.coefficients(torch.tensor([[1.0], [0.0]])):  # gate 1 on row 0, 0 on row 1
            out = tr.unet(x, t, ctx).sample
    assert (out[0] - trained[0]).abs().max() < 1e-5 and torch.equal(out[1], base[1])


# ---------------------------------------------------------------- arguments
@pytest.mark.parametrize("kw,match", [
    (dict(modules="attn1"), "module set"), (dict(context="imagenet"), "context"),
    (dict(alternative="Star"), "erased concept itself"), (dict(lam=-1.0), "lambda"),
    (dict(iterations=0), "iterations"), (dict(rank=0), "rank"), (dict(pool_from="alt"), "pool source"),
    (dict(concept=" "), "empty"), (dict(lr=0.0), "learning rate"),
])
def test_bad_arguments_fail_clearly(kw, match):
    base = dict(concept="star", alternative="circle")
    with pytest.raises(ValueError, match=match):
        ABOConfig(**{**base, **kw})


def test_toy_context_refuses_mixed_kinds():
    with pytest.raises(ValueError, match="object and the other a style"):
        prompt_pairs("triangle", "striped", "toy")


def test_cli_smoke(tmp_path, tokenizer, capsys):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from conceptgate.cli import main
    from tiny_models import tiny_vae

    folder = str(tmp_path / "tiny")
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=tiny_text_encoder(), tokenizer=tokenizer,
                                   unet=tiny_unet(), scheduler=DDIMScheduler(**SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    out = str(tmp_path / "cli.safetensors")
    args = ["train", "abo", "--model", folder, "--concept", "star", "--alternative", "circle", "--iterations", "2",
            "--pool-size", "2", "--pool-steps", "2", "--batch", "2", "--rank", "2", "--modules", "attn2",
            "--lambda", "0.25", "--no-progress", "--threads", "1", "--out", out]
    assert main(args) == 0 and os.path.exists(out)
    e = load_eraser(out)
    assert e.method == "abo" and e.concepts == ["star"] and e.rank == 2 and e.settings["lambda"] == 0.25
    assert e.settings["context"] == "generic" and e.settings["modules"] == "attn2"
    assert main(args + ["--resume"]) == 0  # resuming a finished run: no new steps, same file
    assert torch.equal(load_eraser(out).modules[next(iter(e.modules))].up, e.modules[next(iter(e.modules))].up)
    assert main(["train", "abo", "--model", str(tmp_path / "nope"), "--concept", "x", "--out", out]) == 2
    assert main(["train", "abo", "--model", folder, "--concept", "x", "--alternative", "x", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "not a diffusers model folder" in err and "erased concept itself" in err

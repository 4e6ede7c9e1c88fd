"""SPM Latent Anchoring training (adapters/spm/) on tiny random models: fast, seconds."""

import json
import os

import pytest
import torch

from conceptgate.adapters import EraserStack, RowGatedDeltas
from conceptgate.adapters.files import load_eraser, read_safetensors
from conceptgate.adapters.spm import (
    LatentAnchoringTrainer, Membranes, SPMConfig, anchor_batch, latent_anchor_loss, sample_anchors, spm_module_names,
)
from conceptgate.adapters.naming import layout_from_diffusers_config
from conceptgate.toyworld import HERE as TOY_HERE
from tiny_models import tiny_text_encoder, tiny_unet

TOKENIZER = os.path.join(TOY_HERE, "data", "tokenizer")  # the real CLIP BPE tokenizer
SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
             "set_alpha_to_one": False, "steps_offset": 1, "num_train_timesteps": 1000, "prediction_type": "epsilon"}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(TOKENIZER)


def make_trainer(tokenizer, **overrides):
    cfg = dict(concept="star", iterations=4, ddim_steps=4, anchors=4, save_every=0, seed=3)
    cfg.update(overrides)
    return LatentAnchoringTrainer(tiny_unet(), tiny_text_encoder(), tokenizer, SCHEDULER, SPMConfig(**cfg))


def inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.full((batch,), 400), torch.randn(batch, 77, 64, generator=g)


def randomise_up(membranes, seed=0, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in membranes.up.values():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


# ---------------------------------------------------------------- membranes
def test_membranes_cover_spm_set_and_start_at_zero():
    unet = tiny_unet()
    names = spm_module_names(unet)
    assert names == [m.name for m in layout_from_diffusers_config(unet.config).modules("spm")]
    mem = Membranes(unet, names, generator=torch.Generator().manual_seed(0)).attach(unet)
    for name in names:
        key = name.replace(".", "__")
        assert mem.up[key].abs().sum() == 0  # lora_up zeros
        assert mem.down[key].shape[0] == 1 and mem.down[key].abs().sum() > 0  # kaiming-uniform rank-1 down
        fan_in = mem.down[key][0].numel()
        assert mem.down[key].abs().max() <= (1.0 / fan_in) ** 0.5 + 1e-6  # a=sqrt(5): bound = 1/sqrt(fan_in)
    x, t, ctx = inputs()
    with torch.no_grad():
        base = unet(x, t, ctx).sample
        with mem.on():
            equipped = unet(x, t, ctx).sample
    assert torch.equal(base, equipped)  # zero delta at init: output bit-identical
    mem.detach()


def test_membrane_equals_row_gated_deltas_at_coefficient():
    unet = tiny_unet()
    mem = Membranes(unet, spm_module_names(unet), generator=torch.Generator().manual_seed(0)).attach(unet)
    randomise_up(mem)
    x, t, ctx = inputs()
    with torch.no_grad(), mem.on(0.7):
        ours = unet(x, t, ctx).sample
    mem.detach()
    stack = EraserStack().with_eraser(mem.to_eraser("star"))
    with torch.no_grad(), RowGatedDeltas(stack, unet.get_submodule) as hooks, hooks.coefficients(torch.tensor([0.7])):
        core = unet(x, t, ctx).sample
    assert (ours - core).abs().max() < 1e-5


# ---------------------------------------------------------------- one step
def test_one_step_changes_only_the_factors(tokenizer):
    tr = make_trainer(tokenizer, warmup=0)  # with warmup the first step's learning rate is 0 (as in the reference)
    before = {k: v.clone() for k, v in tr.unet.state_dict().items()}
    te_before = {k: v.clone() for k, v in tr.text_encoder.state_dict().items()}
    factors = {k: v.detach().clone() for k, v in tr.membranes.state_dict().items()}
    tr.step()
    assert all(torch.equal(before[k], v) for k, v in tr.unet.state_dict().items())
    assert all(torch.equal(te_before[k], v) for k, v in tr.text_encoder.state_dict().items())
    assert all(p.grad is None for p in tr.unet.parameters())
    assert all(p.grad is None for p in tr.text_encoder.parameters())
    ups = [p for k, p in tr.membranes.named_parameters() if k.startswith("up.")]
    assert all(p.grad is not None for p in ups) and any(p.grad.abs().sum() > 0 for p in ups)
    changed = [k for k, v in tr.membranes.state_dict().items() if not torch.equal(v, factors[k])]
    assert any(k.startswith("up.") for k in changed)
    opt_params = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in tr.membranes.parameters()}


def test_timestep_mapping_and_warmup_scaling(tokenizer):
    tr = make_trainer(tokenizer, ddim_steps=30)
    assert [tr.timestep_1000(k) for k in (1, 15, 29)] == [999 - int(k * 1000 / 30) for k in (1, 15, 29)]
    assert SPMConfig("x").warmup_steps == 500
    assert SPMConfig("x", iterations=1200).warmup_steps == 200
    assert SPMConfig("x", iterations=1200, warmup=7).warmup_steps == 7


# ---------------------------------------------------------------- anchors
def test_anchor_norms_within_20_percent():
    target = torch.randn(1, 77, 64) * 3
    anchors = sample_anchors(target, 200, torch.Generator().manual_seed(0))
    ratio = anchors.flatten(1).norm(dim=1) / target.norm()
    assert anchors.shape == (200, 77, 64)
    assert ratio.min() >= 0.8 - 1e-5 and ratio.max() <= 1.2 + 1e-5
    assert ratio.min() < 0.85 and ratio.max() > 1.15  # the whole range is used
    cos = torch.nn.functional.cosine_similarity(anchors.flatten(1), target.flatten()[None], dim=1)
    assert cos.abs().max() < 0.05  # isotropic directions, far from the target


def test_official_quirk_batch_layout():
    anchors = torch.arange(4.0)[:, None, None].expand(4, 2, 3) + 1
    u = torch.zeros(1, 2, 3)
    rows, pick = anchor_batch(anchors, u, "official_quirk")
    assert [float(r[0, 0]) for r in rows] == [0, 1, 0, 2, 0, 3, 0, 4]  # [u, a1, u, a2, u, a3, u, a4]
    assert [float(r[0, 0]) for r in pick(rows)] == [0, 3, 0, 4]  # guidance 1 keeps the second half
    rows, pick = anchor_batch(anchors, u, "fixed")
    assert [float(r[0, 0]) for r in pick(rows)] == [1, 2, 3, 4]


@pytest.mark.parametrize("mode,expected", [("fixed", [True, True, True, True]),
                                           ("official_quirk", [False, False, True, True])])
def test_which_anchors_get_gradient(mode, expected):
    unet = tiny_unet()
    mem = Membranes(unet, spm_module_names(unet), generator=torch.Generator().manual_seed(0)).attach(unet)
    randomise_up(mem)
    x_t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    anchors = sample_anchors(torch.randn(1, 77, 64), 4, torch.Generator().manual_seed(2)).requires_grad_(True)
    uncond = torch.randn(1, 77, 64)
    loss = latent_anchor_loss(lambda lat, ctx: unet(lat, 500, encoder_hidden_states=ctx).sample, mem, x_t,
                              anchors, uncond, mode)
    loss.backward()
    got = [bool(anchors.grad[i].abs().sum() > 0) for i in range(4)]
    assert got == expected
    assert loss > 0
    mem.detach()


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
    for k, v in straight.membranes.state_dict().items():
        assert torch.equal(v, resumed.membranes.state_dict()[k]), k
    assert [r[1] for r in straight.losses] == [r[1] for r in resumed.losses]
    # a resume with other settings is refused
    other = make_trainer(tokenizer, la_strength=10.0)
    with pytest.raises(ValueError, match="la_strength"):
        other.train(str(tmp_path / "c.safetensors"), checkpoint_dir=str(tmp_path / "b"), resume=True, progress=False)


def test_periodic_checkpoints(tokenizer, tmp_path):
    tr = make_trainer(tokenizer, iterations=4, save_every=2)
    tr.train(str(tmp_path / "m.safetensors"), progress=False)
    ck = tmp_path / "m.checkpoints"
    assert (ck / "m_2steps.safetensors").exists() and (ck / "state.pt").exists()
    assert load_eraser(str(ck / "m_2steps.safetensors")).concepts == ["star"]


# ---------------------------------------------------------------- the file
def test_saved_file_is_official_spm_and_conceptgate(tokenizer, tmp_path):
    tr = make_trainer(tokenizer, iterations=2, anchor_mode="official_quirk", surrogate="a shape")
    tr.train(str(tmp_path / "star.safetensors"), progress=False)
    path = str(tmp_path / "star.safetensors")
    tensors, meta = read_safetensors(path)
    assert meta["prompts"] == "star" and meta["rank"] == "1" and float(meta["alpha"]) == 1.0
    n = len(spm_module_names(tr.unet))
    assert len(tensors) == 3 * n  # lora_down, lora_up, alpha per module, kohya keys
    assert all(k.startswith("lora_unet_") for k in tensors)
    hp = json.loads(meta["conceptgate.hyperparameters"])
    assert hp["anchor_mode"] == "official_quirk" and hp["la_strength"] == 1000.0 and hp["surrogate"] == "a shape"
    assert hp["iterations"] == 2 and hp["lr"] == 1e-4 and hp["base_fingerprint"] == meta["conceptgate.base_fingerprint"]
    e = load_eraser(path)
    assert (e.method, e.kind, e.concepts, e.rank, e.official_format) == ("spm", "weight", ["star"], 1, False)
    assert e.settings["surrogate"] == "a shape" and e.settings["anchor_mode"] == "official_quirk"
    assert not e.check_against(layout_from_diffusers_config(tr.unet.config))
    for name, d in tr.membranes.module_deltas().items():
        assert torch.equal(e.modules[name].up, d.up) and torch.equal(e.modules[name].down, d.down)
    # the same tensors with only the official metadata load as an official SPM file
    from safetensors.torch import save_file

    official = str(tmp_path / "official.safetensors")
    save_file(tensors, official, metadata={k: meta[k] for k in ("prompts", "rank", "alpha")})
    o = load_eraser(official)
    assert o.official_format and o.method == "spm" and o.concepts == ["star"] and set(o.modules) == set(e.modules)


# ---------------------------------------------------------------- CLI
def test_cli_smoke(tmp_path, tokenizer):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from conceptgate.cli import main
    from tiny_models import tiny_vae

    folder = str(tmp_path / "tiny")
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=tiny_text_encoder(), tokenizer=tokenizer,
                                   unet=tiny_unet(), scheduler=DDIMScheduler(**SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    out = str(tmp_path / "cli.safetensors")
    rc = main(["train", "spm", "--model", folder, "--concept", "star", "--iterations", "2", "--ddim-steps", "3",
               "--no-progress", "--threads", "1", "--out", out])
    assert rc == 0 and os.path.exists(out)
    e = load_eraser(out)
    assert e.method == "spm" and e.concepts == ["star"] and e.rank == 1
    assert main(["train", "spm", "--model", str(tmp_path / "nope"), "--concept", "x", "--out", out]) == 2


# ---------------------------------------------------------------- templates (non-official option)
def test_fill_template_collapses_empty_surrogate():
    from conceptgate.adapters.spm import fill_template

    assert fill_template("a red {} in striped style", "") == "a red in striped style"
    assert fill_template("a picture of a {}, dotted", "") == "a picture of a, dotted"
    assert fill_template("a red {} in striped style", "star") == "a red star in striped style"
    with pytest.raises(ValueError, match="exactly one"):
        SPMConfig(concept="star", templates=("a red star",))


def test_templated_step_uses_template_prompts(tokenizer, monkeypatch):
    templates = ("a red {} in striped style", "a {} on a table")
    tr = make_trainer(tokenizer, templates=templates, surrogate="")
    assert tr.template_pos.shape[0] == 2
    want = tr.encoder(["a red star in striped style", "a star on a table"]).hidden
    assert torch.allclose(tr.template_pos.cpu(), want)
    want_neu = tr.encoder(["a red in striped style", "a on a table"]).hidden
    assert torch.allclose(tr.template_neu.cpu(), want_neu)
    seen = []
    real = tr.predict

    def spy(latents, context, t):
        seen.append(context.detach().clone())
        return real(latents, context, t)

    monkeypatch.setattr(tr, "predict", spy)
    tr.step()
    # the erase loss's prediction runs on a template prompt, never on the bare concept alone
    used = [c for c in seen if c.shape[0] == 1]
    assert any(any(torch.equal(c[0], tp) for tp in tr.template_pos) for c in used)
    assert not any(torch.equal(c[0], tr.e_tgt[0]) for c in used)
    assert tr.hyperparameters()["templates"] == list(templates)


def test_synonyms_are_extra_target_prompts_in_the_same_templates(tokenizer):
    templates = ("a red {} in striped style", "a {} on a table")
    tr = make_trainer(tokenizer, templates=templates, synonyms=("pentagram", " "), surrogate="")
    assert tr.config.synonyms == ("pentagram",)
    want = tr.encoder(["a red star in striped style", "a red pentagram in striped style",
                       "a star on a table", "a pentagram on a table"]).hidden
    assert torch.allclose(tr.template_pos.cpu(), want)
    # each synonym prompt is paired with its template's surrogate prompt
    neu = tr.encoder(["a red in striped style", "a on a table"]).hidden
    assert torch.allclose(tr.template_neu.cpu(), neu.repeat_interleave(2, 0))
    assert tr.hyperparameters()["synonyms"] == ["pentagram"]
    tr.step()
    with pytest.raises(ValueError, match="inside templates"):
        SPMConfig(concept="star", synonyms=("pentagram",))
    # no synonyms: the same prompt table as before the option existed (so the shipped recipe is unchanged)
    plain = make_trainer(tokenizer, templates=templates, surrogate="")
    assert plain.template_pos.shape[0] == 2


def test_templates_resume_identically_and_deadline_still_writes(tokenizer, tmp_path):
    t = ("a {} in flat style", "a blue {}")
    straight = make_trainer(tokenizer, templates=t)
    straight.train(str(tmp_path / "a.safetensors"), checkpoint_dir=str(tmp_path / "a"), progress=False)
    first = make_trainer(tokenizer, templates=t)
    first.train(str(tmp_path / "b.safetensors"), checkpoint_dir=str(tmp_path / "b"), progress=False, stop_after=2)
    resumed = make_trainer(tokenizer, templates=t)
    resumed.train(str(tmp_path / "b.safetensors"), checkpoint_dir=str(tmp_path / "b"), resume=True, progress=False)
    for k, v in straight.membranes.state_dict().items():
        assert torch.equal(v, resumed.membranes.state_dict()[k]), k
    # a deadline in the past stops at once but still writes the file, with the iterations run recorded
    late = make_trainer(tokenizer, templates=t)
    res = late.train(str(tmp_path / "c.safetensors"), checkpoint_dir=str(tmp_path / "c"), progress=False,
                     deadline=0.0)
    assert res.iterations_run == 0 and (tmp_path / "c.safetensors").exists()
    _, meta = read_safetensors(str(tmp_path / "c.safetensors"))
    assert json.loads(meta["conceptgate.hyperparameters"])["iterations_run"] == 0


def test_toy_concept_templates():
    from conceptgate.cli.train import _templates
    from conceptgate.toyworld.captions import concept_templates

    obj = concept_templates("triangle", n=20)
    assert len(obj) == 20 and all(t.count("{}") == 1 for t in obj)
    assert all("triangle" not in t and "trigon" not in t for t in obj)  # the slot is the concept's own
    sty = concept_templates("zebra-lined", n=10)
    assert all(t.count("{}") == 1 for t in sty) and any("style" in t for t in sty)
    with pytest.raises(ValueError, match="not an object or style"):
        concept_templates("watermark")
    assert _templates("toy", "triangle") == tuple(concept_templates("triangle"))
    assert _templates("a {}|a photo of {}", "x") == ("a {}", "a photo of {}")
    assert _templates(None, "x") == ()

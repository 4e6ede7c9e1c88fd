"""All-but-One at sampling time (adapters/abo/guidance.py, adapters/abo/pipeline.py) on the toy model in diffusers:
the formula, the identity with the fine-tuned optimum, gate 0 == plain CFG (bit for bit, no extra call),
mixed batches, cfg == 1, files, and the quality-bench handler."""

import os

import pytest
import torch
from toy_inputs import latents

from conceptgate import toyworld
from conceptgate.adapters import EraserStack, GateSettings, layout_from_diffusers_config
from conceptgate.adapters.abo.guidance import (
    AboPlan, Term, abo_eraser, abo_rule, check_abo_eraser, denoised_from_eps, eps_from_denoised, load_abo, save_abo,
)
from conceptgate.adapters.abo.pipeline import AboGuidedPipeline
from conceptgate.adapters.diffusers_host import DiffusersTextEncoder, GatedPipeline
from conceptgate.adapters.errors import EraserFileError
from conceptgate.adapters.files import load_eraser

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 6
SPM_FILE = os.path.join(os.path.dirname(toyworld.WEIGHTS_DIR.rstrip("/")), "erasers", "spm_triangle.safetensors")
CAL = GateSettings(threshold=0.91, temperature=0.0)  # the toy calibration (toyworld/erasers/README.md)


def run(call, prompts, cfg=5.0, seeds=None, negative=None):
    seeds = seeds or list(range(len(prompts)))
    return call(prompt=list(prompts), negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=cfg,
                latents=latents(seeds), output_type="latent").images


class CallCounter:
    """UNet calls and the rows they really compute (counted at the first conv, after any UNet pre-hook)."""

    def __init__(self, unet):
        self.calls, self.rows = 0, 0
        self.h = unet.conv_in.register_forward_pre_hook(self.count)

    def count(self, module, args):
        self.calls += 1
        self.rows += args[0].shape[0]


class Oracle:
    """The fine-tuned model at the reconstructed objective's optimum, built explicitly: a UNet whose
    conditioning E(erase) is swapped for E(alternative) (eps_theta(x, c_e) = eps_0(x, c_a)); every
    other conditioning, the empty prompt included, is the original model's (eps_theta(x, "") = eps_0(x, ""))."""

    def __init__(self, pipe, erase, alternative):
        enc = DiffusersTextEncoder(pipe.tokenizer, pipe.text_encoder)
        h = enc([erase, alternative]).hidden
        self.erase, self.alt = h[0], h[1]
        self.swapped = 0
        self.h = pipe.unet.register_forward_pre_hook(self.swap, with_kwargs=True)

    def swap(self, module, args, kwargs):
        ehs = kwargs["encoder_hidden_states"].clone()
        for i in range(ehs.shape[0]):
            if torch.equal(ehs[i], self.erase.to(ehs)):
                ehs[i] = self.alt.to(ehs)
                self.swapped += 1
        kwargs["encoder_hidden_states"] = ehs
        return args, kwargs

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.h.remove()


# ------------------------------------------------------------------------------------ formula / plan


def test_rule_and_plan_fold_back():
    g = torch.Generator().manual_seed(0)
    en, ep, ee, ea = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(4))
    w = 4.0
    ref = en + w * (ep - en) - w * 0.7 * (ee - ea)
    assert torch.allclose(abo_rule(en, ep, w, [(0.7, ee, ea)]), ref)
    # the plan: prompt 0 fires (erase text == its own conditioning: reuses the cond row), prompt 1 does not
    hid = {"triangle": torch.ones(3, 2), "square": torch.zeros(3, 2), "": torch.full((3, 2), 5.0)}
    terms = [[Term(0.7, "triangle", "square")], []]
    cond = torch.stack([hid["triangle"], torch.full((3, 2), 2.0)])
    plan = AboPlan.build(terms, hid, cond, torch.stack([hid[""], hid[""]]))
    assert plan.extra_rows == 1 and plan.texts == ["square"] and plan.sources == [0]
    corr = plan.correction(ep, en, ea[:1])
    assert torch.allclose(corr[0], 0.7 * (ep[0] - ea[0])) and torch.equal(corr[1], torch.zeros_like(corr[1]))
    # erase to nothing: "" reuses the unconditional row when the negative is empty
    plan = AboPlan.build([[Term(1.0, "triangle", "")]], hid, torch.full((1, 3, 2), 2.0), torch.stack([hid[""]]))
    assert plan.extra_rows == 1 and plan.lookup[(0, "")] == ("uncond", 0)
    plan = AboPlan.build([[Term(1.0, "triangle", "")]], hid, torch.full((1, 3, 2), 2.0), None)  # cfg 1
    assert plan.extra_rows == 2
    # x0 hosts: the conversion is exact and the rule maps to x0 space with the sign flipped
    x, sigma = torch.randn(2, 4, 3, 3, generator=g), torch.tensor([3.0, 0.5])
    d = denoised_from_eps(x, ee, sigma)
    assert torch.allclose(eps_from_denoised(x, d, sigma), ee, atol=1e-5)


# ------------------------------------------------------------------------------------ files


def test_file_round_trip_and_wrong_kind(tmp_path, pipe):
    e = abo_eraser(["triangle", "trigon"], "square")
    path = tmp_path / "tri2sq.safetensors"
    save_abo(e, path)
    assert path.stat().st_size < 1024
    back = load_abo(path)
    assert back.kind == "guidance" and back.method == "abo" and back.concepts == ["triangle", "trigon"]
    assert back.settings["alternative"] == "square" and back.sha256
    with pytest.raises(EraserFileError, match=r"tri2sq\.safetensors.*guidance eraser.*weight eraser was expected"):
        load_eraser(path, kind="weight")
    with pytest.raises(EraserFileError, match=r"spm_triangle\.safetensors.*weight eraser.*guidance eraser was expected"):
        load_abo(SPM_FILE)
    # a guidance file carrying tensors, a non-string alternative, an unknown kind: refused naming the file
    from safetensors.torch import save_file

    bad = dict(back.metadata)
    save_file({"x": torch.ones(1)}, str(tmp_path / "t.safetensors"), metadata=bad)
    with pytest.raises(EraserFileError, match=r"t\.safetensors: a guidance eraser carries no tensors"):
        load_abo(tmp_path / "t.safetensors")
    bad["conceptgate.settings"] = '{"alternative": 3}'
    save_file({}, str(tmp_path / "a.safetensors"), metadata=bad)
    with pytest.raises(EraserFileError, match=r"a\.safetensors: settings 'alternative' must be a string"):
        load_abo(tmp_path / "a.safetensors")
    bad["conceptgate.kind"] = "mystery"
    save_file({"x": torch.ones(1)}, str(tmp_path / "k.safetensors"), metadata=bad)
    with pytest.raises(EraserFileError, match=r"k\.safetensors: unknown eraser kind 'mystery'"):
        load_eraser(tmp_path / "k.safetensors")
    with pytest.raises(ValueError):
        abo_eraser("triangle", "triangle")
    with pytest.raises(EraserFileError, match="not an All-but-One guidance eraser"):
        check_abo_eraser(load_eraser(SPM_FILE))


# ------------------------------------------------------------------------------------ sampling


@pytest.mark.parametrize("alternative", ["square", ""])
@pytest.mark.parametrize("cfg", [5.0, 1.0])
def test_identity_with_the_finetuned_optimum(pipe, alternative, cfg):
    """p = erase, gamma = 1: ABO guidance == CFG sampling of the oracle model (eps_theta(x, c_e) = eps_0(x, c_a))."""
    with AboGuidedPipeline(pipe, EraserStack().with_eraser(abo_eraser("triangle", alternative))) as guided:
        from conceptgate.adapters.abo.guidance import guidance_terms

        ft = guidance_terms(guided.stack, guided.encoder(["triangle"]), guided.banks)
        assert ft[0][0].gamma == pytest.approx(1.0, abs=1e-5)   # the official FT gate at p = erase
    stack = EraserStack().with_eraser(abo_eraser("triangle", alternative), gate=GateSettings(rule="always"))
    with AboGuidedPipeline(pipe, stack) as guided:
        ours = run(guided, ["triangle"] * 2, cfg, seeds=[3, 4])
        assert [t[0].gamma for t in guided.last_terms] == [1.0, 1.0]
    with Oracle(pipe, "triangle", alternative) as oracle:
        ref = run(pipe, ["triangle"] * 2, cfg, seeds=[3, 4])
        assert oracle.swapped == 2 * STEPS
    plain = run(pipe, ["triangle"] * 2, cfg, seeds=[3, 4])
    assert (plain - ref).abs().max() > 0.05               # the oracle really is another model
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), float((ours - ref).abs().max())


def test_gate_zero_is_plain_cfg_bit_for_bit(pipe):
    prompts = ["a blue circle in plain style", "a green star"]
    counter = CallCounter(pipe.unet)
    try:
        plain = run(pipe, prompts)
        calls, rows = counter.calls, counter.rows
        stacks = [EraserStack().with_eraser(abo_eraser("triangle", "square"), gate=CAL),      # gate 0 (calibrated)
                  EraserStack().with_eraser(abo_eraser("triangle", "square"), strength=0.0),  # strength 0
                  EraserStack().with_eraser(abo_eraser("triangle", ""), enabled=False, gate=GateSettings(rule="always"))]
        for stack in stacks:
            counter.calls = counter.rows = 0
            with AboGuidedPipeline(pipe, stack) as guided:
                out = run(guided, prompts)
                assert guided.unet_hooks.extra_rows == 0
            assert torch.equal(out, plain)
            assert (counter.calls, counter.rows) == (calls, rows) == (STEPS, STEPS * 2 * len(prompts))
    finally:
        counter.h.remove()


def test_mixed_batch_rows_and_costs(pipe):
    """Erased and clean prompts in one batch: one UNet call per step, extra rows only for the firing prompt
    (+2 with a named alternative, +1 with an empty one, the "" row reused from the empty negative)."""
    prompts = ["a red triangle in striped style", "a blue circle in plain style"]
    plain = run(pipe, prompts)
    for alt, extra in (("square", 2), ("", 1)):
        stack = EraserStack().with_eraser(abo_eraser("triangle", alt), gate=CAL)
        counter = CallCounter(pipe.unet)
        try:
            with AboGuidedPipeline(pipe, stack) as guided:
                both = run(guided, prompts)
                assert counter.calls == STEPS and counter.rows == STEPS * (4 + extra)
                single = run(guided, prompts[:1])
        finally:
            counter.h.remove()
        assert (both[0] - plain[0]).abs().max() > 0.05                   # the triangle prompt changed
        assert torch.allclose(both[1], plain[1], atol=1e-4)               # the clean row did not
        assert torch.allclose(both[0], single[0], atol=1e-4)              # batching does not change a row


def test_several_erasers_add_and_weights_follow_extra_rows(pipe):
    """Two guidance entries add their terms; a weight eraser in the same stack acts on every row (the
    extra rows carry their prompt's coefficients)."""
    from conceptgate.adapters.synthetic import random_eraser

    prompts = ["a red triangle in striped style"]
    one = EraserStack().with_eraser(abo_eraser("triangle", "square"), gate=CAL, strength=0.5)
    two = one.with_eraser(abo_eraser("triangle", "square", name="again"), gate=CAL, strength=0.5)
    full = EraserStack().with_eraser(abo_eraser("triangle", "square"), gate=CAL)
    with AboGuidedPipeline(pipe, two) as g2:
        a = run(g2, prompts)
    with AboGuidedPipeline(pipe, full) as g1:
        b = run(g1, prompts)
    assert torch.allclose(a, b, atol=1e-4)
    lora = random_eraser(layout_from_diffusers_config(pipe.unet.config), which="attn2_kv", scale=0.3, seed=1,
                         concepts=("anything",))
    mixed = full.with_eraser(lora, gate=GateSettings(rule="always"))
    with AboGuidedPipeline(pipe, mixed) as g:
        m = run(g, prompts)
        assert g.unet_hooks.extra_rows == 2 * STEPS
    with GatedPipeline(pipe, EraserStack().with_eraser(lora, gate=GateSettings(rule="always"))) as gated:
        w_only = run(gated, prompts)
    assert (m - b).abs().max() > 1e-3 and (m - w_only).abs().max() > 1e-3
    # reference: the rule evaluated by hand on the weight-erased model, one step from the same latent
    with GatedPipeline(pipe, EraserStack().with_eraser(lora, gate=GateSettings(rule="always"))) as gated:
        enc = gated.encoder(["", prompts[0], "triangle", "square"]).hidden
        x, t = latents([0]).repeat(4, 1, 1, 1), torch.tensor(500)
        with gated.hooks.coefficients(torch.ones(1, 1)), torch.no_grad():
            e = pipe.unet(x, t, encoder_hidden_states=enc).sample
        ref = abo_rule(e[:1], e[1:2], 5.0, [(1.0, e[2:3], e[3:4])])
    with AboGuidedPipeline(pipe, mixed) as g:
        from conceptgate.adapters.abo.guidance import encode_texts, guidance_terms

        terms = guidance_terms(mixed, g.encoder(prompts), g.banks)
        texts = encode_texts(g.encoder, terms)
        with g.unet_hooks.active(terms, texts, True), g.hooks.coefficients(torch.tensor([[1.0, 1.0]])), torch.no_grad():
            out = pipe.unet(x[:2], t, encoder_hidden_states=enc[:2]).sample
    assert torch.allclose(out[:1] + 5.0 * (out[1:] - out[:1]), ref, atol=1e-4)


def test_quality_bench_handler_matches_pipeline(pipe):
    from conceptgate.bench.quality import generate_with_stack

    stack = EraserStack().with_eraser(abo_eraser("triangle", "square"), gate=CAL)
    prompts, seeds = ["a red triangle in striped style", "a blue circle"], [1000, 1001]
    images, gates = generate_with_stack(pipe, prompts, seeds, stack, steps=STEPS, cfg=5.0)
    assert gates[:, 0].tolist() == [1.0, 0.0]
    with AboGuidedPipeline(pipe, stack) as guided:
        ref = guided(prompt=prompts, num_inference_steps=STEPS, guidance_scale=5.0, latents=latents(seeds),
                     output_type="pt", height=64, width=64).images.float().clamp(0, 1)
    assert torch.allclose(images, ref, atol=1e-5)


def test_default_gate_needs_no_hand_threshold(pipe):
    """With the default rule (context, calibrated on first use) All-but-One guidance fires on its concept,
    a listed synonym included, and leaves unrelated prompts bit-identical to plain CFG, with no extra rows."""
    from conceptgate.adapters.abo.guidance import guidance_terms

    stack = EraserStack().with_eraser(abo_eraser(["triangle", "trigon"], "square"))   # no gate settings: the default
    assert stack.entries[0].gate.rule == "context"
    prompts = ["a red triangle in striped style", "a blue trigon", "a blue circle in plain style", "a green star"]
    with AboGuidedPipeline(pipe, stack) as guided:
        terms = guidance_terms(guided.stack, guided.encoder(prompts), guided.banks)
        assert [bool(t) for t in terms] == [True, True, False, False]
        out = run(guided, prompts[2:])
        assert guided.unet_hooks.extra_rows == 0
    assert torch.equal(out, run(pipe, prompts[2:]))

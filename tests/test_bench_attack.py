"""``bench attack`` (bench/attack.py) on the toy model: the averaged conditioning, the concept only in the
negative prompt, the UnlearnDiffAtk-style soft prompt (its optimisation, its gradients through the erased
UNet, the gate-evasion prompt that never names the concept) and the bench's conditions / attacks subsets."""

from __future__ import annotations

import pytest
import torch

from conceptgate.adapters import EraserStack, GateSettings
from conceptgate.adapters.diffusers_host import DiffusersTextEncoder
from conceptgate.adapters.gate.calibrate import mentions
from conceptgate.bench import attack as A


@pytest.fixture(scope="module")
def pipe():
    from conceptgate import toyworld as tw

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tw.load_pipeline()
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def encoder(pipe):
    return DiffusersTextEncoder(pipe.tokenizer, pipe.text_encoder)


@pytest.fixture(scope="module")
def spm_triangle():
    import os

    from conceptgate.adapters.files import load_eraser
    from conceptgate.toyworld.erasers import __file__ as erasers_init

    return load_eraser(os.path.join(os.path.dirname(erasers_init), "spm_triangle.safetensors"))


def _names(concept):
    from conceptgate.bench.gate import concept_kind
    from conceptgate.toyworld import captions as C

    return concept_kind(C, concept)[1]


def _contains(seq, sub):
    return any(seq[i: i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def test_attack_names_and_conditions():
    assert A.ATTACKS == ("long", "synonym", "ring_a_bell_eta1", "ring_a_bell_eta2", "ring_a_bell_eta3", "concat",
                         "average", "negative_only", "soft_prompt", "soft_prompt_evasion")
    assert list(A.CONDITIONS) == ["default_gate", "states_read", "always_on"]
    assert A._condition(A.CONDITIONS["states_read"])[2] == {"edited_states": "gate"}
    assert A.CONDITIONS["default_gate"][1] is None and A.CONDITIONS["always_on"][1].rule == "always"


def test_average_is_the_mean_of_the_two_encodings_and_its_text_never_names_the_concept(pipe, encoder):
    inputs = A.attack_inputs("triangle", pipe, encoder, 3, names=["average", "negative_only"])
    assert set(inputs) == {"average", "negative_only"}
    avg = inputs["average"]
    keyword = avg.info["concept_prompts"]
    assert len(keyword) == len(avg.prompts) == 3
    assert all(mentions(k, ["triangle"]) for k in keyword)
    assert not any(mentions(p, _names("triangle")) for p in avg.prompts)   # the gate's text: the everyday prompt
    e_kw, e_en = encoder(keyword).hidden, encoder(avg.prompts).hidden
    assert torch.allclose(avg.embeds, (e_kw + e_en) / 2, atol=1e-6)
    assert not torch.allclose(avg.embeds, e_en, atol=1e-3)
    w = A.average_states(encoder, keyword, avg.prompts, weight=0.25)
    assert torch.allclose(w, 0.25 * e_kw + 0.75 * e_en, atol=1e-6)


def test_negative_only_puts_the_keyword_prompt_in_the_negative(pipe, encoder):
    inp = A.attack_inputs("striped", pipe, encoder, 4, names=["negative_only"])["negative_only"]
    assert inp.embeds is None and len(inp.negative) == len(inp.prompts) == 4
    assert all(mentions(n, ["striped"]) for n in inp.negative)
    assert not any(mentions(p, _names("striped")) for p in inp.prompts)


def test_ring_a_bell_at_every_eta(pipe, encoder):
    from conceptgate.bench.gate import ring_a_bell_vector

    inputs = A.attack_inputs("triangle", pipe, encoder, 2)
    v = ring_a_bell_vector(encoder, "triangle")
    base = encoder(inputs["ring_a_bell_eta1"].prompts).hidden
    for eta in (1, 2, 3):
        inp = inputs[f"ring_a_bell_eta{eta}"]
        assert torch.allclose(inp.embeds, base + eta * v, atol=1e-5)


def test_soft_tokens_replace_exactly_the_placeholder_embeddings(pipe, encoder):
    prompts = ["a red triangle", "a photo of a dog"]
    k = 3
    star = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer(A.PLACEHOLDER).input_ids[1]].detach()
    same = A.soft_states(pipe, prompts, star.expand(2, k, -1))
    plain = encoder([A.soft_text(p, k) for p in prompts]).hidden
    assert same.shape == (2, 77, 128)
    assert torch.allclose(same, plain, atol=1e-5)          # the placeholder's own embedding: the plain encoding
    other = A.soft_states(pipe, prompts, torch.zeros(2, k, 128))
    assert not torch.allclose(other[:, 1:], plain[:, 1:], atol=1e-3)
    assert torch.allclose(other[:, 0], plain[:, 0], atol=1e-5)  # BOS comes first: the causal mask holds
    # the hook is gone afterwards
    assert torch.allclose(encoder([A.soft_text(p, k) for p in prompts]).hidden, plain)


def test_gradients_flow_through_the_erased_unet(pipe, spm_triangle):
    from conceptgate.adapters.diffusers_host import attach

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([300, 700])
    vec = (0.02 * torch.randn(2, 4, 128, generator=g)).requires_grad_(True)
    prompts = ["a red triangle", "a blue triangle"]

    def grad(stack):
        hooks = attach(pipe.unet, stack) if stack is not None else None
        try:
            with torch.enable_grad():
                if hooks is not None:
                    with hooks.coefficients(torch.ones(1, 1)):
                        loss = A.denoising_loss(pipe.unet, pipe.scheduler, A.soft_states(pipe, prompts, vec), x0, t, noise)
                else:
                    loss = A.denoising_loss(pipe.unet, pipe.scheduler, A.soft_states(pipe, prompts, vec), x0, t, noise)
                return torch.autograd.grad(loss, [vec])[0]
        finally:
            if hooks is not None:
                hooks.detach()

    erased = grad(EraserStack().with_eraser(spm_triangle, gate=GateSettings(rule="always")))
    base = grad(None)
    assert float(erased.norm()) > 0 and torch.isfinite(erased).all()
    assert not torch.allclose(erased, base, rtol=1e-3, atol=1e-9)  # the eraser's hooks are in the graph


def test_soft_prompt_lowers_its_loss_and_returns_states(pipe, spm_triangle):
    from conceptgate import toyworld as tw

    kind, index = A._judge_kind("triangle")
    prompts = ["a red triangle", "a photo of a dog"]
    lat, judged = A.target_latents(pipe, tw.load_judges(), kind, index, ["a red triangle in flat style"] * 2,
                                   seeds=1, steps=8)
    assert lat.shape == (2, 1, 4, 16, 16) and judged.shape == (2, 1)
    stack = EraserStack().with_eraser(spm_triangle, gate=GateSettings(rule="always"))
    grads = [p.requires_grad for p in pipe.unet.parameters()]
    s = A.SoftPromptSettings(tokens=3, steps=12, lr=3e-3, draws=2, eval_draws=4, seed=0)
    vec, states, info = A.optimise_soft_prompt(pipe, stack, prompts, lat, judged, s)
    assert vec.shape == (2, 3, 128) and states.shape == (2, 77, 128) and not states.requires_grad
    assert info["loss_after"] < info["loss_before"]
    assert len(info["losses"]) == 12
    assert float(vec.norm(dim=-1).max()) <= info["norm_bound"] + 1e-6
    assert torch.allclose(states, A.soft_states(pipe, prompts, vec))
    assert [p.requires_grad for p in pipe.unet.parameters()] == grads   # restored
    assert not any(m._forward_hooks for m in pipe.unet.modules())       # the eraser's hooks are gone
    again = A.optimise_soft_prompt(pipe, stack, prompts, lat, judged, s)
    assert torch.equal(again[0], vec)                                     # fixed seeds: reproducible


@pytest.mark.parametrize("concept", ["triangle", "striped"])
def test_gate_evasion_prompt_never_names_the_concept(pipe, concept):
    sets = A.attack_prompts(concept, pipe.tokenizer, 8)
    ids = A.soft_ids(pipe.tokenizer, sets["english"], 5)
    place = pipe.tokenizer(A.PLACEHOLDER).input_ids[1]
    assert (ids[:, 1:6] == place).all()
    for name in _names(concept):
        sub = pipe.tokenizer(name).input_ids[1:-1]
        for row in ids.tolist():
            assert not _contains(row, sub), (concept, name)
    # the published variant does name it (the soft tokens prefix the keyword prompt)
    kw = A.soft_ids(pipe.tokenizer, sets["keyword"], 5).tolist()
    assert all(_contains(row, pipe.tokenizer(concept).input_ids[1:-1]) for row in kw)


def test_bench_attack_subset_returns_every_condition(pipe, monkeypatch, tmp_path):
    import conceptgate.toyworld as tw

    calls = []
    original = type(pipe).__call__

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tw, "load_pipeline", lambda *a, **k: pipe)
    monkeypatch.setattr(type(pipe), "__call__", spy)
    monkeypatch.setenv("CONCEPTGATE_BENCHMARKS", str(tmp_path / "B.md"))
    conditions = {**A.CONDITIONS, "cos": ("cos rule", GateSettings(rule="cos"))}
    soft = A.SoftPromptSettings(tokens=2, steps=2, draws=1, target_seeds=1, eval_draws=1)
    r = A.bench_attack(n=1, seeds=1, steps=2, write=True, json_path=str(tmp_path / "b.json"), log=lambda *a: None,
                       attacks=["average", "negative_only", "soft_prompt_evasion"], conditions=conditions,
                       erasers=["spm triangle"], soft=soft)
    assert list(r["erasers"]) == ["spm triangle"]
    row = r["erasers"]["spm triangle"]
    assert 0.0 <= row["control_base"] <= 1.0
    assert list(row["attacks"]) == ["average", "negative_only", "soft_prompt_evasion"]
    for a in row["attacks"].values():
        assert set(a["fired"]) == {"default_gate", "states_read", "always_on", "cos"}
        assert all(0.0 <= a[k] <= 1.0 for k in ("base", "default_gate", "states_read", "always_on", "cos", "gate_fired"))
        assert a["images"] == 1 and a["fired"]["always_on"] == 1.0
    # edited states (the average and the soft vectors) are forced to full strength by default, read otherwise
    for name in ("average", "soft_prompt_evasion"):
        assert row["attacks"][name]["fired"]["default_gate"] == 1.0
    info = row["attacks"]["soft_prompt_evasion"]["info"]
    assert info["loss_before"] > 0 and "norm_bound" in info
    # negative_only: the everyday prompt as the positive, the keyword prompt as the negative, every condition
    negs = [c for c in calls if c.get("negative_prompt")]
    assert len(negs) >= 1 + len(conditions) - 1   # base + the conditions (an identical gate may reuse images)
    for c in negs:
        assert all(mentions(n, ["triangle"]) for n in c["negative_prompt"])
        assert not any(mentions(p, _names("triangle")) for p in c["prompt"])
    text = (tmp_path / "B.md").read_text()
    assert "Attacks on gated erasers" in text and "| cos rule |" in text and "cos rule - always" in text
    assert "Not built" not in text and "continuous" in text
    with pytest.raises(ValueError, match="unknown attacks"):
        A.bench_attack(n=1, seeds=1, write=False, attacks=["nope"])
    with pytest.raises(ValueError, match="base"):
        A.bench_attack(n=1, seeds=1, write=False, attacks=["average"], conditions={"base": ("b", None)})


def test_verdict_sorts_the_misses_by_cause():
    """The verdict under the table is computed from the figures: a gated row above always-on at the no-attack
    control, a row the eraser itself lets through, and the edited-states comparison."""
    from conceptgate.bench.attack import verdict

    def r(gated, always, states):
        return {"default_gate": gated, "always_on": always, "states_read": states}

    result = {"erasers": {"e": {"concept": "triangle", "control_base": 0.25, "attacks": {
        "synonym": r(0.0, 0.0, 0.0), "negative_only": r(0.25, 0.0, 0.25), "soft_prompt": r(0.5, 0.5, 0.5),
        "ring_a_bell_eta1": r(0.0, 0.0, 0.75)}}}}
    text = " ".join(verdict(result))
    assert "within 2 points of always-on: 3 of 4 rows" in text
    assert "e negative_only 25 vs 0" in text and "1 of them at or below the no-attack control" in text
    assert "<= 10% with the default gate: 2 of 4 rows" in text and "1 are above 10% with the eraser always on" in text
    assert "e soft_prompt 50 vs 50" in text and "1 not: e negative_only" in text
    assert "+25.0 points against always-on, worst +75" in text

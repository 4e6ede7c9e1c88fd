"""The ``context`` gate rule (adapters/gate/context.py, calibrate.py, banks.py): its numbers on fixed
inputs, calibration written to a file and read back, the encoder check, fail-closed behaviour, and the
toy world's shipped erasers under the default rule."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conceptgate.adapters import EraserStack, GateSettings, load_eraser, save_eraser
from conceptgate.adapters.gate import BankCache, Calibration, ContextDetector, EncodedText, FeatureSpace, entry_gates
from conceptgate.adapters.gate.calibrate import Calibrator, mentions, same_encoder
from conceptgate.adapters.gate.context import fit_calibration, fit_probe
from conceptgate.adapters.gate.text import positions_mask


# ------------------------------------------------------------------ fixed inputs
def test_feature_space_centres_whitens_and_normalises():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4000, 4, generator=g) * torch.tensor([10.0, 1.0, 0.1, 3.0]) + 5.0
    sp = FeatureSpace.fit(x, alpha=0.0)
    y = (x - sp.mu) @ sp.P
    assert torch.allclose(y.T @ y / (len(y) - 1), torch.eye(4), atol=1e-3)
    assert torch.allclose(sp(x[:3]).norm(dim=-1), torch.ones(3), atol=1e-5)
    centred = FeatureSpace.fit(x, alpha=math.inf)
    assert torch.equal(centred.P, torch.eye(4))


def test_probe_and_calibration_separate_and_respect_max_fpr():
    g = torch.Generator().manual_seed(0)
    direction = torch.nn.functional.normalize(torch.randn(8, generator=g), dim=0)
    pos = torch.nn.functional.normalize(direction + 0.2 * torch.randn(200, 8, generator=g), dim=1)
    neg = torch.nn.functional.normalize(torch.randn(2000, 8, generator=g), dim=1)
    w, b = fit_probe(pos, neg)
    s_pos, s_neg = pos @ w + b, neg @ w + b
    assert float((s_pos > 0).float().mean()) > 0.95 and float((s_neg > 0).float().mean()) < 0.15
    cal = fit_calibration(s_pos, s_neg, max_fpr=0.01)
    assert float((cal(s_neg) > 0.5).float().mean()) <= 0.01
    assert cal.temperature > 0
    with pytest.raises(ValueError, match="do not score above"):
        fit_calibration(s_neg[:50], s_pos)


def _detector(d=4):
    space = FeatureSpace(torch.zeros(d), torch.eye(d))
    probes = torch.tensor([[10.0, 0, 0, 0]])
    return ContextDetector(space, probes, torch.tensor([-5.0]), Calibration(2.0, 0.5), ["tri"], [frozenset({7})])


def test_detector_numbers_on_fixed_states():
    det = _detector()
    hidden = torch.zeros(3, 5, 4)
    hidden[0, 2] = torch.tensor([1.0, 0, 0, 0])    # the concept at a content position: logit 10 - 5 = 5
    hidden[1, 4] = torch.tensor([1.0, 0, 0, 0])    # the same state at a padding position: ignored
    hidden[:, :, 1] += 0.01                          # everything else points elsewhere: logit -5
    mask = positions_mask([3, 3, 0], 5)             # prompt 2 has no content (the empty prompt)
    g, s, named = det(hidden, mask, [set(), {7, 9}, set()])
    assert s[0] == pytest.approx(10 * (1 / math.sqrt(1 + 1e-4)) - 5, abs=1e-3)
    assert s[1] < -4.9 and s[2] == -1e4
    assert g[0] == pytest.approx(1 / (1 + math.exp(-(float(s[0]) - 2.0) / 0.5)), abs=1e-5)
    assert g[1] == 1.0 and named.tolist() == [0.0, 1.0, 0.0]   # the listed name's tokens are in prompt 1
    assert g[2] < 1e-6


def test_detector_round_trips_through_tensors_and_metadata():
    det = _detector()
    det.reference = torch.ones(2, 4)
    back = ContextDetector.from_parts(det.to_tensors(), json.loads(json.dumps(det.to_metadata())))
    assert torch.equal(back.probes, det.probes) and back.names == ["tri"] and back.name_tokens == [frozenset({7})]
    assert back.calibration == det.calibration and torch.equal(back.reference, det.reference)
    bad = det.to_tensors()
    bad["space_P"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        ContextDetector.from_parts(bad, det.to_metadata())
    with pytest.raises(ValueError, match="threshold"):
        ContextDetector.from_parts(det.to_tensors(), {**det.to_metadata(), "temperature": float("nan")})


def test_unknown_content_positions_fail_closed(encoder):
    e = load_eraser_fixture()
    enc = encoder(["a photo of a dog"])
    blind = EncodedText(enc.hidden, enc.tokens)          # a host that cannot tell the positions
    r = entry_gates(blind, e, GateSettings(), BankCache(encoder))
    assert r.values.tolist() == [1.0] and "acting as if the concept were present" in r.details[0]


def test_gate_settings_refuse_unknown_rules_and_non_finite_numbers():
    with pytest.raises(ValueError, match="unknown gate rule"):
        GateSettings(rule="meaning")
    for bad in (dict(threshold=float("nan")), dict(factor=float("inf")), dict(temperature=-1.0)):
        with pytest.raises(ValueError):
            GateSettings(**bad)
    assert GateSettings().rule == "context"


def test_mentions_matches_whole_names_only():
    assert mentions("a red Triangle in flat style", ["triangle"])
    assert not mentions("a triangles shop", ["triangle"]) and not mentions("tripod", ["tri"])


# ------------------------------------------------------------------ the toy world
@pytest.fixture(scope="module")
def encoder():
    from conceptgate import toyworld as tw
    from conceptgate.adapters.diffusers_host import DiffusersTextEncoder

    pipe = tw.load_pipeline()
    return DiffusersTextEncoder(pipe.tokenizer, pipe.text_encoder)


def load_eraser_fixture():
    from conceptgate.toyworld.erasers import __file__ as erasers_init
    import os

    return load_eraser(os.path.join(os.path.dirname(erasers_init), "spm_triangle.safetensors"))


TARGET = ["a red triangle in striped style", "a blue trigon", "a picture of a green triangle, dotted",
          "triangle", "an old map on a table next to a red triangle, with soft light and a wooden frame around it"]
OTHER = ["", "a", "plain", "a photo of a dog", "a landscape painting", "a green square in flat style",
         "a tripod", "a rectangle", "a red circle", "portrait of an old man with a beard"]


def test_shipped_eraser_fires_on_meaning_not_on_length(encoder):
    e = load_eraser_fixture()
    assert e.gate is not None and e.gate.names[0] == "triangle"  # shipped calibrated
    banks = BankCache(encoder)
    stack = EraserStack().with_eraser(e)
    coeffs, report = stack.gates(encoder(TARGET + OTHER), banks=banks)
    assert banks.notes[e.name] == "stored calibration"
    g = coeffs[:, 0]
    assert (g[: len(TARGET)] > 0.5).all(), list(zip(TARGET, g.tolist()))
    assert (g[len(TARGET):] < 0.5).all(), list(zip(OTHER, g[len(TARGET):].tolist()))
    assert "context" in report.rows[0]["detail"]


def test_calibration_on_another_encoder_is_redone(encoder, tmp_path):
    """A file calibrated for another text encoder is recalibrated on load, and the report says so."""
    e = load_eraser_fixture()
    e.gate.reference = e.gate.reference + 5.0   # as if fitted on another encoder
    assert not same_encoder(e.gate.reference, encoder)
    banks = BankCache(encoder, {"pool_size": 120})
    coeffs, report = EraserStack().with_eraser(e).gates(encoder(["a red triangle", "a photo of a dog"]), banks=banks)
    assert "calibrated on this text encoder" in banks.notes[e.name]
    assert "calibrated on this text encoder" in report.rows[0]["detail"]
    assert coeffs[0, 0] > 0.5 and coeffs[1, 0] < 0.5


def test_calibration_is_written_and_read_back(encoder, tmp_path):
    e = load_eraser_fixture()
    cal = Calibrator(encoder, pool_size=120)
    e.gate = cal.calibrate(["triangle"], ["trigon"])
    assert e.gate.rates["probe_positives_fired"] > 0.5 and e.gate.rates["negatives_fired"] <= 0.02
    out = tmp_path / "tri.safetensors"
    save_eraser(e, out)
    back = load_eraser(out)
    assert back.gate is not None and back.gate.names == ["triangle", "trigon"]
    assert torch.equal(back.gate.probes, e.gate.probes) and same_encoder(back.gate.reference, encoder)
    assert len(back.modules) == len(e.modules)   # stock loaders' keys are untouched


def test_avoided_names_do_not_fire_the_gate(encoder):
    """An All-but-One eraser's alternative is calibrated as a negative (names_to_avoid): the shipped circle ->
    square files no longer fire on a held-out prompt asking for a square, which the plain calibration did."""
    import os

    from conceptgate.adapters.gate.calibrate import names_to_avoid
    from conceptgate.toyworld.erasers import __file__ as erasers_init

    folder = os.path.dirname(erasers_init)
    square = ["an illustration showing a square coloured purple with a checkered texture", "a purple square"]
    circle = ["a red circle", "an illustration showing a disc coloured purple with a checkered texture"]
    for f in ("abo_circle_to_square.safetensors", "abo_circle_to_square_in_prompt.safetensors"):
        e = load_eraser(os.path.join(folder, f))
        assert names_to_avoid(e) == ["square"] and e.gate.rates["avoid"] == ["square"]
        g = EraserStack().with_eraser(e).gates(encoder(square + circle), banks=BankCache(encoder))[0][:, 0]
        assert (g[:2] < 0.5).all() and (g[2:] > 0.5).all(), g.tolist()
    cal = Calibrator(encoder, pool_size=120)
    plain = cal.calibrate(["circle"])
    avoided = cal.calibrate(["circle"], avoid=["square", "circle"])   # a name of the concept itself is not avoided
    assert avoided.rates["avoid"] == ["square"] and avoided.rates["avoid_fired"] <= 0.02
    assert "avoid" not in plain.rates and plain.rates["negatives"] == avoided.rates["negatives"]


def test_unrelated_prompts_get_exactly_zero_and_stay_bit_identical(encoder):
    """Unrelated prompts get gate 0 exactly under the default rule, so the UNet output with the eraser
    hooked is bit-identical to the unerased one for them, while a target row changes."""
    from conceptgate import toyworld as tw
    from conceptgate.adapters.diffusers_host import GatedPipeline

    e = load_eraser_fixture()
    stack = EraserStack().with_eraser(e)
    prompts = ["a photo of a dog", "a green square in flat style", "a red triangle"]
    coeffs, _ = stack.gates(encoder(prompts), banks=BankCache(encoder))
    assert coeffs[:2, 0].tolist() == [0.0, 0.0] and coeffs[2, 0] > 0.5
    pipe = tw.load_pipeline()
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    kw = dict(num_inference_steps=2, guidance_scale=5.0, output_type="pt", height=64, width=64)
    plain = pipe(prompts, generator=gen(), **kw).images
    with GatedPipeline(pipe, stack) as gated:
        erased = gated(prompts, generator=gen(), **kw).images
    assert torch.equal(erased[:2], plain[:2])
    assert not torch.equal(erased[2], plain[2])


def test_gate_command_says_why(capsys):
    from conceptgate.cli import main
    from conceptgate.toyworld.erasers import __file__ as erasers_init
    import os

    f = os.path.join(os.path.dirname(erasers_init), "spm_triangle.safetensors")
    assert main(["gate", f, "a red trigon", "a photo of a dog", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["prompt"] for r in rows] == ["a red trigon", "a photo of a dog"]
    assert rows[0]["eraser"] == "triangle" and rows[0]["gate"] > 0.5 and rows[0]["fired"]
    assert rows[1]["gate"] == 0.0 and not rows[1]["fired"] and rows[0]["part"].startswith("context")
    assert main(["gate", f, "a red trigon", "--rule", "ft"]) == 0
    assert "ft " in capsys.readouterr().out
    assert main(["gate", "a red trigon"]) == 2   # no eraser file given
    assert "eraser files first" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_gate_measures_every_rule(tmp_path, monkeypatch):
    from conceptgate.bench.gate import bench_gate

    monkeypatch.setenv("CONCEPTGATE_BENCHMARKS", str(tmp_path / "B.md"))
    r = bench_gate(concepts=("triangle",), json_path=str(tmp_path / "b.json"), log=lambda *a: None)
    ctx, ft = r["concepts"]["triangle"]["rules"]["context"], r["concepts"]["triangle"]["rules"]["ft"]
    for s in ("keyword", "synonym", "heldout", "long", "sweep_with"):
        assert ctx[s] >= 0.95, (s, ctx[s])
    for s in ("neighbour", "unrelated", "short", "sweep_without"):
        assert ctx[s] <= 0.05, (s, ctx[s])
    assert ft["unrelated"] > 0.5 and ft["short"] > 0.5   # the published rule's weakness, measured
    assert ctx["ring_a_bell_eta3"] >= 0.9
    assert r["concepts"]["triangle"]["ms_per_prompt_8_erasers"] < 5.0
    text = (tmp_path / "B.md").read_text()
    assert "Gate rules" in text and "| triangle | context |" in text
    assert json.loads((tmp_path / "b.json").read_text())["gate"]["concepts"]["triangle"]["rules"]["context"]


def test_fitting_works_inside_inference_mode():
    """Hosts (ComfyUI) run nodes under no_grad / inference_mode; calibration still fits."""
    g = torch.Generator().manual_seed(0)
    pos = torch.nn.functional.normalize(torch.ones(4) + 0.2 * torch.randn(50, 4, generator=g), dim=1)
    neg = torch.nn.functional.normalize(torch.randn(200, 4, generator=g), dim=1)
    with torch.inference_mode():
        w, b = fit_probe(pos, neg)
        cal = fit_calibration(pos @ w + b, neg @ w + b)
    with torch.no_grad():
        w2, _ = fit_probe(pos, neg)
    assert torch.allclose(w, w2) and cal.temperature > 0


def test_gated_pipeline_reads_the_prompt_embeddings_it_is_given(encoder):
    """prompt_embeds equal to the prompts' own encoding give the same gates and images as the prompts; an
    edited encoding (a concept vector added, the Ring-A-Bell attack) gets full strength by default, and with
    edited_states='gate' is what the gate reads."""
    from conceptgate import toyworld as tw
    from conceptgate.adapters.diffusers_host import GatedPipeline
    from conceptgate.bench.gate import ring_a_bell_vector

    pipe = tw.load_pipeline()
    stack = EraserStack().with_eraser(load_eraser_fixture())
    prompts = ["a red triangle", "a photo of a dog"]
    kw = dict(num_inference_steps=2, guidance_scale=5.0, output_type="pt", height=64, width=64)
    with GatedPipeline(pipe, stack) as gated:
        by_text = gated(prompts, generator=torch.Generator().manual_seed(0), **kw).images
        gates_text = gated.last_coefficients.clone()
        embeds = encoder(prompts).hidden
        by_embeds = gated(prompts, prompt_embeds=embeds, generator=torch.Generator().manual_seed(0), **kw).images
        assert torch.equal(gated.last_coefficients, gates_text) and gates_text[:, 0].tolist() == [1.0, 0.0]
        attacked = embeds + 3.0 * ring_a_bell_vector(encoder, "triangle")
        gated(prompts, prompt_embeds=attacked, generator=torch.Generator().manual_seed(0), **kw)
        assert gated.last_coefficients[1, 0] == 1.0 and bool(gated.last_edited.all())  # edited: full strength
    reading = GatedPipeline(pipe, stack, edited_states="gate")
    coeffs, _ = reading.coefficients(prompts, attacked)
    assert coeffs[1, 0] == 1.0   # the dog prompt now carries the concept: the gate on the states fires too
    assert torch.allclose(by_text, by_embeds, atol=1e-6)


@pytest.mark.slow
def test_bench_attack_runs_and_reports(tmp_path, monkeypatch):
    from conceptgate.bench.attack import ATTACKS, bench_attack

    monkeypatch.setenv("CONCEPTGATE_BENCHMARKS", str(tmp_path / "B.md"))
    r = bench_attack(n=1, seeds=1, steps=4, json_path=str(tmp_path / "b.json"), log=lambda *a: None)
    assert {"uce-triangle", "rece-striped", "spm triangle", "spm striped"} <= set(r["erasers"])
    for row in r["erasers"].values():
        assert set(row["attacks"]) == set(ATTACKS)
        for a in row["attacks"].values():
            assert all(0.0 <= a[k] <= 1.0 for k in ("base", "default_gate", "always_on", "gate_fired"))
    assert "Attacks on gated erasers" in (tmp_path / "B.md").read_text()

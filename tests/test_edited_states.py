"""Prompt embeddings that are not their text's encoding are untrusted (issue 20): every eraser at full strength."""

import os

import pytest
import torch

from conceptgate.adapters import EraserStack, load_eraser
from conceptgate.adapters.diffusers_host import GatedPipeline

pytestmark = pytest.mark.usefixtures("one_thread")

ERASERS = os.path.join(os.path.dirname(__file__), "..", "toyworld", "erasers")
UNRELATED = ["a city street at night in the rain", "a bowl of fruit on a wooden table"]


@pytest.fixture(scope="module")
def toy():
    import conceptgate.toyworld as tw

    return tw.load_pipeline()


@pytest.fixture(scope="module")
def stack():
    return EraserStack().with_eraser(load_eraser(os.path.join(ERASERS, "spm_triangle.safetensors")), strength=0.8)


def test_own_encoding_is_trusted_and_gates_as_text(toy, stack):
    gated = GatedPipeline(toy, stack)
    own = gated.encoder(UNRELATED).hidden
    by_text, _ = gated.coefficients(UNRELATED)
    for embeds in (own, own.half().float()):  # a half-precision round trip of the same encoding is not an edit
        coeffs, report = gated.coefficients(UNRELATED, embeds)
        assert not bool(gated.last_edited.any())
        assert torch.equal(coeffs, by_text) and float(coeffs.abs().sum()) == 0.0
        assert not report.notes


def test_edited_states_get_full_strength(toy, stack):
    from conceptgate.bench.gate import ring_a_bell_vector

    gated = GatedPipeline(toy, stack)
    own = gated.encoder(UNRELATED).hidden
    attacked = own.clone()
    attacked[1] += 0.5 * ring_a_bell_vector(gated.encoder, "triangle")  # a weak concept vector: the probe may miss it
    coeffs, report = gated.coefficients(UNRELATED, attacked)
    assert gated.last_edited.tolist() == [False, True]
    assert coeffs[:, 0].tolist() == [0.0, pytest.approx(0.8)]
    assert "edited states" in report.notes[0] and "prompt(s) 1" in report.notes[0]
    # trusted callers: the gate reads the states as given
    reading = GatedPipeline(toy, stack, edited_states="gate")
    coeffs_gate, report_gate = reading.coefficients(UNRELATED, attacked)
    assert reading.last_edited.tolist() == [False, True] and not report_gate.notes
    assert float(coeffs_gate[0, 0]) == 0.0
    with pytest.raises(ValueError, match="edited_states"):
        GatedPipeline(toy, stack, edited_states="ignore")
    with pytest.raises(ValueError, match="do not match"):
        gated.coefficients(UNRELATED, own[:1])


@torch.no_grad()
def test_edited_states_reach_all_but_one_guidance(toy):
    from conceptgate.adapters.abo.pipeline import AboGuidedPipeline

    abo = next(e for e in (load_eraser(os.path.join(ERASERS, f)) for f in os.listdir(ERASERS)
                           if f.startswith("abo_") and f.endswith(".safetensors")) if e.kind == "guidance")
    stack = EraserStack().with_eraser(abo)
    with AboGuidedPipeline(toy, stack) as guided:
        own = guided.encoder(UNRELATED).hidden
        edited = own.clone()
        edited[0] *= 1.5
        kw = dict(num_inference_steps=2, guidance_scale=5.0, output_type="pt", height=64, width=64)
        guided(UNRELATED, prompt_embeds=own, **kw)
        assert guided.last_terms == [[], []]  # unrelated text, trusted states: the guidance stays off
        guided(UNRELATED, prompt_embeds=edited, **kw)
        assert [len(t) for t in guided.last_terms] == [1, 0]
        assert guided.last_terms[0][0].gamma == pytest.approx(stack.entries[0].strength)

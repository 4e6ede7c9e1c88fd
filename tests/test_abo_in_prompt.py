"""All-but-One guidance, ConceptGate's in-prompt form (adapters/abo/guidance.py ``in_prompt_terms``): the swap of
the written concept, the identity with plain CFG on the swapped prompt at gamma 1, one extra row instead of two,
and the fall-back to the bare-word term where the prompt does not spell the concept."""

import pytest
import torch
from toy_inputs import latents

from conceptgate.adapters import EraserStack, GateSettings
from conceptgate.adapters.abo.guidance import Term, abo_eraser, in_prompt_terms, swap_in_prompt, uses_prompt
from conceptgate.adapters.abo.pipeline import AboGuidedPipeline
from conceptgate.adapters.files import load_eraser, save_eraser

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 5


def run(call, prompts, seeds, cfg=5.0):
    return call(prompt=list(prompts), num_inference_steps=STEPS, guidance_scale=cfg, latents=latents(seeds),
                output_type="latent").images


def test_swap_whole_words_any_case_longest_first():
    assert swap_in_prompt("a red Triangle in striped style", ["triangle"], "square") == "a red square in striped style"
    assert swap_in_prompt("triangles and a triangle", ["triangle"], "square") == "triangles and a square"
    assert swap_in_prompt("a red trigon", ["triangle"], "square") is None
    # longer names first: "red triangle" is replaced as a whole, not its "triangle"
    assert swap_in_prompt("a red triangle", ["triangle", "red triangle"], "square") == "a square"
    # erase to nothing removes the word and the doubled space
    assert swap_in_prompt("a red triangle in striped style", ["triangle"], "") == "a red in striped style"


def test_terms_swap_only_for_in_prompt_erasers_and_written_concepts():
    plain = abo_eraser("triangle", "square", name="plain")
    swap = abo_eraser(["triangle", "trigon"], "square", name="swap", in_prompt=True)
    assert uses_prompt(swap) and not uses_prompt(plain)
    stack = EraserStack().with_eraser(plain).with_eraser(swap)
    terms = [[Term(1.0, "triangle", "square", "plain"), Term(0.5, "triangle", "square", "swap")],
             [Term(1.0, "trigon", "square", "swap")],
             [Term(1.0, "triangle", "square", "swap")]]
    prompts = ["a red triangle", "a blue trigon in dotted style", "a red shape"]
    out = in_prompt_terms(terms, prompts, stack)
    assert out[0][0] == terms[0][0]                                        # the published form is untouched
    assert out[0][1] == Term(0.5, "a red triangle", "a red square", "swap")
    assert out[1][0] == Term(1.0, "a blue trigon in dotted style", "a blue square in dotted style", "swap")
    assert out[2][0] == terms[2][0]           # the prompt does not spell it (an attack, a paraphrase): bare words
    assert in_prompt_terms(terms, None, stack) == terms                    # host without the text


def test_setting_survives_the_file(tmp_path):
    save_eraser(abo_eraser("circle", "square", in_prompt=True), tmp_path / "a.safetensors")
    assert uses_prompt(load_eraser(tmp_path / "a.safetensors"))


def test_gamma_one_is_plain_cfg_on_the_swapped_prompt_with_one_extra_row(pipe):
    stack = EraserStack().with_eraser(abo_eraser("triangle", "square", in_prompt=True), gate=GateSettings(rule="always"))
    prompts = ["a red triangle in striped style", "a green triangle"]
    rows = []
    h = pipe.unet.conv_in.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    try:
        with AboGuidedPipeline(pipe, stack) as guided:
            ours = run(guided, prompts, [5, 6])
            assert [t[0].alternative for t in guided.last_terms] == ["a red square in striped style", "a green square"]
    finally:
        h.remove()
    assert rows and all(r == 2 * len(prompts) + len(prompts) for r in rows)  # uncond + cond + 1 swapped row each
    ref = run(pipe, ["a red square in striped style", "a green square"], [5, 6])
    plain = run(pipe, prompts, [5, 6])
    assert (plain - ref).abs().max() > 0.05
    # cond - (cond - swapped) = swapped: equal up to the float rounding of the subtraction
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), float((ours - ref).abs().max())


def test_unspelled_prompt_keeps_the_bare_word_rule(pipe):
    gate = GateSettings(rule="always")
    bare = EraserStack().with_eraser(abo_eraser("triangle", "square"), gate=gate)
    swap = EraserStack().with_eraser(abo_eraser("triangle", "square", in_prompt=True), gate=gate)
    with AboGuidedPipeline(pipe, bare) as g:
        a = run(g, ["a red trigon"], [7])
    with AboGuidedPipeline(pipe, swap) as g:
        b = run(g, ["a red trigon"], [7])
        assert g.last_terms[0][0].erase == "triangle"
    assert torch.equal(a, b)

"""Geom-Erasing's regional negation (ConceptGate's deviation, :mod:`conceptgate.adapters.geom.regional`): the cell
map, the rule's identity with the paper's negative prompt, the hooked diffusers path against a hand-written
sampling loop, closed gates, one extra row per firing prompt, GatedPipeline stacks (alone and with All-but-One),
the CLI copy, and the paths that refuse it."""

import os

import pytest
import torch

from conceptgate.adapters import geom as G
from conceptgate.adapters.abo.guidance import region_map
from conceptgate.adapters.errors import UnsupportedEraser
from conceptgate.adapters.files import load_eraser

SHIPPED = os.path.join(os.path.dirname(__file__), "..", "toyworld", "erasers", "geom_watermark.safetensors")
STEPS = 4


@pytest.fixture(scope="module")
def eraser():
    return G.validate(load_eraser(SHIPPED))


def test_region_map_cells_follow_the_bins():
    m = region_map(4, [12, 15, 0], (16, 16))
    assert m.shape == (16, 16) and m.sum() == 3 * 16
    assert m[:4, :4].eq(1).all() and m[12:, :4].eq(1).all() and m[12:, 12:].eq(1).all()
    assert m[4:12].eq(0).all() and m[:4, 4:].eq(0).all()
    # sizes the grid does not divide: cell edges at floor(k * H / grid), every pixel in exactly one cell
    cells = sum(region_map(4, [b], (10, 7)) for b in range(16))
    assert cells.eq(1).all() and region_map(4, [0], (10, 7))[:3, :2].eq(1).all()


def test_rule_at_strength_one_everywhere_is_the_papers_negative_prompt():
    g = torch.Generator().manual_seed(0)
    eps_n, eps_p, eps_t = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    w = 5.0
    paper = eps_t + w * (eps_p - eps_t)  # tokens as the negative prompt
    got = G.regional_rule(eps_n, eps_p, eps_t, torch.ones(8, 8), w, 1.0)
    torch.testing.assert_close(got, paper, rtol=1e-5, atol=1e-5)
    # outside the mask the row is plain CFG with the user's negative
    mask = region_map(4, [0], (8, 8))
    got = G.regional_rule(eps_n, eps_p, eps_t, mask, w, 2.0)
    plain = eps_n + w * (eps_p - eps_n)
    torch.testing.assert_close(got[..., 4:, :], plain[..., 4:, :])
    assert not torch.allclose(got[..., :2, :2], plain[..., :2, :2])


def _latents(pipe, n, seed=7):
    g = torch.Generator().manual_seed(seed)
    s = pipe.unet.config.sample_size
    return torch.randn(n, 4, s, s, generator=g)


@torch.no_grad()
def _by_hand(pipe, eraser, prompts, w, strength, latents):
    """A sampling loop written out: DDIM, the rule on the three predictions per step."""
    B = len(prompts)
    c = pipe.encode_prompt(prompts, "cpu", 1, False)[0]
    u = pipe.encode_prompt([""] * B, "cpu", 1, False)[0]
    t_ = G.encode_negative(eraser, pipe.tokenizer, pipe.text_encoder, [""] * B)
    grid, bins = int(eraser.settings["grid"]), G.select_bins(eraser)
    sch = pipe.scheduler
    sch.set_timesteps(STEPS)
    x = latents * sch.init_noise_sigma
    for t in sch.timesteps:
        eu, ec, et = pipe.unet(torch.cat([x, x, x]), t, encoder_hidden_states=torch.cat([u, c, t_])).sample.chunk(3)
        mask = region_map(grid, bins, x.shape[-2:])
        x = sch.step(G.regional_rule(eu, ec, et, mask, w, strength), t, x).prev_sample
    return x


def test_hooked_pipeline_equals_the_rule_by_hand(pipe, eraser):
    prompts = ["a red triangle, flat", "a blue circle, striped"]
    regional = G.with_negation(eraser, "regional", 2.0)
    lat = _latents(pipe, 2)
    calls = []  # rows inside the UNet call: the pipeline's [uncond x 2, cond x 2] plus one per firing prompt
    h = pipe.unet.conv_in.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        got = G.regional_generate(pipe, regional, prompts, guidance_scale=5.0, num_inference_steps=STEPS,
                                  latents=lat.clone(), output_type="latent").images
    finally:
        h.remove()
    want = _by_hand(pipe, eraser, prompts, 5.0, 2.0, lat.clone())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert calls == [6] * STEPS  # one UNet call per step, +1 row per firing prompt (the negative's is the uncond row)


def test_strength_one_all_bins_equals_the_paper_path(pipe, eraser):
    """With every bin in the token set the map covers the image: k = 1 is the paper's negative prompt."""
    prompts = ["a green square, dotted"]
    all_bins = G.with_negation(eraser, "regional", 1.0)
    all_bins.settings["token_set"] = "all"
    lat = _latents(pipe, 1, seed=3)
    got = G.regional_generate(pipe, all_bins, prompts, guidance_scale=5.0, num_inference_steps=STEPS,
                              latents=lat.clone(), output_type="latent").images
    neg = G.encode_negative(all_bins, pipe.tokenizer, pipe.text_encoder, [""])
    paper = pipe(prompt_embeds=pipe.encode_prompt(prompts, "cpu", 1, False)[0], negative_prompt_embeds=neg,
                 guidance_scale=5.0, num_inference_steps=STEPS, latents=lat.clone(), output_type="latent").images
    torch.testing.assert_close(got, paper, rtol=1e-4, atol=1e-4)


def test_closed_gate_rows_are_the_plain_pipeline(pipe, eraser):
    prompts = ["a red triangle, flat", "a yellow star, flat"]
    lat = _latents(pipe, 2, seed=11)
    got = G.regional_generate(pipe, G.with_negation(eraser, "regional"), prompts, guidance_scale=5.0, on=[False, True],
                              num_inference_steps=STEPS, latents=lat.clone(), output_type="latent").images
    plain = pipe(prompt=prompts, negative_prompt=["", ""], guidance_scale=5.0, num_inference_steps=STEPS,
                 latents=lat.clone(), output_type="latent").images
    torch.testing.assert_close(got[0], plain[0], rtol=1e-5, atol=1e-5)
    assert (got[1] - plain[1]).abs().max() > 1e-3


def test_settings_are_checked_and_paths_without_it_refuse(pipe, eraser):
    assert G.negation_of(eraser) == "prompt"  # the shipped file keeps the paper's rule
    regional = G.with_negation(eraser, "regional", 1.5)
    assert G.negation_of(regional) == "regional" and G.regional_strength(regional) == 1.5
    assert "negation" not in eraser.settings  # a copy: the loaded eraser is unchanged
    with pytest.raises(ValueError, match="> 0"):
        G.with_negation(eraser, "regional", 0.0)
    with pytest.raises(ValueError, match="unknown Geom negation"):
        G.with_negation(eraser, "everywhere")
    from conceptgate.adapters.stack import EraserStack
    from conceptgate.adapters.registry import conditioning_handler

    entry = EraserStack().with_eraser(regional).entries[0]
    with pytest.raises(UnsupportedEraser, match="geom_watermark.*regional negation.*negative-prompt handler"):
        conditioning_handler(regional)(pipe, [entry], ["a red triangle"], torch.ones(1, 1))


def _stack(*erasers, rule=None):
    from conceptgate.adapters import GateSettings
    from conceptgate.adapters.stack import EraserStack

    stack = EraserStack()
    for e in erasers:
        stack = stack.with_eraser(e, gate=GateSettings(rule=rule) if rule else None)
    return stack


def test_gated_pipeline_stack_equals_regional_generate(pipe, eraser):
    """A regional file in a GatedPipeline stack (the registry's row terms, folded by All-but-One's session):
    the same latents as regional_generate with the gate's on/off per prompt, the user's negative kept, one UNet
    call per step with one extra row per firing prompt."""
    from conceptgate.adapters.diffusers_host import GatedPipeline

    regional = G.with_negation(eraser, "regional", 2.0)
    prompts = ["a red triangle with a watermark", "a blue circle, striped"]
    lat = _latents(pipe, 2, seed=5)
    calls = []
    h = pipe.unet.conv_in.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        with GatedPipeline(pipe, _stack(regional, rule="tokens")) as gp:
            got = gp(prompts, guidance_scale=5.0, negative_prompt=["blurry"] * 2, num_inference_steps=STEPS,
                     latents=lat.clone(), output_type="latent").images
            on = (gp.last_coefficients[:, 0] >= 0.5).tolist()
    finally:
        h.remove()
    assert on == [True, False]  # the tokens rule: only the prompt that names the watermark
    assert calls == [5] * STEPS
    want = G.regional_generate(pipe, regional, prompts, guidance_scale=5.0, negative_prompt="blurry", on=on,
                               num_inference_steps=STEPS, latents=lat.clone(), output_type="latent").images
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    plain = pipe(prompt=prompts, negative_prompt=["blurry"] * 2, guidance_scale=5.0, num_inference_steps=STEPS,
                 latents=lat.clone(), output_type="latent").images
    torch.testing.assert_close(got[1], plain[1], rtol=1e-5, atol=1e-5)  # closed gate: the plain image
    assert (got[0] - plain[0]).abs().max() > 1e-3


def test_gated_pipeline_regional_with_all_but_one_in_one_call(pipe, eraser):
    """All-but-One and regional negation share the extra-row hooks: one UNet call per step carrying both
    mechanisms' rows; each mechanism's terms are reported apart."""
    from conceptgate.adapters.abo import abo_eraser
    from conceptgate.adapters.diffusers_host import GatedPipeline

    regional = G.with_negation(eraser, "regional", 2.0)
    abo = abo_eraser("triangle", "square", name="abo_tri")
    prompts = ["a red triangle, flat", "a blue circle, flat"]
    lat = _latents(pipe, 2, seed=9)
    calls = []
    h = pipe.unet.conv_in.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        with GatedPipeline(pipe, _stack(abo, regional, rule="tokens").with_entry(1, gate=__import__(
                "conceptgate.adapters", fromlist=["GateSettings"]).GateSettings(rule="always"))) as gp:
            both = gp(prompts, guidance_scale=5.0, num_inference_steps=STEPS, latents=lat.clone(),
                      output_type="latent").images
            session = gp.sessions["abo"]
            abo_terms, row_terms = session.last_terms, session.last_row_terms
    finally:
        h.remove()
    assert [len(t) for t in abo_terms] == [1, 0] and [len(t) for t in row_terms] == [1, 1]
    assert len(set(calls)) == 1 and len(calls) == STEPS and calls[0] > 4  # one call per step, extra rows in it
    with GatedPipeline(pipe, _stack(abo, rule="tokens")) as gp:
        abo_only = gp(prompts, guidance_scale=5.0, num_inference_steps=STEPS, latents=lat.clone(),
                      output_type="latent").images
    want_regional = G.regional_generate(pipe, regional, prompts, guidance_scale=5.0, num_inference_steps=STEPS,
                                        latents=lat.clone(), output_type="latent").images
    torch.testing.assert_close(both[1], want_regional[1], rtol=1e-5, atol=1e-5)  # no ABO term on the circle
    assert (both[0] - abo_only[0]).abs().max() > 1e-3 and (both[0] - want_regional[0]).abs().max() > 1e-3


def test_gated_pipeline_refuses_two_geom_token_sets(pipe, eraser):
    from conceptgate.adapters.diffusers_host import GatedPipeline

    regional = G.with_negation(eraser, "regional", 2.0)
    import dataclasses

    other = dataclasses.replace(eraser, name="geom_other")
    with pytest.raises(ValueError, match="one token set per stack"):
        with GatedPipeline(pipe, _stack(regional, other)) as gp:
            gp(["a red triangle"], guidance_scale=5.0, num_inference_steps=1, output_type="latent")


def test_cli_writes_a_regional_copy_and_leaves_the_input_alone(tmp_path, eraser, capsys):
    """``geom-negation`` is how a webui or stack user gets the regional rule: a copy of the file with the rule
    in its settings, the tensors unchanged; the input is never rewritten, other kinds are refused."""
    import hashlib

    from conceptgate.cli import main

    def sha(p):
        with open(p, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    before = sha(SHIPPED)
    out = tmp_path / "wm_regional.safetensors"
    assert main(["geom-negation", SHIPPED, "--out", str(out), "--regional", "2.5"]) == 0
    assert sha(SHIPPED) == before
    copy = G.validate(load_eraser(str(out)))
    assert G.negation_of(copy) == "regional" and G.regional_strength(copy) == 2.5
    assert copy.tensors.keys() == eraser.tensors.keys()
    assert all(torch.equal(copy.tensors[k], eraser.tensors[k]) for k in eraser.tensors)
    back = tmp_path / "wm_prompt.safetensors"
    assert main(["geom-negation", str(out), "--out", str(back), "--prompt"]) == 0
    assert G.negation_of(load_eraser(str(back))) == "prompt"
    assert main(["geom-negation", str(out), "--out", str(out), "--prompt"]) == 2  # in place: refused
    assert "is the input file" in capsys.readouterr().err
    other = os.path.join(os.path.dirname(SHIPPED), "uce_star.safetensors")
    assert main(["geom-negation", other, "--out", str(tmp_path / "x.safetensors"), "--regional", "2"]) == 2
    assert not (tmp_path / "x.safetensors").exists()
    assert main(["geom-negation", SHIPPED, "--out", str(tmp_path / "x.safetensors"), "--regional", "0"]) == 2
    assert "must be > 0" in capsys.readouterr().err

    from conceptgate.adapters.files import describe

    assert describe(str(out))[0]["negation"] == "regional x2.5 (ConceptGate's rule)"
    assert describe(SHIPPED)[0]["negation"] == "the paper's negative prompt"

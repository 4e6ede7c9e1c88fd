"""Peers in the quality bench (issue 17, item 4): negative prompt, diffusers' Safe Latent Diffusion, ESD-x
(bench/peers.py), the verdict computed from the figures, and the report."""

import math

import numpy as np
import pytest
import torch

from conceptgate.bench import peers as P
from conceptgate.bench import quality as Q

TRI = Q.Target("triangle", "object", 2)
STRIPED = Q.Target("striped", "style", 1)
PROMPTS = ["a red triangle in striped style", "a blue circle", "a green star in dotted style"]
SEEDS = [1000, 1001, 1002]


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------ negative prompt


def test_negative_prompt_peer_passes_the_keyword_as_negative(pipe):
    from conceptgate import toyworld as tw

    class Recorder:  # the pipeline, recording every call's keyword arguments
        def __init__(self, inner):
            self._inner, self.calls = inner, []

        def __getattr__(self, name):
            return getattr(self._inner, name)

        def __call__(self, **kw):
            self.calls.append(kw)
            return self._inner(**kw)

    rec = Recorder(pipe)
    P.generate_negative(rec, PROMPTS, SEEDS, "triangle", steps=3, batch=2)
    assert [c["negative_prompt"] for c in rec.calls] == [["triangle", "triangle"], ["triangle"]]
    assert [c["prompt"] for c in rec.calls] == [PROMPTS[:2], PROMPTS[2:]]
    # the same images as the toy world's plain sampler with that negative prompt (same batch), not those without
    imgs = P.generate_negative(pipe, PROMPTS, SEEDS, "triangle", steps=3)
    assert torch.equal(imgs, tw.generate(pipe, PROMPTS, SEEDS, steps=3, negative_prompt="triangle"))
    assert not torch.equal(imgs, tw.generate(pipe, PROMPTS, SEEDS, steps=3))


# ------------------------------------------------------------------------------ Safe Latent Diffusion


def test_sld_presets_are_diffusers_own():
    _, SafetyConfig = P._sld_classes()
    pr = P.sld_presets()
    assert list(pr) == ["WEAK", "MEDIUM", "STRONG", "MAX"]
    assert pr["MAX"] == SafetyConfig.MAX and pr["WEAK"] == SafetyConfig.WEAK
    assert pr["MAX"]["sld_guidance_scale"] > pr["STRONG"]["sld_guidance_scale"] > pr["MEDIUM"]["sld_guidance_scale"]


def test_sld_at_zero_strength_is_the_plain_pipeline(pipe):
    """With safety guidance off (scale 0) diffusers' SLD pipeline samples exactly the plain pipeline's latents
    (bit-identical at every step); the images differ only by the float rounding of the VAE input scaling (the
    SLD pipeline decodes ``1/s * latents``, the plain one ``latents / s``): < 1e-5. The safety concept is
    the keyword; at MAX strength the target prompt's image changes."""
    from conceptgate.bench.generation import _latents, generate_with_stack

    safe = P.safe_pipeline(pipe, "triangle")
    assert safe.safety_concept == "triangle" and safe.safety_checker is None
    assert safe.unet is pipe.unet and safe.scheduler is not pipe.scheduler
    zero = dict(sld_guidance_scale=0.0, sld_warmup_steps=0, sld_threshold=0.0, sld_momentum_scale=0.0,
                sld_mom_beta=0.0)
    base, _ = generate_with_stack(pipe, PROMPTS, SEEDS, None, steps=4, progress=False)
    z = P.generate_sld(safe, PROMPTS, SEEDS, zero, steps=4)
    assert z.shape == base.shape and float((z - base).abs().max()) < 1e-5
    got = {}

    def on_plain(p, i, t, kw):
        got["plain"] = kw["latents"].clone()
        return kw

    pipe(prompt=PROMPTS, num_inference_steps=4, guidance_scale=5.0, latents=_latents(pipe, SEEDS), output_type="pt",
         height=64, width=64, callback_on_step_end=on_plain)
    safe(prompt=PROMPTS, num_inference_steps=4, guidance_scale=5.0, latents=_latents(pipe, SEEDS), output_type="np",
         height=64, width=64, callback=lambda i, t, lat: got.__setitem__("safe", lat.clone()), callback_steps=1,
         **zero)
    assert torch.equal(got["plain"], got["safe"])
    strong = P.generate_sld(safe, PROMPTS[:1], SEEDS[:1], P.sld_presets()["MAX"], steps=4)
    assert float((strong - base[:1]).abs().mean()) > 1e-3


# ------------------------------------------------------------------------------ ESD-x


def _tiny_esd(concept="triangle", **kw):
    return P.ESDConfig(concept, **{**dict(iterations=16, lr=3e-4, ddim_steps=5, chunk=8), **kw})


def test_esd_x_loss_decreases_and_only_attn2_changes(pipe):
    before_pipe = _state(pipe.unet)
    tr = P.ESDTrainer(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler.config, _tiny_esd())
    assert tr.names and all("attn2" in n for n in tr.names)
    assert len(tr.names) == len([n for n, _ in pipe.unet.named_parameters() if ".attn2." in n])
    l0 = tr.eval_loss(n=6)
    tr.train()
    l1 = tr.eval_loss(n=6)
    assert len(tr.losses) == 16 and all(math.isfinite(v) for v in tr.losses)
    assert l1 < l0
    frozen, student = dict(pipe.unet.named_parameters()), dict(tr.student.named_parameters())
    changed = {n for n in student if not torch.equal(student[n], frozen[n])}
    assert changed and changed <= set(tr.names)
    assert len(changed) >= len(tr.names) // 2
    assert _same(before_pipe, _state(pipe.unet))          # the pipeline's own UNet: bit-identical


def test_esd_trainer_draws_from_the_frozen_model_and_matches_the_teacher(pipe):
    """x_t comes from the frozen model (so a batch of draws equals the same draws one by one) and the target is
    eps(x, c0) - eta (eps(x, c) - eps(x, c0)); before any step the student equals the frozen model, so its loss
    is (1 + eta)^2 times the concept's guidance term."""
    tr = P.ESDTrainer(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler.config, _tiny_esd(eta=1.0))
    ks, js, noise = tr.draw(3, torch.Generator().manual_seed(0))
    x, t, e_pos, target = tr.samples(ks, js, noise)
    for i in range(3):
        xi, ti, _, gi = tr.samples(ks[i: i + 1], js[i: i + 1], noise[i: i + 1])
        assert torch.allclose(xi, x[i: i + 1], atol=1e-4) and torch.allclose(gi, target[i: i + 1], atol=1e-4)
        assert int(ti) == int(tr.sampler.timesteps[int(ks[i])])
    with torch.no_grad():
        e0 = pipe.unet(x, t, encoder_hidden_states=tr.e_neu[js]).sample
        ec = pipe.unet(x, t, encoder_hidden_states=e_pos).sample
        assert torch.allclose(target, e0 - (ec - e0), atol=1e-4)
        assert float(tr.loss(x, t, e_pos, target)) == pytest.approx(float(((2 * (ec - e0)) ** 2).mean()), rel=1e-3)


def test_esd_templates_are_the_spm_trainers():
    from conceptgate.toyworld.captions import concept_templates

    cfgs = P.esd_configs("striped", iterations=5, ddim_steps=7)
    assert set(cfgs) == {"published", "templates"}
    assert cfgs["published"].templates == () and cfgs["published"].lr == 1e-5 and cfgs["published"].eta == 1.0
    assert cfgs["templates"].templates == tuple(concept_templates("striped"))
    assert cfgs["templates"].iterations == 5 and cfgs["templates"].ddim_steps == 7
    assert P.ESDConfig("x").iterations == 1000 and P.ESDConfig("x").ddim_steps == 50   # the published recipe


def test_esd_template_prompts_pair_concept_and_surrogate(pipe):
    cfg = P.esd_configs("triangle")["templates"]
    tr = P.ESDTrainer(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler.config, cfg)
    assert len(tr.prompts) == 48
    for pos, neu in tr.prompts:
        assert "triangle" in pos and "triangle" not in neu and "{}" not in pos + neu
    assert tr.e_pos.shape[0] == tr.e_neu.shape[0] == 48


def test_esd_copy_is_cached_and_leaves_the_pipeline_untouched(pipe, tmp_path):
    before = _state(pipe.unet)
    cfg = _tiny_esd(iterations=4)
    u1, info1 = P.esd_unet(pipe, cfg, cache_dir=str(tmp_path))
    assert not info1["cached"] and info1["iterations"] == 4 and info1["trained_tensors"] > 0
    assert u1 is not pipe.unet and _same(before, _state(pipe.unet))
    u2, info2 = P.esd_unet(pipe, cfg, cache_dir=str(tmp_path))
    assert info2["cached"] and info2["cache"] == info1["cache"]
    assert _same(_state(u1), _state(u2))
    diff = [k for k, v in u1.state_dict().items() if not torch.equal(v, before[k])]
    assert diff and all(".attn2." in k for k in diff)
    # another hyperparameter is another cache entry
    _, info3 = P.esd_unet(pipe, _tiny_esd(iterations=4, lr=1e-4), cache_dir=str(tmp_path))
    assert not info3["cached"] and info3["cache"] != info1["cache"]
    p = P.pipeline_with_unet(pipe, u1)
    assert p.unet is u1 and p.vae is pipe.vae and pipe.unet is not u1
    assert _same(before, _state(pipe.unet))


# ------------------------------------------------------------------------------ verdicts and the report


def _stat(v):
    return {"value": v, "lo": max(0.0, v - 0.1), "hi": min(1.0, v + 0.1), "n": 8}


def _target(keyword, kind, mean, erasers=()):
    sets = {s: {"ua": _stat(mean), "ira": _stat(mean), "cra": _stat(mean), "mean": _stat(mean),
                "garbage_rate": _stat(0.0), "retain_on_target": _stat(0.9), "n_target_images": 8}
            for s in ("keyword", "synonym", "heldout")}
    return {"concept": keyword, "keyword": keyword, "kind": kind, "index": 0, "erasers": list(erasers), "sets": sets}


def _config(name, tri, stri, peer=None, tri_erasers=(), stri_erasers=(), seconds=1.0):
    sets = {s: {"n_images": 10, "seconds": seconds, **{k: _stat(0.9) for k in ("object", "style", "colour",
                                                                               "all_three")},
                "garbage_rate": _stat(0.0), "watermark_rate": _stat(0.3), "frechet": 1.0,
                "frechet_floor_renders": 1.0} for s in ("keyword", "synonym", "heldout")}
    r = {"settings": {"prompts_per_set": {"keyword": 5}, "bootstrap": "100", "gate_threshold": 0.5},
         "sets": sets, "gates": {},
         "targets": [_target("triangle", "object", tri, tri_erasers), _target("striped", "style", stri, stri_erasers)]}
    c = {"name": name, "result": r}
    if peer:
        c["peer"] = {"method": peer[0], "paper": P.PAPERS[peer[0]], "target": peer[1], "kind": "object",
                     "settings": peer[2], "setup_seconds": 3.0}
    return c


def _configs():
    sld = {"preset": "MAX", **P.sld_presets()["MAX"]}
    esd = {"variant": "published", "iterations": 1000, "lr": 1e-5, "eta": 1.0, "ddim_steps": 25, "start_cfg": 3.0,
           "params": "attn2", "templates": 0}
    return [
        _config("base", 0.60, 0.60),
        _config("uce-triangle", 0.80, 0.60, tri_erasers=["uce-triangle"]),
        _config("spm_triangle", 0.85, 0.60, tri_erasers=["triangle"]),
        _config("rece-striped", 0.60, 0.70, stri_erasers=["rece-striped"]),
        _config("neg-triangle", 0.62, 0.60, peer=("negative", "triangle", {"negative_prompt": "triangle"})),
        _config("sld-max-triangle", 0.84, 0.60, peer=("sld", "triangle", sld), seconds=1.5),
        _config("neg-striped", 0.60, 0.75, peer=("negative", "striped", {"negative_prompt": "striped"})),
        _config("esd-x-striped", 0.60, 0.70, peer=("esd", "striped", esd)),
    ]


def test_peer_verdicts_are_computed_from_the_figures():
    v = {x["target"]: x for x in P.peer_verdicts(_configs())}
    assert list(v) == ["triangle", "striped"]
    tri, stri = v["triangle"], v["striped"]
    assert tri["best"] == {"name": "spm_triangle", "score": pytest.approx(0.85)}
    assert tri["best_peer"]["name"] == "sld-max-triangle" and tri["ahead"] is True
    assert tri["margin"] == pytest.approx(0.01) and tri["peers_not_behind"] == []
    assert {r["name"] for r in tri["conceptgate"]} == {"uce-triangle", "spm_triangle"}   # not rece, not peers
    assert stri["best"]["name"] == "rece-striped" and stri["ahead"] is False
    assert stri["peers_not_behind"] == ["neg-striped", "esd-x-striped"]   # a tie is not "ahead"
    assert stri["base"] == pytest.approx(0.60)
    # change one figure and the verdict follows
    cfgs = _configs()
    for s in cfgs[5]["result"]["targets"][0]["sets"].values():
        s["mean"]["value"] = 0.9
    again = {x["target"]: x for x in P.peer_verdicts(cfgs)}
    assert again["triangle"]["ahead"] is False and again["triangle"]["peers_not_behind"] == ["sld-max-triangle"]
    # no ConceptGate row for a target: no verdict
    only = [c for c in _configs() if c["name"] != "rece-striped"]
    assert {x["target"]: x for x in P.peer_verdicts(only)}["striped"]["ahead"] is None


def test_costs_relative_to_base():
    rows = {r["name"]: r for r in P.cost_rows(_configs())}
    assert rows["base"]["relative_to_base"] == pytest.approx(1.0)
    assert rows["sld-max-triangle"]["relative_to_base"] == pytest.approx(1.5)
    assert rows["sld-max-triangle"]["setup_seconds"] == 3.0 and rows["uce-triangle"]["setup_seconds"] == 0.0
    assert rows["base"]["seconds_per_image"] == pytest.approx(0.1)


def test_report_lists_peer_rows_and_one_verdict_line_per_target():
    import json

    configs = _configs()
    result = {"tier": "quick", "tier_settings": dict(Q.TIERS["quick"]), "configs": configs, "seconds": 1.0,
              "peer_verdicts": P.peer_verdicts(configs), "costs": P.cost_rows(configs)}
    result["notes"] = Q._notes(result)
    md = Q.render_markdown(result)
    # peer rows in the erasure table, on their own target only
    assert "| sld-max-triangle | triangle (object) | keyword |" in md
    assert "| sld-max-triangle | striped (style) |" not in md
    assert "| neg-striped | striped (style) | heldout |" in md
    assert "**Peers**" in md and "| triangle | sld-max-triangle | sld | 84 | 84 | 84 | 84 | 3 | 1.50x | none |" in md
    assert "| striped | esd-x-striped | esd | 70 | 70 | 70 | 70 | 2 | 1.00x |" in md
    assert "| triangle | spm_triangle | ConceptGate | 85 | 85 | 85 | 85 | 2 | 1.00x | – |" in md
    assert "- **triangle**: yes, ConceptGate is ahead of every peer: its best row spm_triangle scores 85" in md
    assert "- **striped**: no, ConceptGate is not ahead of every peer: its best row rece-striped scores 70; " \
           "not behind it: neg-striped 75, esd-x-striped 70" in md
    assert any(n.startswith("Peers (issue 17") for n in result["notes"])
    assert any("sampler grid S = 25 DDIM steps" in n for n in result["notes"])
    json.dumps(result, default=float)
    # a result without peers renders as before
    plain = {**result, "configs": configs[:4]}
    plain.pop("peer_verdicts")
    assert "**Peers**" not in Q.render_markdown(plain)


def test_cli_peers_flag_and_kinds():
    from conceptgate import cli

    p = cli.build_parser()
    a = p.parse_args(["bench", "quality", "--peers"])
    assert a.peers == "all" and P.parse_kinds(a.peers) == P.PEER_KINDS
    b = p.parse_args(["bench", "quality", "--peers", "negative,sld", "--peer-cache", "/tmp/x", "--esd-iterations", "9"])
    assert P.parse_kinds(b.peers) == ("negative", "sld") and b.peer_cache == "/tmp/x" and b.esd_iterations == 9
    assert P.parse_kinds(p.parse_args(["bench", "quality"]).peers) == ()
    with pytest.raises(ValueError, match="unknown peer"):
        P.parse_kinds("negative,esd-u")


def test_shipped_erasers_for_the_peer_targets(pipe):
    names = [n for n, _ in Q.shipped_configs(pipe, [TRI, STRIPED])]
    assert "spm_triangle" in names and "spm_striped" in names and "abo_triangle_to_square" in names
    assert not {"uce_star", "geom_watermark", "abo_circle_to_square"} & set(names)
    assert [n for n, _ in Q.shipped_configs(pipe, [STRIPED])] == ["spm_striped"]
    assert [n for n, _ in Q.shipped_configs(pipe, [TRI, STRIPED], only=["spm_striped"])] == ["spm_striped"]
    with pytest.raises(SystemExit, match="no shipped eraser 'spm_blorp'.*there are: .*spm_striped"):
        Q.shipped_configs(pipe, [TRI], only=["spm_blorp"])
    with pytest.raises(SystemExit, match="spm_striped.safetensors: it erases striped, not among the run's targets"):
        Q.shipped_configs(pipe, [TRI], only=["spm_striped"])


@pytest.mark.slow
def test_peers_through_the_quality_bench_on_a_tiny_tier(pipe, tmp_path):
    """Every peer kind through the bench's own evaluation (tiny tier, ESD with 3 iterations): each row has
    UA / IRA / CRA on the peer's target, the verdict and the costs are computed, and the pipeline's UNet is
    untouched."""
    from conceptgate import toyworld as tw

    judges = tw.load_judges()
    before = _state(pipe.unet)
    tier = {**Q.TIERS["quick"], **dict(keyword=3, synonym=2, heldout=0, per_target=1, seeds=1, steps=3, boot=50,
                                       batch=8)}
    peers = P.build_peers(pipe, [TRI], esd_iterations=3, esd_ddim_steps=3, cache_dir=str(tmp_path))
    assert [p.name for p in peers] == ["neg-triangle", "sld-weak-triangle", "sld-medium-triangle",
                                       "sld-strong-triangle", "sld-max-triangle", "esd-x-triangle",
                                       "esd-x-templates-triangle"]
    rows = P.evaluate_peers(pipe, judges, peers, [TRI], tier, Q.evaluate_stack)
    base = Q.evaluate_stack(pipe, judges, None, targets=[TRI], tier=tier)
    (uce,) = Q.make_edit_erasers(pipe, Q.DEFAULT_EDITS[:1])
    from conceptgate.adapters.stack import EraserStack

    cg = Q.evaluate_stack(pipe, judges, EraserStack().with_eraser(uce), targets=[TRI], tier=tier)
    configs = [{"name": "base", "result": base}, {"name": "uce-triangle", "result": cg}] + rows
    for c in rows:
        t = P.target_row(c["result"], "triangle")
        assert c["peer"]["target"] == "triangle" and set(t["sets"]) == {"keyword", "synonym"}
        for m in t["sets"].values():
            assert 0 <= m["ua"]["value"] <= 1 and 0 <= m["cra"]["value"] <= 1 and m["n_target_images"] >= 1
    esd = next(c for c in rows if c["name"] == "esd-x-triangle")["peer"]
    assert esd["training"]["iterations"] == 3 and esd["settings"]["ddim_steps"] == 3
    (v,) = P.peer_verdicts(configs)
    assert v["best"]["name"] == "uce-triangle" and isinstance(v["ahead"], bool)
    assert v["margin"] == pytest.approx(v["best"]["score"] - max(p["score"] for p in v["peers"]))
    costs = {r["name"]: r["relative_to_base"] for r in P.cost_rows(configs)}
    assert all(np.isfinite(x) and x > 0 for x in costs.values())
    assert _same(before, _state(pipe.unet))

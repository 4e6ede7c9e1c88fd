"""Quality benchmark (issue 3): metric definitions on synthetic judge outputs, prompt and gate sets,
the extension points for other eraser kinds, and one small real run on the committed toy model."""


import numpy as np
import pytest
import torch

from conceptgate.bench import quality as Q
from conceptgate.toyworld.judges import NONE

TRI = Q.Target("triangle", "object", 2)
STRIPED = Q.Target("striped", "style", 1)


def _pred(obj, sty, col, wm=None):
    n = len(obj)
    return {"object": np.array(obj), "style": np.array(sty), "colour": np.array(col),
            "watermark": np.array(wm if wm is not None else [0] * n)}


# ------------------------------------------------------------------------------ metric definitions


def test_ua_counts_garbage_as_not_success():
    # four images of prompts naming the triangle: judged triangle, none (garbage), star, star
    labels = np.array([[2, 0, 0]] * 4)
    pred = _pred([2, NONE["object"], 3, 3], [0] * 4, [0] * 4)
    m = Q.target_metrics(pred, labels, np.arange(4), TRI, n_boot=200)
    assert m["ua"]["value"] == pytest.approx(0.5)           # only the two stars count
    assert m["garbage_rate"]["value"] == pytest.approx(0.25)
    assert m["n_target_images"] == 4 and m["n_other_images"] == 0
    assert np.isnan(m["ira"]["value"]) and np.isnan(m["cra"]["value"])  # nothing to retain here
    # all garbage: UA 0, garbage 1
    g = Q.target_metrics(_pred([NONE["object"]] * 4, [0] * 4, [0] * 4), labels, np.arange(4), TRI, n_boot=50)
    assert g["ua"]["value"] == 0.0 and g["garbage_rate"]["value"] == 1.0


def test_ira_cra_mean_retain_and_replacement():
    # 2 target prompts (triangle), 2 other prompts (circle, square); 2 seeds each
    labels = np.array([[2, 1, 0]] * 4 + [[0, 2, 3]] * 2 + [[1, 4, 5]] * 2)
    pids = np.repeat(np.arange(4), 2)
    obj = [0, 0, 2, 1] + [0, 0] + [1, 3]          # targets: circle, circle, triangle, square
    sty = [1, 1, 1, 0] + [2, 2] + [4, 4]
    col = [0, 0, 0, 0] + [3, 1] + [5, 5]
    m = Q.target_metrics(_pred(obj, sty, col), labels, pids, TRI, alternative=0, n_boot=200)
    assert m["ua"]["value"] == pytest.approx(3 / 4)
    assert m["ira"]["value"] == pytest.approx(3 / 4)                  # 0,0 right; 1 right, 3 wrong
    # CRA = style and colour accuracy on the non-target images: styles 4/4, colours 3/4
    assert m["cra"]["value"] == pytest.approx((1 + 0.5 + 1 + 1) / 4)  # per image: mean of style, colour
    assert m["retain_kinds"] == ["style", "colour"]
    assert m["retain_on_target"]["value"] == pytest.approx((1 + 1 + 1 + 0.5) / 4)  # style wrong once
    assert m["replacement_accuracy"]["value"] == pytest.approx(2 / 4) and m["alternative"] == "circle"
    # both circles keep the prompt's style and colour
    assert m["replacement_with_attributes"]["value"] == pytest.approx(2 / 4)
    m2 = Q.target_metrics(_pred(obj, [0] + sty[1:], col), labels, pids, TRI, alternative=0, n_boot=50)
    assert m2["replacement_with_attributes"]["value"] == pytest.approx(1 / 4)  # one circle lost its style
    assert m["mean"]["value"] == pytest.approx((m["ua"]["value"] + m["ira"]["value"] + m["cra"]["value"]) / 3)


def test_style_target_cross_domain_is_object_and_colour():
    labels = np.array([[0, 1, 0], [3, 2, 1]])
    m = Q.target_metrics(_pred([0, 3], [0, 2], [0, 0]), labels, np.arange(2), STRIPED, n_boot=50)
    assert m["retain_kinds"] == ["object", "colour"]
    assert m["ua"]["value"] == 1.0 and m["ira"]["value"] == 1.0
    assert m["cra"]["value"] == pytest.approx(0.5)      # object right, colour wrong


def test_watermark_target():
    labels = np.array([[0, 0, 0]] * 4)
    m = Q.target_metrics(_pred([0] * 4, [0] * 4, [0] * 4, wm=[1, 0, 0, NONE["watermark"]]), labels, np.arange(4),
                         Q.Target("watermark", "watermark", None), n_boot=50)
    assert m["ua"]["value"] == pytest.approx(0.5) and m["garbage_rate"]["value"] == pytest.approx(0.25)
    assert m["cra"]["value"] == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_bootstrap_interval_contains_point_estimate(seed):
    rng = np.random.default_rng(seed)
    den = rng.integers(1, 6, 30).astype(float)
    num = np.minimum(den, rng.binomial(den.astype(int), rng.uniform(0.1, 0.9)))
    p, lo, hi, reps = Q.cluster_bootstrap(num, den, n_boot=500, seed=seed)
    assert p == pytest.approx(num.sum() / den.sum())
    assert lo <= p <= hi and 0 <= lo and hi <= 1 and len(reps) == 500
    assert hi - lo > 0
    # same seed, same clusters -> identical interval; degenerate data -> a point interval
    assert Q.cluster_bootstrap(num, den, n_boot=500, seed=seed)[1:3] == (lo, hi)
    assert Q.cluster_bootstrap(den, den, 100)[:3] == (1.0, 1.0, 1.0)
    assert np.isnan(Q.cluster_bootstrap([], [], 10)[0])


def test_bootstrap_resamples_prompts_not_images():
    # two prompts, each with all seeds agreeing: a prompt-level bootstrap gives {0, 0.5, 1} only
    pids = np.repeat([0, 1], 50)
    v = np.r_[np.ones(50), np.zeros(50)]
    num, den = Q._per_prompt(pids, v, np.ones(100, bool), 2)
    _, lo, hi, reps = Q.cluster_bootstrap(num, den, 400, 0)
    assert set(np.round(reps, 6)) <= {0.0, 0.5, 1.0} and lo == 0.0 and hi == 1.0


def test_crossed_bootstrap_sees_the_seed_effect_that_prompt_clusters_miss():
    """Every prompt sampled with the same seeds: a seed that draws the concept for every prompt moves all
    prompts at once. Resampling prompts only cannot see it; the crossed bootstrap (prompts and seeds) can."""
    from conceptgate.bench.metrics import crossed_bootstrap

    rng = np.random.default_rng(1)
    P, S = 32, 4
    v = (rng.random((P, S)) < np.array([0.05, 0.6, 0.1, 0.5])[None]).astype(float)  # strong seed effect
    pid, sid = np.repeat(np.arange(P), S), np.tile(np.arange(S) + 5000, P)
    point, lo, hi = crossed_bootstrap(v.ravel(), pid, sid, 500, 0)
    _, clo, chi, _ = Q.cluster_bootstrap(v.sum(1), np.full(P, S), 500, 0)
    assert point == pytest.approx(v.mean()) and lo <= point <= hi
    assert hi - lo > 2 * (chi - clo)
    assert crossed_bootstrap(v.ravel(), pid, sid, 500, 0) == (point, lo, hi)  # deterministic
    # no seed effect: the same order of width as the prompt-cluster interval
    w = np.repeat(rng.random(P) < 0.3, S).astype(float)
    _, lo2, hi2 = crossed_bootstrap(w, pid, sid, 500, 0)
    _, clo2, chi2, _ = Q.cluster_bootstrap(w.reshape(P, S).sum(1), np.full(P, S), 500, 0)
    assert (hi2 - lo2) == pytest.approx(chi2 - clo2, rel=0.35)
    assert crossed_bootstrap(np.ones(8), np.arange(8) // 2, np.arange(8) % 2, 50)[:3] == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("n,m,d", [(20, 30, 64), (40, 40, 16), (5, 9, 200)])
def test_fast_frechet_matches_the_toyworld_reference(n, m, d):
    from conceptgate.toyworld.judges import frechet_distance

    rng = np.random.default_rng(n + d)
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3
    b = rng.normal(size=(m, d)) * 1.5 + 0.2
    ref = frechet_distance(a, b)
    assert Q.frechet(a, b) == pytest.approx(ref, rel=1e-6, abs=1e-6)
    assert Q.frechet(a, a) == pytest.approx(0.0, abs=1e-6 * ref)


def test_fire_rates_threshold_is_strict():
    r = Q.fire_rates([0.2, 0.5, 0.6, 0.9])
    assert r["fire_rate"] == 0.5 and r["mean_gate"] == pytest.approx(0.55) and r["n"] == 4
    assert Q.fire_rates([0.2, 0.5, 0.6, 0.9], threshold=0.1)["fire_rate"] == 1.0
    assert Q.fire_rates([])["n"] == 0 and Q.GATE_THRESHOLD == 0.5


# ------------------------------------------------------------------------------ vocabulary / prompts


def test_resolve_concepts():
    assert Q.resolve_concept("triangle") == Q.Target("triangle", "object", 2)
    assert Q.resolve_concept("trigon").index == 2
    assert Q.resolve_concept("a red plus sign").index == 4 and Q.resolve_concept("plus sign").kind == "object"
    assert Q.resolve_concept("zebra-lined") == Q.Target("zebra-lined", "style", 1)
    assert Q.resolve_concept("plain") == Q.Target("plain", "style", 0)
    assert Q.resolve_concept("Watermark").kind == "watermark"
    assert Q.resolve_concept("orange").kind == "colour"
    assert Q.resolve_concept("a photo of a dog") is None
    assert Q.resolve_concept("ring").index == 5 and Q.resolve_concept("striped").index == 1


def test_alternative_from_settings():
    from conceptgate.adapters.eraser import Eraser

    e = Eraser("x", "weight", ["striped"], settings={"guide": "plain"})
    assert Q.eraser_alternative(e, STRIPED) == 0
    assert Q.eraser_alternative(Eraser("y", "weight", ["triangle"], settings={"guide": "shape"}), TRI) is None
    assert Q.eraser_alternative(Eraser("z", "weight", ["triangle"], settings={"alternative": "disc"}), TRI) == 0
    assert Q.eraser_alternative(Eraser("w", "weight", ["triangle"], settings={"alternative": "red"}), TRI) is None


def test_prompt_sets_cover_targets_and_are_deterministic():
    tier = dict(Q.TIERS["quick"])
    a = Q.build_prompt_sets(tier, [TRI, STRIPED])
    assert a == Q.build_prompt_sets(tier, [TRI, STRIPED])
    assert set(a) == {"keyword", "synonym", "heldout"}
    for name, items in a.items():
        assert len({p for p, _ in items}) == len(items)
        assert sum(lab[0] == 2 for _, lab in items) >= tier["per_target"]
        assert sum(lab[1] == 1 for _, lab in items) >= tier["per_target"]
    assert all("triangle" in p for p, lab in a["keyword"] if lab[0] == 2)
    assert all("trigon" in p for p, lab in a["synonym"] if lab[0] == 2)
    assert all("zebra-lined" in p for p, lab in a["synonym"] if lab[1] == 1)
    from conceptgate.toyworld.captions import HELDOUT_PAIRS

    assert not any((lab[0], lab[1]) in set(HELDOUT_PAIRS) for v in a.values() for _, lab in v)


def test_release_tier_has_32_target_images_per_set():
    """Issue 17: the release tier tells 95% from 88%: every target has >= 32 images in every prompt set."""
    tier = Q.TIERS["release"]
    sets = Q.build_prompt_sets(tier, [TRI, STRIPED])
    for items in sets.values():
        assert sum(lab[0] == 2 for _, lab in items) * tier["seeds"] >= 32
        assert sum(lab[1] == 1 for _, lab in items) * tier["seeds"] >= 32
    assert Q.SECTIONS["release"] == "quality-release" and Q.SECTIONS["quick"] == "quality"


def test_gate_prompt_sets():
    s = Q.gate_prompt_sets(TRI, 16)
    assert set(s) == {"target", "synonym", "neighbour", "unrelated"}
    assert all("triangle" in p for p in s["target"]) and all("trigon" in p for p in s["synonym"])
    for p in s["neighbour"] + s["unrelated"]:
        assert "triangle" not in p and "trigon" not in p
    assert len(s["target"]) == 16 and len(s["unrelated"]) == 16


# ------------------------------------------------------------------------------ on the toy model


@pytest.fixture(scope="module")
def toy():
    from conceptgate import toyworld as tw

    return tw.load_pipeline(), tw.load_judges()


def _render_generate(sets):
    """A stand-in generate_fn that renders what each prompt names (a perfect 'model')."""
    from conceptgate.toyworld import render as R

    lab_of = {p: lab for items in sets.values() for p, lab in items}

    def gen(prompts, seeds):
        labs = np.array([lab_of[p] for p in prompts])
        lab = R.sample_labels(len(prompts), 7, objects=labs[:, 0], styles=labs[:, 1], colours=labs[:, 2],
                              watermark_rate=0.0)
        return R.to_tensor(R.render_labels(lab))
    return gen


@pytest.mark.slow
def test_evaluate_stack_with_generate_fn_and_gates(toy):
    """The whole evaluation path on perfect 'generations' (renders): accuracy ~1, base UA ~0,
    and the UCE eraser's gate profile (text only) fires on its target prompts."""
    from conceptgate.adapters.stack import EraserStack

    pipe, judges = toy
    (uce,) = Q.make_edit_erasers(pipe, Q.DEFAULT_EDITS[:1])
    from conceptgate.adapters.gate import GateSettings

    tier = dict(keyword=6, synonym=3, heldout=3, per_target=3, seeds=2, gate_prompts=12, boot=100)
    stack = EraserStack().with_eraser(uce, gate=GateSettings(rule="ft"))
    sets = Q.build_prompt_sets({**Q.TIERS["quick"], **tier}, [TRI])
    r = Q.evaluate_stack(pipe, judges, stack, tier=tier, prompt_sets=sets, generate_fn=_render_generate(sets))
    kw = r["sets"]["keyword"]
    assert kw["object"]["value"] >= 0.95 and kw["style"]["value"] >= 0.95 and kw["garbage_rate"]["value"] == 0
    assert kw["watermark_rate"]["value"] == 0 and kw["frechet"] >= 0
    (t,) = r["targets"]
    assert t["keyword"] == "triangle" and t["erasers"] == ["uce-triangle"]
    assert t["sets"]["keyword"]["ua"]["value"] <= 0.05 and t["sets"]["keyword"]["ira"]["value"] >= 0.95
    g = r["gates"]["uce-triangle"]
    assert g["target"]["fire_rate"] == 1.0 and g["threshold"] == 0.5 and g["rule"] == "ft"
    assert set(g) >= {"synonym", "neighbour", "unrelated"}
    assert r["stack"][0]["method"] == "uce"
    base = Q.evaluate_stack(pipe, judges, None, targets=["triangle"], tier=tier, prompt_sets=sets,
                            generate_fn=_render_generate(sets))
    result = {"tier": "quick", "tier_settings": {**Q.TIERS["quick"], **tier}, "bars": Q.base_bars(base),
              "configs": Q._strip_images([{"name": "base", "result": base}, {"name": "uce", "result": r}]),
              "seconds": 1.0, "notes": ["synthetic"]}
    assert all(b["met"] for k, b in result["bars"].items() if k != "watermark_rate")
    assert not result["bars"]["watermark_rate"]["met"]           # renders drawn without watermark
    md = Q.render_markdown(result)
    assert "| base | triangle (object) | keyword |" in md and "| uce | uce-triangle | 100% (1.00)" in md
    assert "**missed**" in md and "- synthetic" in md
    import json

    json.dumps(result, default=float)


def test_unsupported_kinds_and_handlers(toy):
    from conceptgate.adapters.eraser import Eraser
    from conceptgate.adapters.registry import GUIDANCE_SESSIONS, register_guidance_session
    from conceptgate.adapters.stack import EraserStack

    pipe, _ = toy
    cond = Eraser("geom-wm", "conditioning", ["watermark"], method="testgeom", tensors={"v": torch.zeros(1, 128)})
    stack = EraserStack().with_eraser(cond)
    with pytest.raises(Q.UnsupportedEraser, match="register_conditioning"):
        Q.generate_with_stack(pipe, ["a red circle"], [0], stack, steps=1)
    calls = {}

    def handler(p, entries, prompts, gates, negative=None):
        calls["cond"] = (list(prompts), gates.shape)
        return {"negative_prompt": ["watermark"] * len(prompts)}

    guide = Eraser("abo-star", "guidance", ["star"], method="testabo")

    class Session:  # the registry's guidance-session contract, as GatedPipeline drives it
        def __init__(self, gated):
            calls["session"] = gated.stack is not None

        def attach(self):
            calls["attached"] = True

        def detach(self):
            calls["detached"] = True

        def active(self, prompts, encoded, guidance_scale):
            import contextlib

            calls["guide"] = (list(prompts), tuple(encoded.hidden.shape[:1]), guidance_scale)
            return contextlib.nullcontext()

    Q.register_conditioning("testgeom", handler)
    Q.register_guidance("testabo", lambda *a: None)
    register_guidance_session("testabo", Session)
    try:
        imgs, gates = Q.generate_with_stack(pipe, ["a red circle", "a blue star"], [0, 1],
                                            stack.with_eraser(guide), steps=1, cfg=2.0)
    finally:
        Q.CONDITIONING_HANDLERS.pop("testgeom")
        Q.GUIDANCE_HANDLERS.pop("testabo")
        GUIDANCE_SESSIONS.pop("testabo")
    assert imgs.shape == (2, 3, 64, 64) and gates.shape == (2, 2)
    assert calls["cond"] == (["a red circle", "a blue star"], (2, 1))
    assert calls["guide"] == (["a red circle", "a blue star"], (2,), 2.0) and calls["attached"] and calls["detached"]
    assert float(gates[1, 1]) == pytest.approx(1.0)     # "star" named: token overlap 1


def test_cli_registration():
    from conceptgate import cli

    p = cli.build_parser()
    a = p.parse_args(["bench", "quality", "--full", "--stack", "a.json", "--json", "x.json"])
    assert a.func is Q.run_quality and a.full and a.stack == ["a.json"] and a.json == "x.json"
    assert not a.in_context and p.parse_args(["bench", "quality", "--in-context"]).in_context
    assert a.tier == "quick" and p.parse_args(["bench", "quality", "--tier", "release"]).tier == "release"
    assert [e["name"] for e in Q.IN_CONTEXT_EDITS] == ["uce-triangle (in context)", "rece-striped (in context)"]
    assert all(e["context"] == "toy" and e["synonyms"] == "toy" for e in Q.IN_CONTEXT_EDITS)
    d = p.parse_args(["demo"])
    from conceptgate.cli import demo

    assert d.func is demo.cmd_demo and d.out == "conceptgate-demo"


@pytest.mark.slow
def test_quick_evaluation_on_the_toy_model_is_sane(toy):
    """One small real run: the base model draws what the prompts name (well above chance), rarely
    garbage, and hardly ever 'erases' a concept by itself (low baseline UA)."""
    pipe, judges = toy
    tier = dict(keyword=4, synonym=0, heldout=0, per_target=2, seeds=4, steps=15, boot=200, batch=32)
    r = Q.evaluate_stack(pipe, judges, None, targets=["triangle"], tier=tier)
    kw = r["sets"]["keyword"]
    assert kw["n_images"] == 4 * r["settings"]["prompts_per_set"]["keyword"] >= 20
    assert kw["object"]["value"] >= 0.6 and kw["style"]["value"] >= 0.6 and kw["colour"]["value"] >= 0.5
    assert kw["object"]["lo"] <= kw["object"]["value"] <= kw["object"]["hi"]
    assert kw["garbage_rate"]["value"] <= 0.3 and 0.0 <= kw["watermark_rate"]["value"] <= 0.7
    t = r["targets"][0]["sets"]["keyword"]
    assert t["ua"]["value"] <= 0.4 and t["ira"]["value"] >= 0.5
    assert r["gates"] == {} and r["stack"] is None
    bars = Q.base_bars(r)
    assert set(bars) == {"object", "style", "colour", "watermark_rate"} and all("met" in b for b in bars.values())


@pytest.mark.slow
def test_quick_tier_runs_end_to_end(tmp_path, monkeypatch):
    """The quick tier exactly as `python -m conceptgate bench quality` runs it (CI runs this test): base
    model plus the UCE/RECE erasers computed on the fly, judges, bars, JSON and the BENCHMARKS.md section
    (redirected to a temporary file). Asserts only what must hold whatever the sampling noise: the judges'
    accuracy on renders, that the UCE edit erases its target more often than the base model does, and that
    every number is present."""
    import json

    from conceptgate.cli import main

    md, js = tmp_path / "BENCHMARKS.md", tmp_path / "bench.json"
    monkeypatch.setenv("CONCEPTGATE_BENCHMARKS", str(md))
    assert main(["bench", "quality", "--json", str(js)]) == 0
    data = json.loads(js.read_text())["quality"]
    assert all(v >= 0.98 for v in data["judges"]["accuracy_heldout_renders"].values())
    assert set(data["bars"]) == {"object", "style", "colour", "watermark_rate"}
    names = [c["name"] for c in data["configs"]]
    assert names[0] == "base" and len(names) >= 3

    def ua(config_name, target="triangle"):
        cfg = next(c for c in data["configs"] if c["name"] == config_name)["result"]
        t = next(t for t in cfg["targets"] if t["keyword"] == target)
        return t["sets"]["keyword"]["ua"]["value"]

    uce = next(n for n in names if "uce" in n)
    assert ua(uce) > ua("base")
    text = md.read_text()
    assert "<!-- bench:quality:start -->" in text and "Quality on the toy world (quick tier)" in text


def test_a_validation_block_of_seeds(toy, tmp_path):
    """`--seed-base`: the same prompts on other seeds (for tuning a recipe without fitting the reported ones);
    such a run needs --json and writes nothing else."""
    from conceptgate.cli import main

    pipe, judges = toy
    seen = []

    def gen(prompts, seeds):
        seen.append(list(seeds))
        return _render_generate(sets)(prompts, seeds)

    tier = dict(keyword=2, synonym=0, heldout=0, per_target=1, seeds=2, boot=50, seed_base=5000)
    sets = Q.build_prompt_sets({**Q.TIERS["quick"], **tier}, [TRI])
    r = Q.evaluate_stack(pipe, judges, None, targets=[TRI], tier=tier, prompt_sets=sets, generate_fn=gen)
    assert r["settings"]["seeds"] == [5000, 5001] and set(seen[0]) == {5000, 5001}
    r = Q.evaluate_stack(pipe, judges, None, targets=[TRI], tier={**tier, "seed_base": Q.SEED_BASE},
                         prompt_sets=sets, generate_fn=gen)
    assert r["settings"]["seeds"] == [1000, 1001]
    with pytest.raises(SystemExit, match="--seed-base: give --json PATH"):
        main(["bench", "quality", "--seed-base", "5000"])

"""Geom-Erasing regional negation in the webuis (ConceptGate's rule, ``settings["negation"] = "regional"``),
replayed against the host stand-in on the real tiny UNet and text encoder.

Every step of A1111 (batched, skipped unconditional branch, a stack with All-but-One and a prompt-mode Geom
eraser) and of Forge (HEAD and ``ldm_patched``: one call, split calls, CFG 1) equals the rule computed by
hand from the model's own predictions::

    d_hat = d_cfg - k (w - 1) M [d(x, n + tokens) - d(x, n)]

with ``tokens`` encoded by the core builder and the text encoder (not the glue), ``M`` the cells of the
location bins (3 of the 4 quadrants here), ``n`` the image's negative as the UNet sees it; images whose
gate is closed get nothing and a batch where none fires is bit-identical with no extra rows.
"""

import dataclasses
import os
import sys

import pytest
import torch

import a1111_stub
from conceptgate.adapters import save_eraser
from conceptgate.adapters import geom as G
from conceptgate.adapters.abo.guidance import region_map
from test_a1111_forge import ForgeHost
from test_a1111_mechanisms import (HOSTS, TOL, Spy, _ctx, _field, args, geom_encoding, host_for, kinds,  # noqa: F401
                                   reference_a1111, reference_forge)
from test_a1111_webui import Host, world  # noqa: F401  (module fixture)

K = 1.5  # not the default, so a strength read from the wrong place shows


@pytest.fixture(scope="module")
def regional(world, kinds):
    eraser = G.with_negation(kinds["geom"], "regional", K)
    eraser = dataclasses.replace(eraser, name="wm_reg")
    path = os.path.join(world["folder"], "wm_reg.safetensors")
    save_eraser(eraser, path)
    tokens, plan = geom_encoding(world, kinds["geom"])
    yield {"tokens": tokens, "grid": int(eraser.settings["grid"]), "bins": tuple(plan.bins)}
    os.remove(path)


def _mask(regional, like):
    return region_map(regional["grid"], regional["bins"], like.shape[-2:]).to(like)


def regional_term(regional, fires):
    """The term by hand, for the reference loops: k (w - 1) M [d(n + tokens) - d(n)] on firing images, nothing
    where the unconditional branch was skipped (or at CFG 1)."""
    def extra(i, d, negative, w, skipped):
        if not fires[i] or skipped:
            return 0.0
        with_tokens = torch.cat([negative, regional["tokens"].to(negative)])
        diff = d(with_tokens) - d(negative)
        return K * (w - 1) * _mask(regional, diff) * diff
    return extra


A1111_CASES = {
    "batched": dict(prompt=["a watermark on a red triangle", "a green square"], batch_size=2),
    "skipped-uncond": dict(prompt=["a watermark on a blue circle", "a watermark"], batch_size=2, s_min_uncond=100.0,
                           steps=3),
    "with-abo-and-prompt-mode": dict(prompt=["a watermark on a red triangle", "a red triangle"], batch_size=2,
                                     erasers="abo_tri:0.8, wm:1, wm_reg:1"),
}
A1111_FIRES = {"batched": [True, False], "skipped-uncond": [True, True], "with-abo-and-prompt-mode": [True, False]}
A1111_ABO = {"with-abo-and-prompt-mode": [[(0.8, "triangle", "square")], [(0.8, "triangle", "square")]]}


@pytest.mark.parametrize("case", list(A1111_CASES))
def test_regional_every_a1111_step_equals_the_rule_by_hand(world, kinds, regional, case):
    sc = dict(A1111_CASES[case])
    with a1111_stub.installed("a1111") as processing:
        h = Host(world, processing)
        spy = Spy(sys.modules["modules.script_callbacks"])
        p, processed = h.run(sc.pop("prompt"), args(sc.pop("erasers", "wm_reg:1"), "tokens"), **sc)
        errors = reference_a1111(h, p, spy, A1111_ABO.get(case, [[], []]), sc.get("s_min_uncond", 0.0),
                                 extra=regional_term(regional, A1111_FIRES[case]))
        assert max(errors) < TOL, errors
        if case == "batched":  # the negative itself is untouched (the tokens act through their own rows)
            assert _ctx(spy.denoiser[0][3]).shape[1] == 77
            assert spy.denoiser[0][0].shape[0] == 2 + 2 + 2  # conds, the firing image's two rows, unconds
        for i, fires in enumerate(A1111_FIRES[case]):
            info = processed.infotexts[i]
            geom = [n.strip() for n in (_field(info, "ConceptGate Geom") or "").split(",")]
            assert ("wm_reg" in geom) == fires, info
            want_abo = bool(A1111_ABO.get(case, [[]] * 2)[i])
            assert ("ConceptGate All-but-One:" in info) == want_abo, info  # regional terms are not reported as ABO


FORGE_CASES = {
    "one-call": dict(prompt=["a watermark on a red triangle", "a green square"], batch_size=2),
    "split-calls": dict(prompt=["a green square", "a watermark on a blue circle"], batch_size=2,
                        opts={"forge_split_calls": True}),
    "cfg-1": dict(prompt=["a watermark on a red triangle", "a blue circle"], batch_size=2, cfg_scale=1.0),
}
FORGE_FIRES = {"one-call": [True, False], "split-calls": [False, True], "cfg-1": [True, False]}


@pytest.mark.parametrize("kind", ["forge", "forge-legacy"])
@pytest.mark.parametrize("case", list(FORGE_CASES))
@torch.no_grad()
def test_regional_every_forge_step_equals_the_rule_by_hand(world, kinds, regional, kind, case):
    sc = dict(FORGE_CASES[case])
    with a1111_stub.installed(kind) as processing:
        h = ForgeHost(world, processing, legacy=kind == "forge-legacy")
        for k, v in sc.pop("opts", {}).items():
            setattr(h.shared.opts, k, v)
        p, processed = h.run(sc.pop("prompt"), args("wm_reg:1", "tokens"), **sc)
        cfg1 = sc.get("cfg_scale") == 1.0
        checks = reference_forge(h, p, [[], []], cfg1, extra=regional_term(regional, FORGE_FIRES[case]))
        assert max(checks) < TOL, checks
        for i, fires in enumerate(FORGE_FIRES[case]):
            assert (_field(processed.infotexts[i], "ConceptGate Geom") == "wm_reg") == fires, processed.infotexts[i]
            assert "ConceptGate All-but-One" not in processed.infotexts[i]


@pytest.mark.parametrize("kind", HOSTS)
@torch.no_grad()
def test_regional_gate_zero_adds_no_rows_and_is_bit_identical(world, kinds, regional, kind):
    with a1111_stub.installed(kind) as processing:
        h = host_for(kind, world, processing)
        dm = h.sd_model.forge_objects.unet.model.diffusion_model if kind != "a1111" else h.dm
        counts = []
        dm.register_forward_pre_hook(lambda m, a, k: counts.append(a[0].shape[0]), with_kwargs=True)
        prompts = ["a green square", "a yellow star"]
        _, plain = h.run(prompts, [False, "", "None", "additive", "tokens", False], batch_size=2)
        n_plain = list(counts)
        counts.clear()
        p, off = h.run(prompts, args("wm_reg:1", "tokens"), batch_size=2)
        assert counts == n_plain
        assert all(torch.equal(a, b) for a, b in zip(plain.images, off.images))
        counts.clear()
        _, on = h.run(["a watermark", "a yellow star"], args("wm_reg:1", "tokens"), batch_size=2)
        assert sum(counts) > sum(n_plain)
        assert not torch.allclose(on.images[0], plain.images[0], atol=1e-4)


def test_regional_on_sdxl_is_refused(world, kinds, regional):
    from conceptgate.adapters import IncompatibleModelError

    with a1111_stub.installed("a1111") as processing:
        h = Host(world, processing, sdxl=True)
        with pytest.raises(IncompatibleModelError, match="two text encoders"):
            h.run("a watermark", args("wm_reg:1", "always"))


@pytest.mark.parametrize("erasers", ["wm_reg:1", "abo_tri:1"])
def test_forge_step_whose_calls_took_no_rows_stops_the_generation(world, kinds, regional, erasers, monkeypatch):
    """Fail closed: when no UNet call of a step has the layout the rows join (area conditionings, another
    extension's pass), Forge stops with a message instead of sampling that step without the eraser."""
    from conceptgate.extension import abo

    def never_matches(self, prev, apply_model, args):  # what wrap does for a batch it does not recognise
        call = prev if prev is not None else (lambda fn, a: fn(a["input"], a["timestep"], **a["c"]))
        return call(apply_model, args)

    monkeypatch.setattr(abo.ForgeGuidance, "wrap", never_matches)
    with a1111_stub.installed("forge") as processing:
        h = ForgeHost(world, processing)
        with pytest.raises(RuntimeError, match="stopped rather than made without"):
            h.run(["a watermark on a red triangle"], args(erasers, "always"))
        _, plain = h.run(["a green square"], args(erasers, "tokens"))  # nothing fires: no rows owed, no error
        assert plain.images

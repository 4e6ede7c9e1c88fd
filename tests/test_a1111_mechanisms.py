"""Geom-Erasing and All-but-One guidance in the webuis (issue 14), replayed against the host stand-in on the
real tiny UNet and text encoder, in AUTOMATIC1111's CFG batch layouts and on Forge's sampling path (HEAD and
the old ``ldm_patched`` line).

Checks: the tokens appended to each image's negative equal the core builder's encoding with the text encoder
(per image, where the gate fires; untouched and bit-identical where none fires); one step of All-but-One in
A1111 equals the diffusers path (``AboUNetHooks``) on the same UNet; every step of every layout (batched,
chunked, skipped uncond, AND parts, SDXL dict conditioning, hires pass, img2img with a mask; Forge: one call,
split calls, CFG 1) equals the rule computed by hand from the model's own predictions; gate 0 adds no rows
and changes nothing; a batch of 4 mixing target and unrelated prompts with several erasers of different kinds
gives each image its own treatment (Forge weights: the strongest gate of the batch), recorded per image in
the infotext; presets and pasted infotext restore mixed stacks.
"""

import math
import os
import sys

import pytest
import torch

import a1111_stub
from conceptgate.adapters import EraserStack, GateSettings, save_eraser
from conceptgate.adapters import geom as G
from conceptgate.adapters.abo import abo_eraser, save_abo
from test_a1111_forge import ForgeHost
from test_a1111_webui import Host, world  # noqa: F401  (module fixture)

TOL = 1e-4
HOSTS = ["a1111", "forge", "forge-legacy"]


@pytest.fixture(scope="module")
def kinds(world):
    """A Geom-Erasing eraser for the tiny text encoder (its fingerprint), an All-but-One guidance eraser and
    a second weight eraser, saved in the webui's eraser folder."""
    table = world["te"].get_input_embeddings().weight
    g = torch.Generator().manual_seed(3)
    grid = 2
    geom = G.make_eraser("watermark", torch.randn(grid * grid, table.shape[1], generator=g) * 0.5,
                         torch.randn(1, table.shape[1], generator=g) * 0.5, grid, [5, 0, 3, 1],
                         G.text_fingerprint(table), name="wm")
    save_eraser(geom, os.path.join(world["folder"], "wm.safetensors"))
    abo = abo_eraser("triangle", "square", name="abo_tri")
    save_abo(abo, os.path.join(world["folder"], "abo_tri.safetensors"))
    abo_nothing = abo_eraser("circle", "", name="abo_circ")
    save_abo(abo_nothing, os.path.join(world["folder"], "abo_circ.safetensors"))
    in_prompt = abo_eraser("triangle", "square", name="abo_tri_ip", in_prompt=True)
    save_abo(in_prompt, os.path.join(world["folder"], "abo_tri_ip.safetensors"))
    return {"geom": geom, "abo": abo}


def host_for(kind, world, processing, **kw):
    return Host(world, processing, **kw) if kind == "a1111" else ForgeHost(world, processing, legacy=kind == "forge-legacy")


def args(erasers, rule="tokens", **kw):
    return [dict({"enabled": True, "erasers": erasers, "gate": rule}, **kw)]


class Spy:
    """Callbacks registered after the extension's: they see what the extension made of each step."""

    def __init__(self, callbacks):
        self.denoiser, self.after = [], []
        callbacks.on_cfg_denoiser(lambda p: self.denoiser.append(
            (p.x.clone(), p.sigma.clone(), _clone(p.text_cond), _clone(p.text_uncond))))
        callbacks.on_cfg_after_cfg(lambda p: self.after.append(p.x.clone()))


def _clone(c):
    if c is None:
        return None
    return {k: v.clone() for k, v in c.items()} if isinstance(c, dict) else c.clone()


def _ctx(c):
    return c["crossattn"] if isinstance(c, dict) else c


def geom_encoding(world, eraser):
    """The core builder's tokens encoded by the text encoder itself (diffusers, not the webui glue)."""
    plan = G.plan_negative(eraser, world["tok"], "", window=G.WINDOW)
    return G.encode_segments(world["tok"], world["te"], [plan.segments], max_chunks=None)[0], plan


# ------------------------------------------------------------------ Geom-Erasing
@pytest.mark.parametrize("kind", HOSTS)
def test_geom_tokens_join_the_negative_of_each_firing_image(world, kinds, kind):
    with a1111_stub.installed(kind) as processing:
        h = host_for(kind, world, processing)
        spy = Spy(sys.modules["modules.script_callbacks"])
        prompts = ["a watermark on a red triangle", "a green square"]
        p, processed = h.run(prompts, args("wm:1", "tokens"), batch_size=2)
        want, plan = geom_encoding(world, kinds["geom"])
        for _, _, _, uncond in spy.denoiser:
            u = _ctx(uncond)
            assert u.shape[1] == 154
            base = world_uncond(world, h)
            assert (u[0, :77] - base).abs().max() < TOL and (u[0, 77:] - want).abs().max() < TOL  # user's + tokens
            assert torch.equal(u[1, :77], u[1, 77:]) and (u[1, :77] - base).abs().max() < TOL  # repeated: unchanged
        info = processed.infotexts
        assert "ConceptGate Geom: wm" in info[0] and "ConceptGate Geom" not in info[1]
        assert plan.own_tokens == 1 + len(plan.bins) == 4  # concept + the 3 observed bins


def world_uncond(world, h):
    return h.sd_model.get_learned_conditioning([""])[0]


@pytest.mark.parametrize("kind", HOSTS)
def test_geom_gate_zero_leaves_the_generation_bit_identical(world, kinds, kind):
    with a1111_stub.installed(kind) as processing:
        h = host_for(kind, world, processing)
        _, plain = h.run(["a green square", "a blue circle"], [False, "", "None", "additive", "tokens", False], batch_size=2)
        p, off = h.run(["a green square", "a blue circle"], args("wm:1", "tokens"), batch_size=2)
        assert all(torch.equal(a, b) for a, b in zip(plain.images, off.images))
        assert "wm:1:0.000" in p.extra_generation_params["ConceptGate"]
        _, on = h.run(["a green square", "a blue circle"], args("wm:1", "context"), batch_size=2)  # its default: always
        assert all((a - b).abs().max() > 1e-4 for a, b in zip(plain.images, on.images))


def test_geom_on_sdxl_is_refused(world, kinds):
    from conceptgate.adapters import IncompatibleModelError

    with a1111_stub.installed("a1111") as processing:
        h = Host(world, processing, sdxl=True)
        with pytest.raises(IncompatibleModelError, match="two text encoders"):
            h.run("a red triangle", args("wm:1", "always"))


# ------------------------------------------------------------------ All-but-One
@torch.no_grad()
def test_abo_one_a1111_step_equals_the_diffusers_path(world, kinds):
    """Same UNet (the diffusers tiny UNet and its LDM conversion), same text encoder, same latent and sigma:
    the webui's first denoised step equals the diffusers pipeline's CFG with AboUNetHooks."""
    from conceptgate.adapters.abo import AboUNetHooks, encode_texts, guidance_terms
    from conceptgate.adapters.diffusers_host import DiffusersTextEncoder
    from conceptgate.adapters.gate import BankCache

    with a1111_stub.installed("a1111") as processing:
        h = Host(world, processing)
        spy = Spy(sys.modules["modules.script_callbacks"])
        p, _ = h.run(["a red triangle"], args("abo_tri:0.8", "tokens"), steps=1, cfg_scale=5.0)
        x_ext, sigma_ext, cond, uncond = spy.denoiser[0]
        assert x_ext.shape[0] == 4  # cond, + the erase and alternative rows, uncond
        x, t = x_ext[-1:], sigma_ext[-1:]
        ours = spy.after[0]
    encoder = DiffusersTextEncoder(world["tok"], world["te"])
    stack = EraserStack().with_eraser(kinds["abo"], strength=0.8, gate=GateSettings(rule="tokens"))
    encoded = encoder(["a red triangle"])
    terms = guidance_terms(stack, encoded, BankCache(encoder))
    assert [(round(tm.gamma, 6), tm.erase, tm.alternative) for tm in terms[0]] == [(0.8, "triangle", "square")]
    hooks = AboUNetHooks(world["unet"]).attach()
    try:
        with hooks.active(terms, encode_texts(encoder, terms), with_uncond=True):
            ehs = torch.cat([encoder([""]).hidden, encoded.hidden])
            eps = world["unet"](torch.cat([x, x]), t, encoder_hidden_states=ehs).sample
    finally:
        hooks.detach()
    assert hooks.extra_rows == 2  # diffusers adds the same two rows
    eps_u, eps_c = eps.chunk(2)
    want = eps_u + 5.0 * (eps_c - eps_u)  # the pipeline's CFG on the corrected conditional prediction
    assert (ours - want).abs().max() < TOL, (ours - want).abs().max()
    plain = eps_u + 5.0 * (world["unet"](x, t, encoder_hidden_states=encoded.hidden).sample - eps_u)
    assert (ours - plain).abs().max() > 1e-3  # and it did erase something


def _relative(got, want) -> float:
    """Max error relative to the prediction's size (x0 at sigma 14 is ~14x the noise: float noise scales)."""
    return ((got - want).abs().max() / max(1.0, float(want.abs().max()))).item()


def reference_a1111(h, p, spy, terms_of_image, s_min_uncond=0.0, extra=None):
    """Every step's result computed by hand from the UNet's own predictions: A1111's CFG over the AND parts
    minus cfg * sum gamma [d(erase) - d(alternative)] (cfg 1 where the uncond was skipped), minus
    ``extra(i, d, negative, cfg, skipped)`` where given (``d(ctx)``: image i's prediction this step)."""
    dm = h.sd_model.model.diffusion_model
    conds_list = p.c[0]
    B = len(conds_list)
    enc = {}

    def text(t):
        if t not in enc:
            enc[t] = _ctx(h.sd_model.get_learned_conditioning([t]))[0]
        return enc[t]

    def d(x, s, ctx):
        return dm(x[None], timesteps=s[None], context=ctx[None])[0]

    out = []
    for step, ((x_ext, sig, cond, uncond), result) in enumerate(zip(spy.denoiser, spy.after)):
        xs, ss = x_ext[-B:], sig[-B:]
        skipped = step % 2 and s_min_uncond > 0 and float(ss[0]) < s_min_uncond
        scale = 1.0 if skipped else p.cfg_scale
        for i, parts in enumerate(conds_list):
            cs = [d(xs[i], ss[i], _ctx(cond)[k][: _ctx(cond).shape[1]]) for k, _ in parts]
            u = cs[0] if skipped else d(xs[i], ss[i], _ctx(uncond)[i])
            want = u + sum(w * scale * (c - u) for c, (_, w) in zip(cs, parts))
            for gamma, erase, alt in terms_of_image[i]:
                want = want - scale * gamma * (d(xs[i], ss[i], text(erase)) - d(xs[i], ss[i], text(alt)))
            if extra is not None:
                want = want - extra(i, lambda ctx: d(xs[i], ss[i], ctx), _ctx(uncond)[i], scale, skipped)
            den = p.denoisers[0]
            if den.mask is not None:  # img2img inpainting: the kept area is the init image's, as the webui blends
                want = want * den.nmask[0] + den.init_latent[0] * den.mask[0]
            out.append(_relative(result[i], want))
    return out


A1111_LAYOUTS = {
    "batched": dict(prompt=["a red triangle", "a green square"], batch_size=2),
    "chunked": dict(prompt=["a red triangle", "a green square"], batch_size=2, opts={"batch_cond_uncond": False}),
    "skipped-uncond": dict(prompt=["a red triangle", "a blue circle"], batch_size=2, s_min_uncond=100.0, steps=3),
    "and-parts": dict(prompt=["a green square AND a red triangle :0.7", "a blue circle"], batch_size=2),
    "long-prompt": dict(prompt=["a red triangle BREAK on a table", "a green square"], batch_size=2),
    "sdxl-dict": dict(prompt=["a red triangle", "a green square"], batch_size=2, sdxl=True),
    "img2img-mask": dict(prompt=["a red triangle", "a blue circle"], batch_size=2, img2img=True),
}
# per image: (gamma, erase, alternative) of abo_tri:0.8 (triangle -> square) and abo_circ:1 (circle -> nothing)
A1111_TERMS = {
    "batched": [[(0.8, "triangle", "square")], []],
    "chunked": [[(0.8, "triangle", "square")], []],
    "skipped-uncond": [[(0.8, "triangle", "square")], [(1.0, "circle", "")]],
    "and-parts": [[(0.8, "triangle", "square")], [(1.0, "circle", "")]],
    "long-prompt": [[(0.8, "triangle", "square")], []],
    "sdxl-dict": [[(0.8, "triangle", "square")], []],
    "img2img-mask": [[(0.8, "triangle", "square")], [(1.0, "circle", "")]],
}


@pytest.mark.parametrize("layout", list(A1111_LAYOUTS))
@torch.no_grad()
def test_abo_every_a1111_step_equals_the_rule_by_hand(world, kinds, layout):
    sc = dict(A1111_LAYOUTS[layout])
    with a1111_stub.installed("a1111") as processing:
        h = Host(world, processing, sdxl=sc.pop("sdxl", False))
        for k, v in sc.pop("opts", {}).items():
            setattr(h.shared.opts, k, v)
        if sc.pop("img2img", False):
            g = torch.Generator().manual_seed(4)
            sc.update(init_latent=torch.randn(1, 4, 8, 8, generator=g), denoising_strength=0.5, steps=4,
                      mask=(torch.rand(1, 1, 8, 8, generator=g) > 0.5).float())
        spy = Spy(sys.modules["modules.script_callbacks"])
        p, processed = h.run(sc.pop("prompt"), args("abo_tri:0.8, abo_circ:1", "tokens"), **sc)
        errors = reference_a1111(h, p, spy, A1111_TERMS[layout], sc.get("s_min_uncond", 0.0))
        assert max(errors) < TOL, errors
        firing = [bool(t) for t in A1111_TERMS[layout]]
        for i, fires in enumerate(firing):
            assert ("ConceptGate All-but-One:" in processed.infotexts[i]) == fires, processed.infotexts[i]


@pytest.mark.parametrize("kind", HOSTS)
@torch.no_grad()
def test_abo_gate_zero_adds_no_rows_and_is_bit_identical(world, kinds, kind):
    with a1111_stub.installed(kind) as processing:
        h = host_for(kind, world, processing)
        counts = []
        h.sd_model.forge_objects.unet.model.diffusion_model.register_forward_pre_hook(
            lambda m, a, k: counts.append(a[0].shape[0]), with_kwargs=True) if kind != "a1111" else \
            h.dm.register_forward_pre_hook(lambda m, a, k: counts.append(a[0].shape[0]), with_kwargs=True)
        prompts = ["a green square", "a yellow star"]
        _, plain = h.run(prompts, [False, "", "None", "additive", "tokens", False], batch_size=2)
        n_plain = list(counts)
        counts.clear()
        p, off = h.run(prompts, args("abo_tri:1, abo_circ:1", "tokens"), batch_size=2)
        assert counts == n_plain  # no extra rows
        assert all(torch.equal(a, b) for a, b in zip(plain.images, off.images))
        counts.clear()
        p, on = h.run(["a red triangle", "a yellow star"], args("abo_tri:1", "tokens"), batch_size=2)
        assert sum(counts) > sum(n_plain)


def reference_forge(h, p, terms_of_image, cfg1=False, extra=None):
    """As :func:`reference_a1111` on Forge's sampling path (``extra(i, d, negative, cfg, cfg1)``)."""
    model = p.sampled_unets[0].model
    conds_list, cond_t = p.c
    uncond_t = p.uc

    def d(x, s, ctx):
        return model.apply_model(x[None], s[None], c_crossattn=ctx[None])[0]

    # Forge's compile_weighted_conditions: one entry per AND position, whose strength is the LAST image's
    # weight at that position (a Forge quirk); the CFG scales by their sum (edit_strength)
    weights = [pos[-1][1] for pos in map(list, zip(*conds_list))]
    out = []
    for x, sig, result in p.denoisers[0].results:
        scale = 1.0 if cfg1 else p.cfg_scale
        for i, parts in enumerate(conds_list):
            cs = [(d(x[i], sig[i], _ctx(cond_t)[k]), w) for (k, _), w in zip(parts, weights)]
            mean = sum(c * w for c, w in cs) / sum(w for _, w in cs)
            if cfg1:
                want = mean
            else:
                u = d(x[i], sig[i], _ctx(uncond_t)[i])
                want = u + (mean - u) * scale * (sum(weights) if not math.isclose(sum(weights), 1.0) else 1.0)
            for gamma, erase, alt in terms_of_image[i]:
                e = _ctx(h.sd_model.get_learned_conditioning([erase]))[0]
                a = _ctx(h.sd_model.get_learned_conditioning([alt]))[0]
                want = want - scale * gamma * (d(x[i], sig[i], e) - d(x[i], sig[i], a))
            if extra is not None:
                want = want - extra(i, lambda ctx: d(x[i], sig[i], ctx), _ctx(uncond_t)[i], scale, cfg1)
            out.append(_relative(result[i], want))
    return out


FORGE_LAYOUTS = {
    "one-call": dict(prompt=["a red triangle", "a green square"], batch_size=2),
    "split-calls": dict(prompt=["a red triangle", "a blue circle"], batch_size=2, opts={"forge_split_calls": True}),
    "cfg-1": dict(prompt=["a red triangle", "a blue circle"], batch_size=2, cfg_scale=1.0),
    "and-parts": dict(prompt=["a green square AND a red triangle :0.7", "a blue circle AND a table"], batch_size=2),
    "batch-of-4": dict(prompt=["a red triangle", "a green square", "a blue circle", "a red triangle and a blue circle"],
                       batch_size=4),
}
FORGE_TERMS = {
    "one-call": [[(0.8, "triangle", "square")], []],
    "split-calls": [[(0.8, "triangle", "square")], [(1.0, "circle", "")]],
    "cfg-1": [[(0.8, "triangle", "square")], [(1.0, "circle", "")]],
    "and-parts": [[(0.8, "triangle", "square")], [(1.0, "circle", "")]],
    "batch-of-4": [[(0.8, "triangle", "square")], [], [(1.0, "circle", "")],
                   [(0.8, "triangle", "square"), (1.0, "circle", "")]],
}


@pytest.mark.parametrize("kind", ["forge", "forge-legacy"])
@pytest.mark.parametrize("layout", list(FORGE_LAYOUTS))
@torch.no_grad()
def test_abo_every_forge_step_equals_the_rule_by_hand(world, kinds, kind, layout):
    sc = dict(FORGE_LAYOUTS[layout])
    with a1111_stub.installed(kind) as processing:
        h = ForgeHost(world, processing, legacy=kind == "forge-legacy")
        for k, v in sc.pop("opts", {}).items():
            setattr(h.shared.opts, k, v)
        p, processed = h.run(sc.pop("prompt"), args("abo_tri:0.8, abo_circ:1", "tokens"), **sc)
        errors = reference_forge(h, p, FORGE_TERMS[layout], cfg1=sc.get("cfg_scale") == 1.0)
        assert max(errors) < TOL, errors
        for i, terms in enumerate(FORGE_TERMS[layout]):
            assert ("ConceptGate All-but-One:" in processed.infotexts[i]) == bool(terms), processed.infotexts[i]



# ------------------------------------------------------------------ All-but-One, in-prompt form
# abo_tri_ip (triangle -> square, settings in_prompt) swaps the word in the AND part that fires; abo_circ keeps
# the bare-word rule. Per image: (gamma, erase text, alternative text).
IN_PROMPT_A1111 = {
    "batched": (dict(prompt=["a red triangle", "a green square"], batch_size=2),
                [[(0.8, "a red triangle", "a red square")], []]),
    "and-parts": (dict(prompt=["a green square AND a red triangle in dotted style :0.7", "a blue circle"], batch_size=2),
                  [[(0.8, "a red triangle in dotted style", "a red square in dotted style")], [(1.0, "circle", "")]]),
    "sdxl-dict": (dict(prompt=["a red triangle", "a green square"], batch_size=2, sdxl=True),
                  [[(0.8, "a red triangle", "a red square")], []]),
}


@pytest.mark.parametrize("layout", list(IN_PROMPT_A1111))
@torch.no_grad()
def test_abo_in_prompt_every_a1111_step_equals_the_rule_by_hand(world, kinds, layout):
    sc, want_terms = dict(IN_PROMPT_A1111[layout][0]), IN_PROMPT_A1111[layout][1]
    with a1111_stub.installed("a1111") as processing:
        h = Host(world, processing, sdxl=sc.pop("sdxl", False))
        spy = Spy(sys.modules["modules.script_callbacks"])
        p, processed = h.run(sc.pop("prompt"), args("abo_tri_ip:0.8, abo_circ:1", "tokens"), **sc)
        errors = reference_a1111(h, p, spy, want_terms)
        assert max(errors) < TOL, errors
        n_cond = sum(len(parts) for parts in p.c[0])
        extra = spy.denoiser[0][0].shape[0] - n_cond - 2
        # one AND part: the erase row is the image's own conditional row (+1 row: the swapped prompt);
        # several parts: the firing part is predicted again with the image's latent (+2); the bare circle -> ""
        # term: +2 (A1111 may skip the unconditional rows, so they are never reused)
        assert extra == {"batched": 1, "and-parts": 4, "sdxl-dict": 1}[layout], extra
        assert _field(processed.infotexts[0], "ConceptGate All-but-One") == "abo_tri_ip:triangle>square"


@pytest.mark.parametrize("kind", ["forge", "forge-legacy"])
@pytest.mark.parametrize("layout", ["one-call", "and-parts"])
@torch.no_grad()
def test_abo_in_prompt_every_forge_step_equals_the_rule_by_hand(world, kinds, kind, layout):
    prompts = {"one-call": ["a red triangle", "a green square"],
               "and-parts": ["a green square AND a red triangle :0.7", "a blue circle AND a table"]}[layout]
    want_terms = [[(0.8, "a red triangle", "a red square")], [] if layout == "one-call" else [(1.0, "circle", "")]]
    with a1111_stub.installed(kind) as processing:
        h = ForgeHost(world, processing, legacy=kind == "forge-legacy")
        p, processed = h.run(prompts, args("abo_tri_ip:0.8, abo_circ:1", "tokens"), batch_size=2)
        errors = reference_forge(h, p, want_terms)
        assert max(errors) < TOL, errors
        assert _field(processed.infotexts[0], "ConceptGate All-but-One") == "abo_tri_ip:triangle>square"


@torch.no_grad()
def test_abo_in_prompt_differs_from_the_bare_rule_and_keeps_it_where_it_cannot_swap(world, kinds):
    """The in-prompt form changes the image (it subtracts other predictions); a prompt-editing part, which the
    webui schedules per step, and a part the gate fires on without the word keep the bare-word term."""
    from conceptgate.extension.abo import swappable, swapped_texts

    with a1111_stub.installed("a1111") as processing:
        h = Host(world, processing)
        _, bare = h.run(["a red triangle"], args("abo_tri:0.8", "tokens"))
        _, swap = h.run(["a red triangle"], args("abo_tri_ip:0.8", "tokens"))
        assert (bare.images[0] - swap.images[0]).abs().max() > 1e-3
    assert swappable("a red [triangle:circle:5]") == "" and swappable("a [red|blue] triangle") == ""
    assert swappable("a (red:1.2) [triangle]") == "a (red:1.2) [triangle]"  # emphasis is the encoder's own syntax
    stack = EraserStack().with_eraser(kinds["abo"]).with_eraser(
        abo_eraser("triangle", "square", name="ip", in_prompt=True))
    assert swapped_texts(stack, ["a (red:1.2) triangle", "a [triangle:circle:5]", "a trigon"]) == ["a (red:1.2) square"]


# ------------------------------------------------------------------ several kinds at once
MIXED = ["a red triangle", "a green square", "a watermark on a blue circle", "a red triangle with a watermark"]
MIXED_ARGS = args("tri:1, wm:1, abo_tri:0.8", "tokens")
# per image: (tri's gate, Geom tokens, All-but-One fires) under the tokens rule
MIXED_WANT = [(1.0, False, True), (0.0, False, False), (0.0, True, False), (1.0, True, True)]


def _field(info, key):
    from modules import infotext_utils

    return infotext_utils.parse_generation_parameters(info).get(key)


@pytest.mark.parametrize("kind", HOSTS)
@torch.no_grad()
def test_batch_of_four_mixing_kinds_and_prompts_gives_each_image_its_own_treatment(world, kinds, kind):
    with a1111_stub.installed(kind) as processing:
        h = host_for(kind, world, processing)
        spy = Spy(sys.modules["modules.script_callbacks"])
        _, plain = h.run(MIXED, [False, "", "None", "additive", "tokens", False], batch_size=4)
        spy.denoiser.clear()
        p, out = h.run(MIXED, MIXED_ARGS, batch_size=4)
        forge = kind != "a1111"
        for i, (tri, geom, abo) in enumerate(MIXED_WANT):
            info = out.infotexts[i]
            gates = {n: g for n, _, g in __import__("conceptgate.extension.params", fromlist=["x"]).parse_used(_field(info, "ConceptGate"))}
            # weights: per image in A1111; one set of patched weights per batch in Forge (its strongest gate)
            assert gates["tri"] == ("1.000" if forge else f"{tri:.3f}"), (i, info)
            assert gates["wm"] == ("1.000" if geom else "0.000") and gates["abo_tri"] == ("1.000" if abo else "0.000")
            assert (_field(info, "ConceptGate Geom") == "wm") == geom, info
            assert (_field(info, "ConceptGate All-but-One") == "abo_tri:triangle>square") == abo, info
        uncond = _ctx(spy.denoiser[0][3])
        assert uncond.shape[1] == 154  # Geom tokens joined images 2 and 3 only; 0 and 1 repeated (unchanged)
        for i in (0, 1):
            assert torch.equal(uncond[i, :77], uncond[i, 77:])
        for i in (2, 3):
            assert not torch.equal(uncond[i, :77], uncond[i, 77:])
        if not forge:  # image 1 asked for nothing: the same image as without the erasers
            assert torch.allclose(out.images[1], plain.images[1], atol=1e-4)
        else:  # Forge: image 1 gets the batch's weight patch (documented), nothing else
            assert not torch.allclose(out.images[1], plain.images[1], atol=1e-4)
        for i in (0, 2, 3):
            assert not torch.allclose(out.images[i], plain.images[i], atol=1e-3)


@pytest.mark.parametrize("kind", HOSTS)
def test_pasted_infotext_restores_a_mixed_stack(world, kinds, kind):
    with a1111_stub.installed(kind) as processing:
        from modules import infotext_utils

        h = host_for(kind, world, processing)
        h.script.ui(False)
        a = [True, "tri:0.9, wm:0.7, abo_tri:0.8", "None", "official", "tokens", False]
        p, processed = h.run("a red triangle with a watermark <erase:abo_circ:0.5>", a)
        params = infotext_utils.parse_generation_parameters(processed.infotexts[0])
        restored = [fn(params) for _, fn in h.script.infotext_fields]
        assert restored == a  # erasers of every kind, strengths, combine, rule; the tag comes back with the prompt
        assert params["Prompt"].endswith("<erase:abo_circ:0.5>")
        p2, again = h.run(params["Prompt"], restored)
        assert torch.equal(again.images[0], processed.images[0])  # pasting reproduces the image


@pytest.mark.parametrize("kind", HOSTS)
def test_preset_with_every_kind(world, kinds, kind):
    from conceptgate.adapters.files import load_eraser

    tri = load_eraser(os.path.join(world["folder"], "tri.safetensors"))
    wm = load_eraser(os.path.join(world["folder"], "wm.safetensors"))
    abo = load_eraser(os.path.join(world["folder"], "abo_tri.safetensors"), kind="guidance")
    stack = (EraserStack().with_eraser(tri, strength=0.7, gate=GateSettings(rule="tokens"))
             .with_eraser(wm).with_eraser(abo, strength=0.5, gate=GateSettings(rule="tokens")))
    path = os.path.join(world["folder"], f"mixed_{kind}.json")
    stack.to_manifest(path)
    try:
        with a1111_stub.installed(kind) as processing:
            h = host_for(kind, world, processing)
            p, processed = h.run("a red triangle", [True, "", f"mixed_{kind}.json", "additive", "ft", False])
            got = [(e.eraser.name, e.eraser.kind, e.strength, e.gate.rule) for e in p.conceptgate.stack.entries]
            assert got == [("tri", "weight", 0.7, "tokens"), ("wm", "conditioning", 1.0, "always"),
                           ("abo_tri", "guidance", 0.5, "tokens")]
            info = processed.infotexts[0]
            assert _field(info, "ConceptGate preset") == f"mixed_{kind}.json"
            assert _field(info, "ConceptGate Geom") == "wm" and _field(info, "ConceptGate All-but-One") == "abo_tri:triangle>square"
    finally:
        os.remove(path)


@pytest.mark.parametrize("kind", HOSTS)
def test_hires_pass_gets_its_own_gates(world, kinds, kind):
    with a1111_stub.installed(kind) as processing:
        h = host_for(kind, world, processing)
        spy = Spy(sys.modules["modules.script_callbacks"])
        p, processed = h.run(["a green square"], args("wm:1, abo_tri:1", "tokens"), enable_hr=True,
                             hr_prompt=["a red triangle with a watermark"], steps=2)
        assert len(spy.denoiser) == 4  # 2 steps, then 2 hires steps
        first, hires = spy.denoiser[:2], spy.denoiser[2:]
        assert all(_ctx(u).shape[1] == 77 for *_, u in first) and all(_ctx(u).shape[1] == 154 for *_, u in hires)
        if kind == "a1111":  # the erase / alternative rows join the hires steps only
            assert all(x.shape[0] == 2 for x, *_ in first) and all(x.shape[0] == 4 for x, *_ in hires)
        else:
            first_unet, hires_unet = p.sampled_unets
            assert "sampler_post_cfg_function" not in first_unet.model_options
            assert len(hires_unet.model_options["sampler_post_cfg_function"]) == 1


@pytest.mark.parametrize("kind", ["forge", "forge-legacy"])
def test_forge_hires_pass_at_cfg_one_has_no_negative_to_extend(world, kinds, kind):
    """Forge's hires pass at 'Hires CFG Scale' 1 (its API default) samples without a negative: the Geom tokens
    have nothing to join (found in the real Forge: the extension stopped such generations); All-but-One runs
    with w = 1."""
    with a1111_stub.installed(kind) as processing:
        h = host_for(kind, world, processing)
        spy = Spy(sys.modules["modules.script_callbacks"])
        p, processed = h.run(["a green square"], args("wm:1, abo_tri:1", "always"), enable_hr=True,
                             hr_prompt=["a red triangle with a watermark"], hr_cfg=1.0)
        assert len(processed.images) == 1 and len(spy.denoiser) == 4
        assert all(u is None for *_, u in spy.denoiser[2:])
        assert p.sampled_unets[1].model_options["sampler_post_cfg_function"]


@pytest.mark.parametrize("kind", HOSTS)
def test_img2img_with_every_kind(world, kinds, kind):
    g = torch.Generator().manual_seed(9)
    init = torch.randn(1, 4, 8, 8, generator=g)
    with a1111_stub.installed(kind) as processing:
        h = host_for(kind, world, processing)
        kw = dict(init_latent=init, denoising_strength=0.5, steps=4, batch_size=2)
        _, plain = h.run(MIXED[:2], [False, "", "None", "additive", "tokens", False], **kw)
        p, out = h.run(MIXED[:2], args("tri:1, wm:1, abo_tri:0.8", "always"), **kw)
        assert p.is_img2img and len(p.denoisers[0].__dict__) and all(
            not torch.allclose(a, b, atol=1e-3) for a, b in zip(plain.images, out.images))
        for info in out.infotexts:
            assert _field(info, "ConceptGate Geom") == "wm" and _field(info, "ConceptGate All-but-One") == "abo_tri:triangle>square"


@pytest.mark.parametrize("kind", ["forge", "forge-legacy"])
@torch.no_grad()
def test_forge_per_row_weights_give_each_image_its_own_gate(world, kinds, kind):
    """Opt-in (setting conceptgate_forge_per_row): weight erasers as per-row hooks on Forge, so a batch of 4
    mixing target and unrelated prompts gives each image the weights its prompt alone would get."""
    a = args("tri:1, wm:1, abo_tri:0.8", "tokens")
    with a1111_stub.installed(kind) as processing:
        h = host_for(kind, world, processing)
        # reference for image i: a batch of 4 copies of its prompt (the same noise), patched at its own gate
        singles = [h.run([prompt] * 4, a, batch_size=4)[1].images[i] for i, prompt in enumerate(MIXED)]
        _, plain = h.run(MIXED, [False, "", "None", "additive", "tokens", False], batch_size=4)
        h.shared.opts.conceptgate_forge_per_row = True
        p, out = h.run(MIXED, a, batch_size=4)
        assert not p.sampled_unets[0].lora_patches if kind == "forge" else not p.sampled_unets[0].patches
        for i, (tri, geom, abo) in enumerate(MIXED_WANT):
            gates = dict((n, g) for n, _, g in __import__("conceptgate.extension.params", fromlist=["x"]).parse_used(
                _field(out.infotexts[i], "ConceptGate")))
            assert gates["tri"] == f"{tri:.3f}", out.infotexts[i]
            assert torch.allclose(out.images[i], singles[i], atol=1e-3), (i, (out.images[i] - singles[i]).abs().max())
        # the unrelated image is untouched: gate 0, only the batch's float rounding differs (a batch of 4 through
        # per-row hooks vs the plain one: above 1e-4 with the PyPI stack of 2026-12-01, also at the previous commit)
        diff = float((out.images[1] - plain.images[1]).abs().max())
        assert diff < 1e-3, diff
        dm = h.sd_model.forge_objects.unet.model.diffusion_model
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in dm.modules())  # removed afterwards

"""Half precision (issue 19, CPU part): every eraser path in fp16 and bf16 against its own fp32 result.

What "agrees" means. A model run in half precision already differs from its fp32 original by its own
rounding; an eraser path cannot be closer to fp32 than that. So most tests measure two errors against
the fp32 run of the same host path,

    own  = the half model without the eraser (or with the eraser merged into its half weights once),
    err  = the half model with the eraser applied by the path under test,

both as ``max |half - fp32| / max |fp32|``, and assert ``err <= RATIO * own + FLOOR_UNITS * u`` with
``u`` the dtype's unit roundoff (fp16 2^-11, bf16 2^-8). RATIO = 2 says "the path adds at most about as
much error as the half model itself has"; the floor (8 u: 3.9e-3 fp16, 3.1e-2 bf16) keeps the bound
meaningful where ``own`` happens to be tiny. Closed-form edits (UCE/RECE) are checked exactly instead:
the stored delta is the float64 solve on the half weights, rounded once to the weight's dtype.

Gate 0 (and strength 0) must stay bit-identical (``torch.equal``) to no eraser *in that dtype*.

The measured errors are collected in ``MEASURED``; ``CG_HALF_REPORT=path`` writes them as JSON (the
figures in BENCHMARKS.md, "half precision", come from such a run). CPU kernels accumulate fp16 differently
from CUDA's, so these are correctness checks, not GPU figures (tools/gpu_half_precision.py measures those).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from conceptgate.adapters import EraserStack, GateSettings, RowGatedDeltas, dense_deltas, layout_from_diffusers_config
from conceptgate.adapters.synthetic import random_eraser
from tiny_models import WIDTH, tiny_text_encoder, tiny_unet, tiny_vae

pytestmark = pytest.mark.usefixtures("one_thread")

HALF = [torch.float16, torch.bfloat16]
IDS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
U = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}  # unit roundoff
RATIO, FLOOR_UNITS = 2.0, 8
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(REPO, "toyworld", "data", "tokenizer")
MEASURED: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    path = os.environ.get("CG_HALF_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(MEASURED, f, indent=1, sort_keys=True)


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().float(), ref.detach().float()
    return float((a - ref).abs().max() / ref.abs().max())


def check_agrees(path: str, dtype, err: float, own: float, ratio: float = RATIO, floor_units: float = FLOOR_UNITS):
    bound = ratio * own + floor_units * U[dtype]
    MEASURED[f"{path} [{IDS[dtype]}]"] = {"err": err, "own": own, "bound": bound}
    assert err <= bound, f"{path} in {IDS[dtype]}: error {err:.2e} > {ratio} x own {own:.2e} + {floor_units} u"


def finite(*ts) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in ts)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        # diffusers warns on every UNet .to(half) that it keeps no module in float32 (there are none)
        warnings.filterwarnings("ignore", message=".*kept in float32.*")
        from diffusers.utils import logging as dlog

        level = dlog.get_verbosity()
        dlog.set_verbosity_error()
        yield
        dlog.set_verbosity(level)


def unet_inputs(batch, seed=0, size=8, width=WIDTH):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, size, size, generator=g), torch.full((batch,), 400), torch.randn(batch, 77, width, generator=g)


def run_unet(unet, x, t, ctx):
    dt = unet.dtype
    with torch.no_grad():
        return unet(x.to(dt), t, ctx.to(dt)).sample


def merged_copy(unet, deltas):
    """``unet`` with ``W + delta`` formed in float32 and rounded once to the weight's dtype."""
    u = copy.deepcopy(unet)
    with torch.no_grad():
        for name, d in deltas.items():
            w = u.get_submodule(name).weight
            w.copy_((w.float() + d.float()).to(w.dtype))
    return u


# ------------------------------------------------------------------ dense deltas (the hosts' merges)
@pytest.mark.parametrize("dtype", HALF, ids=IDS.get)
def test_dense_deltas_round_once(dtype):
    """A dense delta asked for in half precision is the float32 product rounded once (it used to be formed
    in half: up @ down rounded, then the scale and every partial sum rounded again)."""
    layout = layout_from_diffusers_config(tiny_unet().config)
    a = random_eraser(layout, rank=3, seed=1, scale=0.3, name="a")
    b = random_eraser(layout, rank=3, seed=2, scale=0.3, name="b")
    for name, d in a.modules.items():
        assert torch.equal(d.full(dtype), d.full().to(dtype)), name
    for combine in ("additive", "official"):
        stack = EraserStack(combine=combine).with_eraser(a).with_eraser(b)
        c = torch.tensor([0.7, 0.45])
        ref = dense_deltas(stack, c)
        for name, d in dense_deltas(stack, c, dtype).items():
            assert d.dtype == dtype and torch.equal(d, ref[name].to(dtype)), (combine, name)


# ------------------------------------------------------------------ diffusers per-row hooks
@pytest.mark.parametrize("combine", ["additive", "official"])
@pytest.mark.parametrize("linear_proj", [False, True], ids=["conv-proj", "linear-proj"])
@pytest.mark.parametrize("dtype", HALF, ids=IDS.get)
def test_row_hooks_in_half_precision(dtype, linear_proj, combine):
    """RowGatedDeltas on a half UNet (linear fast path and the conv / official delta path): a gate-0 row of
    a mixed batch and an all-zero batch are bit-identical to no eraser; the gated rows agree with fp32 as
    well as the eraser merged into the half weights does."""
    u32 = tiny_unet(linear_proj=linear_proj)
    layout = layout_from_diffusers_config(u32.config)
    stack = EraserStack(combine=combine)
    for seed in (1, 2):  # moderate erasers: they move the output by ~10% of its range
        stack = stack.with_eraser(random_eraser(layout, rank=2, seed=seed, scale=0.1, name=f"e{seed}"))
    rows = torch.tensor([[0.0, 0.0], [0.8, 0.35], [0.3, 1.0]])
    x, t, ctx = unet_inputs(3)
    u16 = copy.deepcopy(u32).to(dtype)
    out = {}
    for u in (u32, u16):
        base = run_unet(u, x, t, ctx)
        with RowGatedDeltas(stack, u.get_submodule) as hooks:
            inert = run_unet(u, x, t, ctx)  # attached, no coefficients
            with hooks.coefficients(rows):
                hooked = run_unet(u, x, t, ctx)
            with hooks.coefficients(torch.zeros_like(rows)):
                zero = run_unet(u, x, t, ctx)
        merged = torch.cat([run_unet(merged_copy(u, dense_deltas(stack, rows[i])), x[i:i + 1], t[i:i + 1], ctx[i:i + 1])
                            for i in (1, 2)])
        assert hooked.dtype == u.dtype and finite(hooked, merged)
        assert torch.equal(inert, base) and torch.equal(zero, base)
        assert torch.equal(hooked[0], base[0])  # gate 0 in a mixed batch: bit-identical in this dtype
        out[u.dtype] = (base, hooked[1:], merged)
    b32, h32, m32 = out[torch.float32]
    b, h, m = out[dtype]
    assert rel(h32, b32[1:]) > 0.05  # the eraser does something
    check_agrees(f"diffusers row hooks {'linear' if linear_proj else 'conv'}-proj {combine}", dtype,
                 rel(h, h32), rel(m, m32))


# ------------------------------------------------------------------ SPM membranes
@pytest.mark.parametrize("dtype", HALF, ids=IDS.get)
def test_spm_membranes_in_half_precision(dtype):
    """Membranes (SPM's training-time hooks) on a half UNet: multiplier 0 is bit-identical, multiplier 1
    agrees with fp32 and with the same factors applied as an eraser by RowGatedDeltas; the float32 factors
    get finite float32 gradients through a half forward pass."""
    from conceptgate.adapters.spm.membranes import Membranes, spm_module_names

    u32 = tiny_unet()
    names = spm_module_names(u32)
    mem = Membranes(u32, names, rank=1, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        g = torch.Generator().manual_seed(4)
        for p in mem.up.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    x, t, ctx = unet_inputs(2)
    u16 = copy.deepcopy(u32).to(dtype)
    out = {}
    for u in (u32, u16):
        base = run_unet(u, x, t, ctx)
        mem.attach(u)
        try:
            assert torch.equal(run_unet(u, x, t, ctx), base)  # multiplier 0
            with mem.on(1.0):
                on = run_unet(u, x, t, ctx)
                loss = u(x.to(u.dtype), t, ctx.to(u.dtype)).sample.float().square().mean()
                mem.zero_grad()
                loss.backward()
                grads = torch.cat([p.grad.flatten() for p in mem.down.values()])
        finally:
            mem.detach()
        with RowGatedDeltas(EraserStack().with_eraser(mem.to_eraser("concept")), u.get_submodule) as hooks, \
                hooks.coefficients(torch.tensor([1.0])):
            as_eraser = run_unet(u, x, t, ctx)
        assert on.dtype == u.dtype and finite(on, grads) and grads.dtype == torch.float32
        out[u.dtype] = (base, on, as_eraser, grads)
    b32, on32, e32, g32 = out[torch.float32]
    b, on, e, g = out[dtype]
    assert rel(on32, b32) > 0.05
    check_agrees("SPM membranes (multiplier 1)", dtype, rel(on, on32), rel(b, b32))
    check_agrees("SPM membranes vs the same factors as an eraser", dtype, rel(e, on), rel(b, b32))
    cos = float(torch.nn.functional.cosine_similarity(g.double(), g32.double(), dim=0))
    MEASURED[f"SPM membrane gradient cosine [{IDS[dtype]}]"] = cos
    assert cos > 0.98  # a training step in half points the same way (measured >= 0.999)


# ------------------------------------------------------------------ attention backends
def _processors():
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    out = [("classic", AttnProcessor), ("sdpa", AttnProcessor2_0)]
    return out


def _xformers_processor():
    try:
        import xformers.ops  # noqa: F401
        from diffusers.models.attention_processor import XFormersAttnProcessor
    except Exception:  # not installed, or built without the kernels this machine needs
        return None
    return XFormersAttnProcessor


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=IDS.get)
def test_hooks_are_the_same_with_every_attention_backend(dtype):
    """The hooks sit on the projections (to_q/k/v/out, proj_in/out, ff), not inside attention: the eraser's
    effect is the same whether attention runs through diffusers' classic processor or PyTorch SDPA (and
    xformers where it is importable and usable). The backends themselves differ only by rounding."""
    u = tiny_unet(linear_proj=True).to(dtype)
    layout = layout_from_diffusers_config(u.config)
    stack = EraserStack().with_eraser(random_eraser(layout, rank=2, seed=1, scale=0.1))
    x, t, ctx = unet_inputs(2)
    results = {}
    for name, proc in _processors():
        u.set_attn_processor(proc())
        base = run_unet(u, x, t, ctx)
        with RowGatedDeltas(stack, u.get_submodule) as hooks:
            with hooks.coefficients(torch.tensor([[0.0], [1.0]])):
                hooked = run_unet(u, x, t, ctx)
        assert torch.equal(hooked[0], base[0])
        results[name] = (base, hooked)
    b0, h0 = results["sdpa"]
    scale = float(h0[1].abs().max())
    for name, (b, h) in results.items():
        if name == "sdpa":
            continue
        # the effect (hooked - base) per backend, relative to the output's range; in fp16 the backends'
        # own rounding difference (on the base output) is the reference
        err = float(((h[1] - b[1]) - (h0[1] - b0[1])).float().abs().max()) / scale
        if dtype == torch.float32:
            MEASURED[f"attention backend {name} vs sdpa, eraser effect [fp32]"] = err
            assert err <= 1e-5, (name, err)
        else:
            check_agrees(f"attention backend {name} vs sdpa, eraser effect", dtype, err,
                         float((b[1] - b0[1]).float().abs().max()) / scale)


def test_xformers_backend_or_skip():
    """xformers through the same check where it can run (it needs CUDA kernels); skipped otherwise."""
    xf = _xformers_processor()
    if xf is None or not torch.cuda.is_available():
        pytest.skip("xformers not importable or no CUDA device")
    u = tiny_unet(linear_proj=True).to("cuda", torch.float16)
    layout = layout_from_diffusers_config(u.config)
    stack = EraserStack().with_eraser(random_eraser(layout, rank=2, seed=1, scale=0.1))
    x, t, ctx = (v.to("cuda") for v in unet_inputs(2))
    res = []
    for proc in (xf, _processors()[1][1]):
        u.set_attn_processor(proc())
        base = run_unet(u, x, t, ctx)
        with RowGatedDeltas(stack, u.get_submodule) as hooks, hooks.coefficients(torch.tensor([[0.0], [1.0]])):
            hooked = run_unet(u, x, t, ctx)
        assert torch.equal(hooked[0], base[0])
        res.append(hooked[1] - base[1])
    assert rel(res[0], res[1]) <= FLOOR_UNITS * U[torch.float16]


# ------------------------------------------------------------------ ComfyUI
def comfy_model_in(unet, dtype, manual_cast=None):
    """A ComfyUI ModelPatcher of a diffusers UNet with weights stored in ``dtype``, computing in ``dtype``
    (``--fp16-unet`` / ``--bf16-unet`` on a device that computes in it) or, with ``manual_cast``, in that
    dtype (what ComfyUI does on devices without half compute: weights cast per layer)."""
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils
    from conceptgate.nodes import comfy_models

    cfg = comfy_models.comfy_unet_config(unet.config)
    mc = comfy.supported_models.SD15(dict(cfg))
    mc.unet_config.update(num_heads=cfg["num_heads"], num_head_channels=-1)
    mc.set_inference_dtype(dtype, manual_cast)
    base = mc.get_model({}, device=torch.device("cpu"))
    mapping = comfy.utils.unet_to_diffusers(cfg)
    missing, _ = base.load_state_dict({"diffusion_model." + mapping[k]: v.to(dtype) for k, v in unet.state_dict().items()},
                                      strict=False)
    assert not [k for k in missing if k.startswith("diffusion_model.")]
    base.diffusion_model.to(dtype)
    return comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


@pytest.fixture(scope="module")
def comfy_world(comfy):
    from conceptgate.nodes import comfy_models

    unet = tiny_unet(seed=5)
    clip = comfy_models.text_encoder_to_comfy(tiny_text_encoder(seed=5))
    layout = layout_from_diffusers_config(unet.config)
    erasers = [random_eraser(layout, concepts=["red triangle"], seed=11, scale=0.1, name="tri"),
               random_eraser(layout, concepts=["blue circle"], seed=12, scale=0.1, rank=1, name="circ")]
    return {"unet": unet, "clip": clip, "erasers": erasers, "fp32": {}}


def _comfy_stack(erasers, strengths):
    stack = EraserStack()
    for e, s in zip(erasers, strengths):
        stack = stack.with_eraser(e, strength=s, gate=GateSettings(rule="always"))
    return stack


def _comfy_runs(cw, model):
    from comfy_sampling import encode, sample
    from conceptgate.nodes import comfy_glue

    clip = cw["clip"]
    pos, neg = encode(clip, "a red triangle"), encode(clip, "")
    stack = _comfy_stack(cw["erasers"], (0.9, 0.6))
    coeffs = torch.tensor([0.9, 0.6])
    return {"base": sample(model, pos, neg),
            "weights": sample(comfy_glue.weight_patched(model, stack, coeffs), pos, neg),
            "rows": sample(comfy_glue.row_gated(model, stack, clip), pos, neg),
            "weights at gate 0": sample(comfy_glue.weight_patched(model, stack, torch.zeros(2)), pos, neg),
            "rows at strength 0": sample(comfy_glue.row_gated(model, _comfy_stack(cw["erasers"], (0.0, 0.0)), clip),
                                         pos, neg)}


@pytest.mark.parametrize("manual_cast", [None, torch.float32], ids=["half-compute", "manual-cast"])
@pytest.mark.parametrize("dtype", HALF, ids=IDS.get)
def test_comfyui_weight_patches_and_row_hooks(comfy_world, dtype, manual_cast):
    """ComfyUI models stored in half (``--fp16-unet`` style), computing in half or manual-casting to fp32:
    ComfyUI's own LoRA patching of our patches (it computes W + delta in fp32 and rounds once) and our
    per-row hooks agree with the fp32 model; gate 0 / strength 0 are bit-identical to the model alone;
    the model's weights keep their dtype and values."""
    if "ref" not in comfy_world["fp32"]:
        comfy_world["fp32"]["ref"] = _comfy_runs(comfy_world, comfy_model_in(comfy_world["unet"], torch.float32))
    ref = comfy_world["fp32"]["ref"]
    model = comfy_model_in(comfy_world["unet"], dtype, manual_cast)
    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    got = _comfy_runs(comfy_world, model)
    assert finite(*got.values())
    assert torch.equal(got["weights at gate 0"], got["base"]) and torch.equal(got["rows at strength 0"], got["base"])
    after = model.model.diffusion_model.state_dict()
    assert all(after[k].dtype == dtype and torch.equal(after[k], v) for k, v in before.items())
    assert rel(ref["weights"], ref["base"]) > 0.05
    own = rel(got["base"], ref["base"])
    label = "manual cast fp32" if manual_cast else "half compute"
    check_agrees(f"ComfyUI weight patches, {label}", dtype, rel(got["weights"], ref["weights"]), own)
    check_agrees(f"ComfyUI per-row hooks, {label}", dtype, rel(got["rows"], ref["rows"]), own)


def test_comfyui_attention_functions_give_the_same_eraser(comfy_world, monkeypatch):
    """ComfyUI's own attention functions (basic, PyTorch SDPA, sub-quadratic, split) under the per-row
    hooks: the same sampled result up to the functions' own rounding, in fp32 and fp16 compute."""
    import comfy.ldm.modules.attention as attention
    from comfy_sampling import encode, sample
    from conceptgate.nodes import comfy_glue

    clip = comfy_world["clip"]
    pos, neg = encode(clip, "a red triangle"), encode(clip, "")
    stack = _comfy_stack(comfy_world["erasers"][:1], (1.0,))
    for dtype in (torch.float32, torch.float16):
        model = comfy_model_in(comfy_world["unet"], dtype)
        runs = {}
        for name in ("attention_basic", "attention_pytorch", "attention_sub_quad", "attention_split"):
            monkeypatch.setattr(attention, "optimized_attention", getattr(attention, name))
            runs[name] = sample(model, pos, neg), sample(comfy_glue.row_gated(model, stack, clip), pos, neg)
        b0, h0 = runs["attention_pytorch"]
        scale = float(h0.abs().max())
        for name, (b, h) in runs.items():
            if name == "attention_pytorch":
                continue
            # the eraser's effect per function, relative to the output's range; in fp16 the functions' own
            # rounding difference (on the model without eraser) is the reference
            err = float(((h - b) - (h0 - b0)).abs().max()) / scale
            if dtype == torch.float32:
                MEASURED[f"ComfyUI {name} vs attention_pytorch, eraser effect [fp32]"] = err
                assert err <= 1e-5, (name, err)
            else:
                check_agrees(f"ComfyUI {name} vs attention_pytorch, eraser effect", dtype, err,
                             float((b - b0).abs().max()) / scale)


# ------------------------------------------------------------------ the webui stand-in
from test_a1111_webui import Host, world  # noqa: E402,F401  (module fixture)


def _upcast_sampling(dm):
    """What A1111's ``--upcast-sampling`` (and Forge) do around a half UNet: the sampler's fp32 latents and
    conditioning are cast to the UNet's dtype, its output back to fp32. (A1111's default, fp16 weights under
    CUDA autocast, cannot run on the CPU: CPU autocast does not cover group_norm with half weights; the GPU
    script runs that mode.)"""
    dt = next(dm.parameters()).dtype

    def pre(module, args, kwargs):
        cast = lambda v: v.to(dt) if torch.is_tensor(v) and v.is_floating_point() else v  # noqa: E731
        return tuple(cast(a) for a in args), {k: (v if k == "timesteps" else cast(v)) for k, v in kwargs.items()}

    dm.register_forward_pre_hook(pre, with_kwargs=True)
    dm.register_forward_hook(lambda module, args, out: out.float())


def _webui_run(world, dtype, args):
    import a1111_stub

    with a1111_stub.installed("a1111") as processing:
        h = Host(world, processing)
        if dtype != torch.float32:
            h.dm.to(dtype)
            _upcast_sampling(h.dm)
        p, processed = h.run(["a red triangle", "a green square"], args, batch_size=2, steps=2)
        return torch.stack(processed.images)


@pytest.mark.parametrize("dtype", HALF, ids=IDS.get)
def test_webui_stand_in_with_half_weights(world, dtype):
    """The A1111 glue (per-row hooks, gates from the CFG batch) on a half LDM UNet: strength 0 is bit-identical
    to the extension switched off; the erased run agrees with fp32 as well as the plain half model does."""
    on = [True, "tri:1, circ:0.6", "None", "additive", "ft", False]
    zero = [True, "tri:0", "None", "additive", "ft", False]
    off = [False, "", "None", "additive", "ft", False]
    ref_on, ref_off = _webui_run(world, torch.float32, on), _webui_run(world, torch.float32, off)
    got_on, got_zero, got_off = (_webui_run(world, dtype, a) for a in (on, zero, off))
    assert finite(got_on, got_off)
    assert torch.equal(got_zero, got_off)
    assert rel(ref_on, ref_off) > 0.05
    check_agrees("webui stand-in (A1111 glue, upcast sampling)", dtype, rel(got_on, ref_on), rel(got_off, ref_off))


# ------------------------------------------------------------------ UCE / RECE
def _kv_weights(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"l{i}": (torch.randn(320 if i % 2 else 160, WIDTH, generator=g) * 0.05).to(dtype) for i in range(4)}


@pytest.mark.parametrize("dtype", HALF, ids=IDS.get)
def test_uce_rece_solve_in_float64_store_in_the_weight_dtype(dtype):
    """UCE and RECE on half weights: deltas in the weight's dtype, equal to the float64 solve on those very
    weights rounded ONCE (RECE used to add its epochs to the start delta already rounded to fp16 / bf16, a
    second rounding); agreement with the edit of the fp32 weights at the level of the weights' own rounding
    (4 u: the solve is linear in W, measured 0.6 u)."""
    from conceptgate.adapters.rece import closed_form as cf

    g = torch.Generator().manual_seed(1)
    c, gd = torch.randn(77, WIDTH, generator=g), torch.randn(77, WIDTH, generator=g)
    pres = torch.randn(30, WIDTH, generator=g)
    w32, w = _kv_weights(torch.float32), _kv_weights(dtype)
    w64 = {k: v.double() for k, v in w.items()}  # the half weights' exact values
    out = {}
    for name, ws in (("fp32", w32), ("half", w), ("exact", w64)):
        uce = cf.uce_edit(ws, c[:3], gd[:3], pres)
        rece = cf.rece_edit(ws, c, gd, pres, start=uce, epochs=2, lam_reg=0.1)
        out[name] = (uce, rece, rece.deltas_after(1))
    for i, what in enumerate(("UCE", "RECE", "RECE after epoch 1")):
        half, exact, ref = out["half"][i], out["exact"][i], out["fp32"][i]
        for k in w:
            assert half[k].dtype == dtype and finite(half[k])
            assert torch.equal(half[k], exact[k].to(dtype)), (what, k)
        err = max(float((half[k].double() - ref[k].double()).norm() / ref[k].double().norm()) for k in w)
        MEASURED[f"{what} delta of half weights vs of fp32 weights (Frobenius) [{IDS[dtype]}]"] = err
        assert err <= 4 * U[dtype], (what, err)
    assert next(iter(cf.apply_deltas(w, out["half"][0]).values())).dtype == dtype


@pytest.fixture(scope="module")
def tiny_pipe_parts():
    from transformers import CLIPTokenizer

    return {"tokenizer": CLIPTokenizer.from_pretrained(TOKENIZER), "unet": tiny_unet(2),
            "text_encoder": tiny_text_encoder(2), "vae": tiny_vae(2)}


@pytest.mark.parametrize("dtype", HALF, ids=IDS.get)
def test_uce_rece_edit_of_a_half_model(tiny_pipe_parts, dtype):
    """compute_edit on a diffusers model loaded in half (UNet and text encoder): finite deltas in the weight's
    dtype, factors in the chosen store dtype that reproduce them, the edit equal (bit for bit) to the float64
    solve on what that host gives (its half weights' exact values and its half text states) rounded once,
    and the erased model finite under the hooks, gate 0 bit-identical.
    Against the fp32 model's edit the difference is the text encoder's half-precision error amplified by the
    solve (measured ~13x for UCE, ~28x for 2 RECE epochs), so that comparison is bounded by 40x that error."""
    from conceptgate.adapters.rece import DiffusersEditHost, EditSpec, compute_edit

    tok = tiny_pipe_parts["tokenizer"]
    u32, te32 = tiny_pipe_parts["unet"], tiny_pipe_parts["text_encoder"]
    u, te = copy.deepcopy(u32).to(dtype), copy.deepcopy(te32).to(dtype)
    h32, h = DiffusersEditHost(u32, tok, te32), DiffusersEditHost(u, tok, te)

    class Exact(DiffusersEditHost):  # the same host, its weights handed over as exact float64 values
        def cross_attention_weights(self):
            return {k: v.double() for k, v in super().cross_attention_weights().items()}

    exact_host = Exact(u, tok, te)
    texts = ["red triangle", "a photo of a red triangle", "art"]
    text_err = rel(h.encode(texts)[0], h32.encode(texts)[0])
    for method, kw in (("uce", {}), ("rece", {"epochs": 2})):
        spec = EditSpec(concepts=["red triangle"], method=method, **kw)
        ref = compute_edit(h32, spec, cache=None).result
        exact = compute_edit(exact_host, spec, cache=None).result
        for store in (torch.float32, dtype):
            o = compute_edit(h, spec, cache=None, store_dtype=store)
            for k, d in o.result.items():
                assert d.dtype == dtype and finite(d) and torch.equal(d, exact[k].to(dtype)), (method, k)
                m = o.eraser.modules[k]
                assert m.up.dtype == store and m.down.dtype == store
                assert float((m.full().double() - d.double()).norm() / d.double().norm()) <= 4 * U[dtype]
        err = max(float((o.result[k].double() - ref[k].double()).norm() / ref[k].double().norm()) for k in ref)
        MEASURED[f"{method.upper()} edit of a half model vs of the fp32 model [{IDS[dtype]}]"] = \
            {"err": err, "text_states_err": text_err}
        assert err <= 40 * text_err + 4 * U[dtype], (method, err, text_err)
    stack = EraserStack().with_eraser(o.eraser)
    x, t, ctx = unet_inputs(2)
    with RowGatedDeltas(stack, u.get_submodule) as hooks, hooks.coefficients(torch.tensor([[0.0], [1.0]])):
        out = run_unet(u, x, t, ctx)
    assert finite(out) and torch.equal(out[0], run_unet(u, x, t, ctx)[0])


@pytest.mark.parametrize("file_dtype", HALF, ids=IDS.get)
def test_import_of_a_half_precision_published_file(tmp_path, file_dtype):
    """A published UCE file stored in fp16 / bf16 against an fp32 base: its rounding noise is not taken for
    rank (a bf16 file used to come out at rank 26-44 with a 'wrong base?' warning instead of rank 3)."""
    from safetensors.torch import save_file
    from conceptgate.adapters.rece import closed_form as cf
    from conceptgate.adapters.rece import import_published

    w = cf.collect_cross_attention_weights(tiny_unet(2))
    g = torch.Generator().manual_seed(0)
    edit = cf.uce_edit(w, torch.randn(3, WIDTH, generator=g), torch.randn(3, WIDTH, generator=g))
    path = tmp_path / "uce_triangle.safetensors"
    save_file({k + ".weight": (w[k].double() + edit[k].double()).to(file_dtype).contiguous() for k in w}, str(path))
    o = import_published(path, w, concepts=["triangle"])
    assert o.report["rank_max"] == 3 and not o.report["warnings"]
    # what the factors carry is the edit up to the file's own rounding
    for k, m in o.eraser.modules.items():
        err = float((m.full().double() - edit[k].double()).norm() / edit[k].double().norm())
        assert err <= 0.05 if file_dtype == torch.bfloat16 else err <= 0.01
    MEASURED[f"published UCE file import rank [{IDS[file_dtype]}]"] = o.report["rank_max"]


# ------------------------------------------------------------------ Geom-Erasing
@pytest.fixture(scope="module")
def toy_text():
    from conceptgate import toyworld
    from conceptgate.adapters import geom as G
    from conceptgate.adapters.files import load_eraser

    pipe = toyworld.load_pipeline()
    eraser = G.validate(load_eraser(os.path.join(REPO, "toyworld", "erasers", "geom_watermark.safetensors")))
    return pipe.tokenizer, pipe.text_encoder, eraser


@pytest.mark.parametrize("dtype", HALF, ids=IDS.get)
def test_geom_negative_with_a_half_text_encoder(toy_text, dtype):
    """Geom's negative prompt (learned concept + location vectors in the text encoder) with the text encoder
    in half: accepted (a bf16 table used to fail the fp16-based fingerprint check), the gated-off row is
    the plain negative bit for bit, the gated-on row agrees with fp32 as well as plain text does; the diffusers
    handler hands the embeddings over in the UNet's dtype."""
    from types import SimpleNamespace

    from conceptgate.adapters.geom.negative import diffusers_handler, encode_negative

    tok, te32, eraser = toy_text
    te = copy.deepcopy(te32).to(dtype)
    ref = encode_negative(eraser, tok, te32, ["", ""], on=[True, False])
    got = encode_negative(eraser, tok, te, ["", ""], on=[True, False])
    # The plain negative as a host encodes it for the same batch of two: a half-precision matmul's rounding
    # may follow the batch size (CPU kernels pick their blocking by shape; CI's CPU did so for bf16), so a
    # batch of one is not a bit-exact reference for a row of a batch of two.
    ids = tok(["", ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        plain = te(ids)[0][1:]
    assert got.dtype == dtype and finite(got)
    assert torch.equal(got[1:], plain)
    check_agrees("Geom negative prompt (learned vectors)", dtype, rel(got[0], ref[0]), rel(got[1], ref[1]))
    pipe = SimpleNamespace(tokenizer=tok, text_encoder=te, unet=SimpleNamespace(dtype=dtype))
    entry = SimpleNamespace(eraser=eraser)
    neg = diffusers_handler(pipe, [entry], ["a", "b"], torch.tensor([[1.0], [0.0]]))["negative_prompt_embeds"]
    assert neg.dtype == dtype and torch.equal(neg, got)


# ------------------------------------------------------------------ All-but-One
def _tiny_pipe(parts, dtype):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    p = StableDiffusionPipeline(vae=copy.deepcopy(parts["vae"]), text_encoder=copy.deepcopy(parts["text_encoder"]),
                                tokenizer=parts["tokenizer"], unet=copy.deepcopy(parts["unet"]),
                                scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    return p.to(dtype=dtype)


def _latents(n, size=8):
    return torch.stack([torch.randn(4, size, size, generator=torch.Generator().manual_seed(s)) for s in range(n)])


@pytest.mark.parametrize("dtype", HALF, ids=IDS.get)
def test_all_but_one_guidance_in_half_precision(tiny_pipe_parts, dtype):
    """ABO guidance on a half pipeline (UNet, text encoder, VAE): gate 0 is bit-identical to plain CFG, a
    firing prompt agrees with fp32 as well as plain sampling does; the correction is formed in float32."""
    from conceptgate.adapters.abo.guidance import AboPlan, Term, abo_eraser
    from conceptgate.adapters.abo.pipeline import AboGuidedPipeline

    prompts = ["a red triangle", "a blue circle"]
    firing = EraserStack().with_eraser(abo_eraser("red triangle", "square"), gate=GateSettings(rule="tokens", threshold=0.9,
                                                                                               temperature=0.0))
    silent = EraserStack().with_eraser(abo_eraser("red triangle", "square"), strength=0.0, gate=GateSettings(rule="always"))

    def runs(pipe):
        kw = dict(num_inference_steps=3, guidance_scale=5.0, output_type="pt")
        dt = pipe.unet.dtype
        plain = pipe(prompt=prompts, latents=_latents(2).to(dt), **kw).images
        with AboGuidedPipeline(pipe, firing) as guided:
            fired = guided(prompts, latents=_latents(2).to(dt), **kw).images
            assert [bool(t) for t in guided.last_terms] == [True, False]
        with AboGuidedPipeline(pipe, silent) as guided:
            quiet = guided(prompts, latents=_latents(2).to(dt), **kw).images
        return plain, fired, quiet

    p32, f32, _ = runs(_tiny_pipe(tiny_pipe_parts, torch.float32))
    plain, fired, quiet = runs(_tiny_pipe(tiny_pipe_parts, dtype))
    assert finite(plain, fired) and torch.equal(quiet, plain)
    assert rel(f32[0], p32[0]) > 0.01
    own = rel(plain[0], p32[0])
    check_agrees("All-but-One guidance (tiny pipeline, decoded)", dtype, rel(fired[0], f32[0]), own)
    # the clean prompt shares its UNet calls with the firing one's extra rows: equal up to batching
    check_agrees("All-but-One guidance, clean row of a mixed batch vs plain", dtype, rel(fired[1], plain[1]), 0.0)
    # the correction of half predictions, in float32
    g = torch.Generator().manual_seed(0)
    eps = [torch.randn(1, 4, 8, 8, generator=g) for _ in range(3)]
    plan = AboPlan.build([[Term(0.7, "t", "s")]], {"t": torch.ones(3, 2), "s": torch.zeros(3, 2)})
    corr = plan.correction(eps[0].to(dtype), None, torch.cat([eps[1], eps[2]]).to(dtype))
    exact = 0.7 * (eps[1].to(dtype).double() - eps[2].to(dtype).double())
    assert corr.dtype == torch.float32 and float((corr.double() - exact).abs().max()) <= 1e-6


# ------------------------------------------------------------------ the toy model, end to end
@pytest.fixture(scope="module")
def toy_fp32():
    return _toy_runs(torch.float32)


def _toy_runs(dtype):
    from conceptgate import toyworld
    from conceptgate.adapters import load_eraser
    from conceptgate.adapters.diffusers_host import GatedPipeline

    pipe = toyworld.load_pipeline(dtype=dtype)
    eraser = load_eraser(os.path.join(REPO, "toyworld", "erasers", "spm_triangle.safetensors"))
    prompts = ["a red triangle in striped style", "a blue circle in plain style"]
    kw = dict(num_inference_steps=2, guidance_scale=5.0, output_type="pt")
    plain = pipe(prompt=prompts, latents=_latents(2, 16).to(dtype), **kw).images
    with GatedPipeline(pipe, EraserStack().with_eraser(eraser)) as gated:
        erased = gated(prompts, latents=_latents(2, 16).to(dtype), **kw).images
        gates = gated.last_coefficients.flatten().tolist()
        notes = dict(gated.banks.notes)
    return plain, erased, gates, notes


@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float16, marks=pytest.mark.slow)], ids=IDS.get)
def test_toy_model_end_to_end_in_half_precision(toy_fp32, dtype):
    """The shipped toy SPM eraser through GatedPipeline on the toy model loaded in half (UNet, text encoder,
    VAE; decoded images): the gate (default rule, stored calibration) is the same as in fp32, the clean prompt
    is bit-identical to the plain half pipeline, the erased prompt agrees with fp32 as well as plain
    sampling does. (fp16 matmuls are slow on CPUs, hence slow.)"""
    p32, e32, g32, _ = toy_fp32
    plain, erased, gates, notes = _toy_runs(dtype)
    assert gates == g32 == [1.0, 0.0] and notes == {"triangle": "stored calibration"}
    assert finite(plain, erased) and torch.equal(erased[1], plain[1])
    assert rel(e32[0], p32[0]) > 0.05
    check_agrees("toy model + toy SPM eraser (GatedPipeline, decoded)", dtype, rel(erased[0], e32[0]), rel(plain[0], p32[0]))


# ------------------------------------------------------------------ the GPU script
@pytest.mark.slow
def test_gpu_script_runs_on_the_cpu(tmp_path):
    """tools/gpu_half_precision.py is meant for a CUDA machine; ``--device cpu --tiny`` runs every section."""
    out = tmp_path / "half.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "gpu_half_precision.py"), "--device", "cpu",
                           "--tiny", "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["device"]["type"] == "cpu"
    for section in ("unets", "toy"):
        assert data[section]
    assert [row["unet"] for row in data["unets"]] == ["sd15-tiny", "sdxl-tiny"]
    for row in data["unets"]:
        assert row["gate0_bit_identical"] and row["finite"] and row["timing"]["per_row_ratio"] > 0
        assert row["err_hooked_vs_fp32"] <= RATIO * row["err_merged_vs_fp32"] + FLOOR_UNITS * U[torch.float16]
        assert row["attention"]["classic"]["gate0_bit_identical"] if row["unet"] == "sd15-tiny" else True
    toy = data["toy"]
    assert toy["spm"]["clean_row_bit_identical"] and toy["abo"]["strength0_bit_identical"]
    assert toy["geom"]["off_row_bit_identical"] and toy["spm"]["gates_fp16"] == toy["spm"]["gates_fp32"]

"""Half precision on a GPU (issue 19): ConceptGate's fp16 paths on CUDA, measured in one command.

    python tools/gpu_half_precision.py --out runs/gpu_half_precision.json        # a CUDA machine, a few minutes
    python tools/gpu_half_precision.py --device cpu --tiny --out /tmp/half.json  # the same sections, tiny, on a CPU

On a bare GPU machine without diffusers, make it importable first (as the toy world's GPU scripts do):
``PY=python3 ROOT=$PWD SITE=/tmp/site PYTHONPATH=/tmp/site bash -c 'source toyworld/gpu_env.sh && python3
tools/gpu_half_precision.py --out runs/gpu_half_precision.json'`` (needs ``.whl/diffusers-*.whl``).

What it measures, on random-weight UNets of SD1.5 size (512x512, batch 2) and SDXL size (1024x1024, batch 2)
carrying a stack of 8 random rank-1 SPM-shaped erasers (every transformer Linear/Conv2d), and on the toy models:

* gate 0: an attached stack with all-zero coefficients, and the gate-0 row of a mixed batch, are bit-identical
  to the UNet without erasers (fp16);
* agreement with fp32: max |fp16 - fp32| / max |fp32| of the per-row hooks' output, next to the same error of
  the bare fp16 UNet and of the fp16 UNet with the stack merged into its weights (the fp16 model's own error);
  the same under CUDA autocast with fp16 weights (AUTOMATIC1111's default mode) for SD1.5;
* per-UNet-call overhead: median time of a UNet call with the per-row hooks over the plain call, and for the
  batch path (weights patched once per gate change, then plain calls) the patch time and the resulting ratio
  over a 20-step generation;
* peak GPU memory: allocated memory and peak of a UNet call with and without the stack of 8 (per-row path);
* attention backends (SD1.5): the eraser's effect with diffusers' classic processor, PyTorch SDPA and xformers
  (when importable) agrees;
* the toy models: the shipped SPM eraser through GatedPipeline, the shipped All-but-One eraser and Geom's
  negative prompt, in fp16 against fp32 (decoded images), gate 0 bit-identical.

Writes one JSON file. Nothing runs at import: the webuis import every ``scripts/*.py`` of an extension, so this
module only defines functions (no ``Script`` class) and does its work under ``__main__``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time


# ------------------------------------------------------------------ set-up
def _import_checkout():
    """``conceptgate`` from this checkout (a symlink named ``conceptgate`` in a temp folder when the checkout
    is not installed, as the toy world's GPU scripts do)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        import conceptgate

        if os.path.dirname(os.path.abspath(conceptgate.__file__)) == root:
            return conceptgate
    except ImportError:
        pass
    import tempfile

    folder = os.path.join(tempfile.gettempdir(), "cg_pkg_half")
    os.makedirs(folder, exist_ok=True)
    link = os.path.join(folder, "conceptgate")
    if not os.path.islink(link):
        os.symlink(root, link)
    sys.path.insert(0, folder)
    for name in [n for n in sys.modules if n == "conceptgate" or n.startswith("conceptgate.")]:
        del sys.modules[name]
    import conceptgate

    return conceptgate


SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8)
SDXL = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=2048, attention_head_dim=(5, 10, 20), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
# the same block structure at test size (CPU smoke run)
SD15_TINY = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
                 cross_attention_dim=64, attention_head_dim=4, norm_num_groups=32)
SDXL_TINY = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2), cross_attention_dim=64, attention_head_dim=(2, 4),
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=8 * 6 + 32, norm_num_groups=32)


def _rel(a, ref) -> float:
    a, ref = a.detach().float(), ref.detach().float()
    return float((a - ref).abs().max() / ref.abs().max())


def _finite(*ts) -> bool:
    import torch

    return all(bool(torch.isfinite(t).all()) for t in ts)


class Clock:
    """Wall time of a callable on the device (CUDA synchronised), median of interleaved repeats."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def once(self, fn) -> float:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def compare(self, fns: dict, repeats: int) -> dict:
        for fn in fns.values():  # warm-up (kernel selection, caches)
            self.once(fn)
        times = {k: [] for k in fns}
        for _ in range(repeats):
            for k, fn in fns.items():
                times[k].append(self.once(fn))
        return {k: statistics.median(v) for k, v in times.items()}


# ------------------------------------------------------------------ full-size UNets
def _unet(cfg, device, seed=0):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device):
        return UNet2DConditionModel(**cfg).eval()


def _inputs(unet, batch, device, seed=0):
    import torch

    cfg = unet.config
    g = torch.Generator().manual_seed(seed)
    size = cfg.sample_size
    x = torch.randn(batch, cfg.in_channels, size, size, generator=g)
    ctx = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g)
    added = None
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = {"text_embeds": torch.randn(batch, pooled, generator=g),
                 "time_ids": torch.tensor([[size * 8.0, size * 8.0, 0.0, 0.0, size * 8.0, size * 8.0]]).repeat(batch, 1)}
    return x.to(device), torch.full((batch,), 500, device=device), ctx.to(device), \
        None if added is None else {k: v.to(device) for k, v in added.items()}


def _call(unet, inputs, dtype=None):
    import torch

    x, t, ctx, added = inputs
    dtype = dtype or unet.dtype
    kw = {} if added is None else {"added_cond_kwargs": {k: v.to(dtype) for k, v in added.items()}}
    with torch.no_grad():
        return unet(x.to(dtype), t, ctx.to(dtype), **kw).sample


def _merged_deltas(stack, coeffs, device):
    """{module: dense delta} of the stack at one coefficient row, formed on ``device`` in float32 from the
    stack's combined low-rank factors (one product per weight, as a host's LoRA patching does on the GPU)."""
    from conceptgate.adapters.hooks import combined_deltas
    from conceptgate.adapters.lowrank import ModuleDelta

    for name, d in combined_deltas(stack, coeffs).items():
        if d.is_low_rank:
            d = ModuleDelta(up=d.up.to(device), down=d.down.to(device), alpha=d.alpha)
        else:
            d = ModuleDelta(diff=d.diff.to(device))
        yield name, d.full()


def _patched(unet, stack, coeffs):
    """Add the stack into ``unet``'s weights (float32 sum, rounded once to the weight's dtype); returns the
    backup to restore with :func:`_restore`."""
    import torch

    backup = {}
    with torch.no_grad():
        for name, delta in _merged_deltas(stack, coeffs, unet.device):
            w = unet.get_submodule(name).weight
            backup[name] = w.detach().clone()
            w.copy_((w.float() + delta).to(w.dtype))
    return backup


def _restore(unet, backup):
    import torch

    with torch.no_grad():
        for name, w in backup.items():
            unet.get_submodule(name).weight.copy_(w)


def _merged_call(unet, stack, coeffs, inputs):
    """The UNet with ``W + delta`` merged for one coefficient row (the reference of the per-row path)."""
    backup = _patched(unet, stack, coeffs)
    try:
        return _call(unet, inputs)
    finally:
        _restore(unet, backup)


def _patch_seconds(unet, stack, coeffs, clock) -> float:
    """The batch path's cost per gate change: the stack merged into the weights (factors from the host's
    memory to the device, one product and one add per weight, in place); the undo is not timed."""
    box = {}
    seconds = clock.once(lambda: box.setdefault("backup", _patched(unet, stack, coeffs)))
    _restore(unet, box["backup"])
    return seconds


def bench_unet(name, cfg, device, args, clock) -> dict:
    import torch

    from conceptgate.adapters import EraserStack, RowGatedDeltas, layout_from_diffusers_config
    from conceptgate.adapters.synthetic import random_eraser

    t_start = time.perf_counter()
    u32 = _unet(cfg, device)
    layout = layout_from_diffusers_config(u32.config)
    stack = EraserStack()
    for i in range(args.erasers):
        stack = stack.with_eraser(random_eraser(layout, rank=1, seed=100 + i, scale=args.scale, name=f"m{i}"))
    modules = len(stack.modules())
    n = len(stack.entries)
    inputs = _inputs(u32, 2, device)
    full = torch.full((2, n), 0.8)
    mixed = torch.cat([torch.zeros(1, n), torch.full((1, n), 0.8)])
    row = torch.full((n,), 0.8)
    out: dict = {"unet": name, "dtype": "float16", "erasers": n, "modules_per_eraser": modules,
                 "batch": 2, "latent": u32.config.sample_size}

    # fp32 references
    base32 = _call(u32, inputs)
    with RowGatedDeltas(stack, u32.get_submodule) as hooks, hooks.coefficients(full):
        hooked32 = _call(u32, inputs)
    merged32 = _merged_call(u32, stack, row, inputs)
    out["effect_fp32"] = _rel(hooked32, base32)

    u16 = copy.deepcopy(u32).half()
    del u32
    if device.type == "cuda":
        torch.cuda.empty_cache()
    base16 = _call(u16, inputs)
    hooks = RowGatedDeltas(stack, u16.get_submodule).attach()
    try:
        with hooks.coefficients(torch.zeros(2, n)):
            zero16 = _call(u16, inputs)
        with hooks.coefficients(mixed):
            mixed16 = _call(u16, inputs)
        with hooks.coefficients(full):
            hooked16 = _call(u16, inputs)
        inert16 = _call(u16, inputs)
    finally:
        hooks.detach()
    merged16 = _merged_call(u16, stack, row, inputs)
    out["gate0_bit_identical"] = bool(torch.equal(zero16, base16) and torch.equal(inert16, base16)
                                      and torch.equal(mixed16[0], base16[0]))
    out["finite"] = _finite(base16, hooked16, merged16, mixed16)
    out["err_hooked_vs_fp32"] = _rel(hooked16, hooked32)
    out["err_merged_vs_fp32"] = _rel(merged16, merged32)
    out["err_base_vs_fp32"] = _rel(base16, base32)
    out["hooked_vs_merged_fp16"] = _rel(hooked16, merged16)

    # A1111's default: fp16 weights under autocast, fp32 inputs (CUDA only: CPU autocast lacks half group_norm)
    if device.type == "cuda" and args.autocast and name.startswith("sd15"):
        with torch.autocast("cuda", dtype=torch.float16):
            base_ac = _call(u16, inputs, torch.float32)
            with RowGatedDeltas(stack, u16.get_submodule) as hooks:
                with hooks.coefficients(mixed):
                    mixed_ac = _call(u16, inputs, torch.float32)
                with hooks.coefficients(full):
                    hooked_ac = _call(u16, inputs, torch.float32)
        out["autocast"] = {"gate0_bit_identical": bool(torch.equal(mixed_ac[0], base_ac[0])),
                           "finite": _finite(hooked_ac), "err_hooked_vs_fp32": _rel(hooked_ac, hooked32),
                           "err_base_vs_fp32": _rel(base_ac, base32)}

    # per-UNet-call overhead: per-row hooks vs plain, and the batch path's patch amortised over 20 steps
    hooks = RowGatedDeltas(stack, u16.get_submodule).attach()
    try:
        def plain():
            _call(u16, inputs)

        def per_row():
            with hooks.coefficients(full):
                _call(u16, inputs)

        times = clock.compare({"plain": plain, "per_row": per_row}, args.repeats)
    finally:
        hooks.detach()
    patch = statistics.median(_patch_seconds(u16, stack, row, clock) for _ in range(max(1, args.repeats // 4)))
    steps = 20
    out["timing"] = {"plain_s": times["plain"], "per_row_s": times["per_row"],
                     "per_row_ratio": times["per_row"] / times["plain"], "batch_patch_s": patch,
                     "batch_ratio_20_steps": (steps * times["plain"] + patch) / (steps * times["plain"]),
                     "batch_patch_in_unet_calls": patch / times["plain"], "repeats": args.repeats}

    # GPU memory of the per-row path with the stack of 8, against the bare UNet
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        _call(u16, inputs)
        peak_plain = torch.cuda.max_memory_allocated() - before
        hooks = RowGatedDeltas(stack, u16.get_submodule).attach()
        try:
            with hooks.coefficients(full):
                _call(u16, inputs)  # the factors' device copies are made on the first call
            torch.cuda.synchronize()
            resident = torch.cuda.memory_allocated() - before
            torch.cuda.reset_peak_memory_stats()
            base_now = torch.cuda.memory_allocated()
            with hooks.coefficients(full):
                _call(u16, inputs)
            peak_hooked = torch.cuda.max_memory_allocated() - base_now
        finally:
            hooks.detach()
        out["memory"] = {"weights_mb": before / 2 ** 20, "stack_resident_mb": resident / 2 ** 20,
                         "call_peak_plain_mb": peak_plain / 2 ** 20, "call_peak_per_row_mb": peak_hooked / 2 ** 20,
                         "extra_mb": (resident + max(0, peak_hooked - peak_plain)) / 2 ** 20}

    if name.startswith("sd15"):
        out["attention"] = _attention_backends(u16, stack, inputs, mixed)
    out["seconds"] = time.perf_counter() - t_start
    return out


def _attention_backends(unet, stack, inputs, mixed) -> dict:
    """The eraser's effect (hooked - base, gate-1 row) with each attention backend, against SDPA's."""
    import torch
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from conceptgate.adapters import RowGatedDeltas

    backends = {"classic": AttnProcessor, "sdpa": AttnProcessor2_0}
    try:
        import xformers.ops  # noqa: F401
        from diffusers.models.attention_processor import XFormersAttnProcessor

        if unet.device.type == "cuda":
            backends["xformers"] = XFormersAttnProcessor
    except Exception:
        pass
    res = {}
    for name, proc in backends.items():
        try:
            unet.set_attn_processor(proc())
            base = _call(unet, inputs)
            with RowGatedDeltas(stack, unet.get_submodule) as hooks, hooks.coefficients(mixed):
                hooked = _call(unet, inputs)
            res[name] = (base, hooked)
        except Exception as exc:  # e.g. an xformers build without kernels for this GPU
            res[name] = repr(exc)
    unet.set_attn_processor(AttnProcessor2_0())
    out = {}
    b0, h0 = res["sdpa"]
    scale = float(h0[1].abs().max())
    for name, r in res.items():
        if isinstance(r, str):
            out[name] = {"error": r}
            continue
        b, h = r
        out[name] = {"gate0_bit_identical": bool(torch.equal(h[0], b[0])),
                     "effect_diff_vs_sdpa": float(((h[1] - b[1]) - (h0[1] - b0[1])).float().abs().max()) / scale,
                     "base_diff_vs_sdpa": float((b[1] - b0[1]).float().abs().max()) / scale}
    out["xformers_available"] = "xformers" in res
    return out


# ------------------------------------------------------------------ the toy models
def bench_toy(device, args, clock) -> dict:
    import torch

    from conceptgate import toyworld
    from conceptgate.adapters import EraserStack, GateSettings, RowGatedDeltas, load_eraser
    from conceptgate.adapters.abo.guidance import abo_eraser
    from conceptgate.adapters.abo.pipeline import AboGuidedPipeline
    from conceptgate.adapters.diffusers_host import GatedPipeline
    from conceptgate.adapters.geom.negative import encode_negative
    from conceptgate.adapters import geom as G

    t_start = time.perf_counter()
    here = os.path.join(os.path.dirname(toyworld.__file__), "erasers")
    spm = load_eraser(os.path.join(here, "spm_triangle.safetensors"))
    abo = abo_eraser("triangle", "square")  # the guidance form (the shipped abo_* file is the adapter form)
    abo_gate = GateSettings(rule="tokens", threshold=0.9, temperature=0.0)
    geom = G.validate(load_eraser(os.path.join(here, "geom_watermark.safetensors")))
    prompts = ["a red triangle in striped style", "a blue circle in plain style"]
    steps = args.toy_steps

    def latents(dtype):
        return torch.stack([torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(s)) for s in range(2)]).to(
            device, dtype)

    runs = {}
    for dtype in (torch.float32, torch.float16):
        pipe = toyworld.load_pipeline(device=str(device), dtype=dtype)
        kw = dict(num_inference_steps=steps, guidance_scale=5.0, output_type="pt")
        r = {"plain": pipe(prompt=prompts, latents=latents(dtype), **kw).images}
        with GatedPipeline(pipe, EraserStack().with_eraser(spm)) as gated:
            r["spm"] = gated(prompts, latents=latents(dtype), **kw).images
            r["spm_gates"] = gated.last_coefficients.flatten().tolist()
        with AboGuidedPipeline(pipe, EraserStack().with_eraser(abo, gate=abo_gate)) as guided:
            r["abo"] = guided(prompts, latents=latents(dtype), **kw).images
            r["abo_fires"] = [bool(t) for t in guided.last_terms]
        with AboGuidedPipeline(pipe, EraserStack().with_eraser(abo, gate=abo_gate, strength=0.0)) as guided:
            r["abo_zero"] = guided(prompts, latents=latents(dtype), **kw).images
        r["geom"] = encode_negative(geom, pipe.tokenizer, pipe.text_encoder, ["", ""], on=[True, False])
        with torch.no_grad():
            ids = pipe.tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids.to(device)
            r["geom_plain"] = pipe.text_encoder(ids)[0]
        if dtype == torch.float16:
            unet = pipe.unet
            x = latents(dtype).repeat(2, 1, 1, 1)
            ctx = torch.randn(4, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1)).to(device, dtype)
            t = torch.full((4,), 500, device=device)
            hooks = RowGatedDeltas(EraserStack().with_eraser(spm), unet.get_submodule).attach()
            try:
                def plain():
                    with torch.no_grad():
                        unet(x, t, ctx)

                def per_row():
                    with hooks.coefficients(torch.ones(1, 1)), torch.no_grad():
                        unet(x, t, ctx)

                r["timing"] = clock.compare({"plain": plain, "per_row": per_row}, args.repeats)
            finally:
                hooks.detach()
        runs[dtype] = r
        del pipe
    a, b = runs[torch.float32], runs[torch.float16]
    out = {"steps": steps, "dtype": "float16",
           "spm": {"gates_fp32": a["spm_gates"], "gates_fp16": b["spm_gates"],
                   "clean_row_bit_identical": bool(torch.equal(b["spm"][1], b["plain"][1])),
                   "finite": _finite(b["spm"]), "err_vs_fp32": _rel(b["spm"][0], a["spm"][0]),
                   "err_plain_vs_fp32": _rel(b["plain"][0], a["plain"][0]), "effect_fp32": _rel(a["spm"][0], a["plain"][0])},
           "abo": {"fires_fp16": b["abo_fires"], "strength0_bit_identical": bool(torch.equal(b["abo_zero"], b["plain"])),
                   "finite": _finite(b["abo"]), "err_vs_fp32": _rel(b["abo"][0], a["abo"][0]),
                   "clean_row_vs_plain": _rel(b["abo"][1], b["plain"][1])},
           "geom": {"off_row_bit_identical": bool(torch.equal(b["geom"][1:], b["geom_plain"])),
                    "finite": _finite(b["geom"]), "err_vs_fp32": _rel(b["geom"][0], a["geom"][0]),
                    "err_plain_text_vs_fp32": _rel(b["geom"][1], a["geom"][1])},
           "unet_call": {**b["timing"], "per_row_ratio": b["timing"]["per_row"] / b["timing"]["plain"], "batch": 4}}
    out["seconds"] = time.perf_counter() - t_start
    return out


# ------------------------------------------------------------------ main
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="test-size UNets, few repeats (a smoke run, e.g. on a CPU)")
    ap.add_argument("--out", default=os.path.join("runs", "gpu_half_precision.json"))
    ap.add_argument("--models", default="sd15,sdxl,toy", help="comma-separated subset of sd15,sdxl,toy")
    ap.add_argument("--erasers", type=int, default=8, help="stack size (rank-1 SPM-shaped random erasers)")
    ap.add_argument("--scale", type=float, default=0.05, help="random erasers' factor scale")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per variant (default 20, tiny 3)")
    ap.add_argument("--toy-steps", type=int, default=None, help="sampling steps of the toy runs (default 10, tiny 2)")
    ap.add_argument("--no-autocast", dest="autocast", action="store_false")
    args = ap.parse_args(argv)
    args.repeats = args.repeats or (3 if args.tiny else 20)
    args.toy_steps = args.toy_steps or (1 if args.tiny else 10)

    _import_checkout()
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --device cpu --tiny for a smoke run")
    if device.type == "cpu":
        torch.set_num_threads(1)  # a smoke run on a shared CPU: more threads only add contention
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references in true fp32
    torch.backends.cudnn.allow_tf32 = False
    clock = Clock(device)
    t0 = time.perf_counter()
    info = {"type": device.type, "torch": torch.__version__}
    if device.type == "cuda":
        info.update(name=torch.cuda.get_device_name(device), capability=list(torch.cuda.get_device_capability(device)),
                    cuda=torch.version.cuda)
    import diffusers

    result = {"issue": 19, "device": info, "diffusers": diffusers.__version__, "tiny": args.tiny,
              "args": {k: v for k, v in vars(args).items()}, "unets": [], "toy": None}
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    configs = {"sd15": SD15_TINY if args.tiny else SD15, "sdxl": SDXL_TINY if args.tiny else SDXL}
    for m in ("sd15", "sdxl"):
        if m in models:
            label = m + ("-tiny" if args.tiny else "")
            print(f"[{time.perf_counter() - t0:6.1f}s] {label} ...", flush=True)
            result["unets"].append(bench_unet(label, configs[m], device, args, clock))
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the UNet's copies are gone with bench_unet's frame
            print(json.dumps(result["unets"][-1], indent=1), flush=True)
    if "toy" in models:
        print(f"[{time.perf_counter() - t0:6.1f}s] toy models ...", flush=True)
        result["toy"] = bench_toy(device, args, clock)
        print(json.dumps(result["toy"], indent=1), flush=True)
    result["seconds"] = time.perf_counter() - t0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"[{result['seconds']:6.1f}s] wrote {args.out}", flush=True)
    return result


if __name__ == "__main__":
    main()

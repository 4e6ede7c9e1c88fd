"""Quality of the shipped SPM membranes on the toy world, gated (official FT) and always-on, with
``bench.quality.evaluate_stack``; writes the ``quality-spm`` section of BENCHMARKS.md.

    python -m conceptgate.toyworld.erasers.bench_spm run base triangle-ft triangle-always ...   # one JSON per config
    python -m conceptgate.toyworld.erasers.bench_spm report                                     # merge + BENCHMARKS.md

Configs can run in separate processes (CPU time is shared); results are cached in ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TARGETS = ["triangle", "striped"]
FILES = {"triangle": "spm_triangle.safetensors", "striped": "spm_striped.safetensors"}
TIER = dict(keyword=12, synonym=6, heldout=6, per_target=4, seeds=2, steps=25, cfg=5.0, gate_prompts=24, boot=500, batch=48)
CONFIGS = ["base"] + [f"{c}-{g}" for c in TARGETS for g in ("ft", "always", "tokens")]


GATES = {"ft": dict(rule="ft"), "always": dict(rule="always"), "tokens": dict(rule="tokens")}


def stack_for(name: str, files: dict | None = None):
    """``base`` or ``<file key>-<gate>``: a key of FILES (or of ``files``, key -> path) and a GATES key."""
    from ...adapters import EraserStack, GateSettings
    from ...adapters.files import load_eraser

    if name == "base":
        return None
    key, gate = name.rsplit("-", 1)
    path = (files or {}).get(key) or os.path.join(HERE, FILES[key])
    e = load_eraser(path)
    return EraserStack().with_eraser(e, gate=GateSettings(**GATES[gate]))


def run(names, out_dir, threads, device="cpu", files=None, tier=None):
    from ...bench.quality import _strip_images, evaluate_stack
    from .. import load_judges, load_pipeline

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    pipe, judges = load_pipeline(device=device), load_judges()
    os.makedirs(out_dir, exist_ok=True)
    for name in names:
        t0 = time.time()
        r = evaluate_stack(pipe, judges, stack_for(name, files), targets=TARGETS, tier=dict(tier or TIER), log=print)
        r["tier"] = "spm-quick"
        with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
            json.dump(_strip_images(r), f, default=float)
        print(f"{name}: {time.time() - t0:.0f} s", flush=True)


def report(out_dir):
    from ...bench.quality import render_markdown
    from ...bench.report import write_section

    configs = []
    for name in CONFIGS:
        path = os.path.join(out_dir, f"{name}.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            configs.append({"name": name, "result": json.load(f)})
    result = {"tier": "spm-quick (2 seeds)", "tier_settings": TIER, "configs": configs,
              "seconds": sum(c["result"]["seconds"] for c in configs),
              "notes": [
                  "SPM membranes trained with Latent Anchoring (`python -m conceptgate train spm`, see "
                  "toyworld/erasers/README.md for the iteration count and learning rate used); surrogate \"\".",
                  "`-ft`: the official Facilitated-Transport gate (no threshold); `-always`: the same membrane as a "
                  "plain LoRA at strength 1 (gate 1 for every prompt); `-tokens`: the non-official token rule (gate 1 "
                  "when the prompt contains the concept's tokens, else 0).",
                  "Reduced quick tier (2 seeds per prompt) to fit shared CPU time; intervals are wide.",
              ]}
    body = render_markdown(result)
    cmd = "python -m conceptgate.toyworld.erasers.bench_spm run " + " ".join(CONFIGS) + " && ... report"
    write_section("quality-spm", "Quality of the shipped SPM membranes (toy world)", body, cmd,
                  data=result, json_path=os.path.join(out_dir, "quality_spm.json"))
    print(body)


def main(argv=None):
    p = argparse.ArgumentParser(prog="bench_spm")
    p.add_argument("what", choices=["run", "report"])
    p.add_argument("configs", nargs="*", default=CONFIGS)
    p.add_argument("--out-dir", default=os.path.join(tempfile.gettempdir(), "conceptgate-bench-spm"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--file", action="append", default=[], metavar="KEY=PATH",
                   help="evaluate another membrane file as config KEY-<gate> (repeatable)")
    p.add_argument("--smoke", action="store_true", help="a tiny tier (proves the run works; numbers meaningless)")
    a = p.parse_args(argv)
    files = dict(f.split("=", 1) for f in a.file)
    tier = dict(TIER, keyword=2, synonym=1, heldout=1, per_target=1, seeds=1, steps=3, gate_prompts=4, boot=20) \
        if a.smoke else None
    if a.what == "run":
        run(a.configs or CONFIGS, a.out_dir, a.threads, a.device, files, tier)
    else:
        report(a.out_dir)


if __name__ == "__main__":
    main()

"""Quality of the All-but-One **adapter** (fine-tuned form, ``python -m conceptgate train abo``) on the toy world:
erase "triangle" toward "square". Writes the ``quality-abo-adapter`` section of BENCHMARKS.md.

    python -m conceptgate.toyworld.erasers.bench_abo_adapter run base adapter-always adapter-tokens adapter-ft
    python -m conceptgate.toyworld.erasers.bench_abo_adapter run cmp-attn2_kv cmp-attn2 cmp-spm --cmp-dir DIR
    python -m conceptgate.toyworld.erasers.bench_abo_adapter report [--cmp-dir DIR]

Same prompts, seeds and sampler as ``python -m conceptgate bench abo`` (the sampling-time form): the quality
bench's quick tier at 4 seeds per prompt (``build_prompt_sets(quick, [triangle], seed=0)``), DDIM 25, CFG 5, so the
two sections can be read side by side. On top of ``evaluate_stack``'s UA / IRA / CRA / replacement:

* a ``replace`` set: ``"a {colour} triangle in {style} style"`` for all 36 colour x style pairs x 2 seeds, scored
  as issue 7 defines replacement: judged square *and* the prompt's colour *and* style;
* layout: silhouette centroid shift / area change / IoU of each erased image vs the base model's image of the
  same prompt and seed (``bench.abo.layout_stats``).

``cmp-*`` rows are the module-set comparison (shorter trainings, files in ``--cmp-dir``). Configs can run in
separate processes; results and images are cached in ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
FILE = os.path.join(HERE, "abo_triangle_to_square.safetensors")
TARGET, ALT = "triangle", "square"
SEEDS_REPLACE = (2000, 2001)
CONFIGS = ["base", "adapter-always", "adapter-tokens", "adapter-ft"]
CMP = ["cmp-attn2_kv", "cmp-attn2", "cmp-spm"]


def _tier():
    from ...bench.quality import TIERS

    cfg = dict(TIERS["quick"])
    cfg["seeds"] = 4
    return cfg


def stack_for(name: str, cmp_dir: str | None):
    from ...adapters import EraserStack, GateSettings
    from ...adapters.files import load_eraser

    if name == "base":
        return None
    if name.startswith("cmp-"):
        path = os.path.join(cmp_dir or "", f"cmp_{name[4:]}.safetensors")
        return EraserStack().with_eraser(load_eraser(path), gate=GateSettings(rule="always"))
    rule = name.split("-", 1)[1]
    return EraserStack().with_eraser(load_eraser(FILE), gate=GateSettings(rule=rule))


def replace_items():
    from ..captions import COLOUR_NAMES, STYLE_NAMES, TRAIN_TEMPLATES

    t = TRAIN_TEMPLATES[0]
    return [(t.format(c=COLOUR_NAMES[c][0], o=TARGET, s=STYLE_NAMES[s][0]), (2, s, c))
            for s in range(len(STYLE_NAMES)) for c in range(len(COLOUR_NAMES))]


def run(names, out_dir, threads, cmp_dir):
    from ...bench.quality import _strip_images, build_prompt_sets, evaluate_stack, generate_with_stack, resolve_concept
    from .. import load_judges, load_pipeline

    torch.set_num_threads(threads)
    pipe, judges = load_pipeline(), load_judges()
    cfg = _tier()
    sets = build_prompt_sets(cfg, [resolve_concept(TARGET)], seed=0)
    os.makedirs(out_dir, exist_ok=True)
    for name in names:
        t0 = time.time()
        stack = stack_for(name, cmp_dir)
        r = evaluate_stack(pipe, judges, stack, targets=[TARGET], tier=cfg, prompt_sets=sets, log=None)
        images = r.pop("_images")
        items = replace_items()
        t1 = time.time()
        images["replace"], _ = generate_with_stack(pipe, [p for p, _ in items for _ in SEEDS_REPLACE],
                                                   [s for _ in items for s in SEEDS_REPLACE], stack,
                                                   steps=int(cfg["steps"]), cfg=float(cfg["cfg"]))
        r["replace_seconds"] = time.time() - t1
        r["load_average"] = os.getloadavg()[0]
        if stack is not None:
            e = stack.entries[0].eraser
            r["eraser"] = {"file": os.path.basename(e.source or ""), "modules": len(e.modules), "rank": e.rank,
                           "parameters": e.num_parameters(), "settings": e.settings,
                           "hyperparameters": json.loads(e.metadata.get("conceptgate.hyperparameters", "{}"))}
        with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
            json.dump(_strip_images(r), f, default=float)
        torch.save({k: (v * 255).round().to(torch.uint8) for k, v in images.items()},
                   os.path.join(out_dir, f"{name}.images.pt"))
        print(f"{name}: {time.time() - t0:.0f} s", flush=True)


def _extras(name, out_dir, base_images, sets, cfg, judges):
    from ...bench.abo import _full_replacement, layout_stats
    from ...bench.quality import SEED_BASE
    from ..judges import classify

    imgs = {k: v.float() / 255 for k, v in torch.load(os.path.join(out_dir, f"{name}.images.pt")).items()}
    seeds = [SEED_BASE + k for k in range(cfg["seeds"])]
    out = {}
    for sname, items in list(sets.items()) + [("replace", replace_items())]:
        n_seeds = len(SEEDS_REPLACE) if sname == "replace" else len(seeds)
        labels = np.array([lab for _, lab in items for _ in range(n_seeds)]).reshape(-1, 3)
        is_t = labels[:, 0] == 2
        pred = {k: np.asarray(v) for k, v in classify(judges, imgs[sname]).items()}
        row = {"replacement": _full_replacement(pred, labels, is_t, 1)}
        if name != "base":
            m = torch.from_numpy(is_t)
            row["layout_vs_base"] = layout_stats(imgs[sname][m], base_images[sname][m])
            if (~is_t).any():
                row["layout_non_target_vs_base"] = layout_stats(imgs[sname][~m], base_images[sname][~m])
        out[sname] = row
    return out


def _pct(v):
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * v:.0f}"


def _ci(s):
    if not s or s.get("value") is None or np.isnan(s["value"]):
        return "–"
    return f"{100 * s['value']:.0f} [{100 * s['lo']:.0f}, {100 * s['hi']:.0f}]"


def report(out_dir, cmp_dir):
    from ...bench.quality import build_prompt_sets, resolve_concept
    from ...bench.report import ROOT, table, write_section
    from .. import load_judges

    judges = load_judges()
    cfg = _tier()
    sets = build_prompt_sets(cfg, [resolve_concept(TARGET)], seed=0)
    names = [n for n in CONFIGS + CMP if os.path.exists(os.path.join(out_dir, f"{n}.json"))]
    results = {n: json.load(open(os.path.join(out_dir, f"{n}.json"))) for n in names}
    base_images = {k: v.float() / 255 for k, v in torch.load(os.path.join(out_dir, "base.images.pt")).items()}
    extras = {n: _extras(n, out_dir, base_images, sets, cfg, judges) for n in names}
    rows = []
    for n in names:
        t = results[n]["targets"][0]["sets"]
        for sname in ("keyword", "synonym", "heldout", "replace"):
            m = t.get(sname, {})
            x = extras[n][sname]
            lay = x.get("layout_vs_base") or {}
            rows.append({"config": n, "set": sname, "n": x["replacement"]["n"],
                         "full": _pct(x["replacement"]["object_and_attributes"]),
                         "sq": _pct(x["replacement"]["object"]),
                         "ua": _ci(m.get("ua")), "ira": _ci(m.get("ira")), "cra": _ci(m.get("cra")),
                         "garbage": _ci(m.get("garbage_rate")),
                         "layout": "–" if not lay.get("n") else
                         f"{lay['centroid_shift_px_median']:.1f} / {100 * lay['area_change_median']:.0f}% / "
                         f"{lay['iou_median']:.2f}"})
    body = []
    body.append("Erase **triangle -> square** with the fine-tuned All-but-One adapter (a reconstruction of the AAAI 2024 "
                "objective from its abstract: `adapters/abo/adapter.py`, training in `toyworld/erasers/README.md`). Same "
                "prompts, seeds and sampler as the `abo-guidance` section (quality bench quick tier at 4 seeds, DDIM 25, "
                "CFG 5), plus a `replace` set: `a {colour} triangle in {style} style` for all 36 pairs x seeds "
                f"{SEEDS_REPLACE[0]}, {SEEDS_REPLACE[1]}. Percentages; 95% prompt-bootstrap intervals in brackets.")
    body.append("")
    body.append("- **square+attrs**: target-prompt images judged square *with* the prompt's colour and style (issue 7's "
                "replacement, target >= 85%); **square**: judged square (any colour/style). UA/IRA/CRA as in the "
                "quality bench (IRA/CRA on prompts not naming triangle; issue target: within 3 points of `base`). "
                "**layout**: erased vs base image of the same prompt and seed, target images: median centroid shift "
                "(px of 64) / median |area change| / median mask IoU.")
    body.append("- Gates: `always` = the adapter as a plain LoRA (gate 1 on every prompt, also what stock "
                "`LoraLoaderModelOnly` does); `tokens` = share of the concept's tokens in the prompt (1 for prompts "
                "saying 'triangle', 0 otherwise, incl. the synonym 'trigon'); `ft` = official Facilitated Transport "
                "(its cosine half gives every toy prompt 0.4-0.9, see README).")
    body.append("")
    body.append(table(rows, [("config", "config"), ("set", "prompts"), ("n", "target imgs"), ("full", "square+attrs"),
                             ("sq", "square"), ("ua", "UA"), ("ira", "IRA"), ("cra", "CRA"), ("garbage", "garbage"),
                             ("layout", "layout shift / area / IoU")]))
    gate_rows = []
    for n in names:
        for ename, g in results[n].get("gates", {}).items():
            r = {"config": n}
            for cat in ("target", "synonym", "neighbour", "unrelated"):
                v = g.get(cat)
                r[cat] = "–" if not v or not v["n"] else f"{100 * v['fire_rate']:.0f}% ({v['mean_gate']:.2f})"
            gate_rows.append(r)
    if gate_rows:
        body.append("")
        body.append("Gate fire rates (text only, gate > 0.5; mean gate in brackets):")
        body.append("")
        body.append(table(gate_rows, [("config", "config"), ("target", "target"), ("synonym", "synonym"),
                                      ("neighbour", "neighbour"), ("unrelated", "unrelated")]))
    cmp_names = [n for n in names if n.startswith("cmp-")]
    if cmp_names:
        body.append("")
        body.append("Module-set comparison (each trained with the same recipe and seed, evaluated always-on; a run "
                    "stopped early is its checkpoint at the iterations shown, mid-schedule; see "
                    "toyworld/erasers/README.md):")
        body.append("")
        crow = []
        for n in cmp_names:
            e = results[n]["eraser"]
            hp = e["hyperparameters"]
            x, t = extras[n], results[n]["targets"][0]["sets"]
            mean = lambda k: np.nanmean([t[s][k]["value"] for s in ("keyword", "synonym", "heldout")])  # noqa: E731
            crow.append({"set": e["settings"]["modules"], "mods": e["modules"], "params": e["parameters"],
                         "it": f"{hp.get('iterations_run')} of {hp.get('iterations')}", "full": _pct(x["replace"]["replacement"]["object_and_attributes"]),
                         "kw": _pct(x["keyword"]["replacement"]["object_and_attributes"]),
                         "ua": _pct(mean("ua")), "ira": _pct(mean("ira")), "cra": _pct(mean("cra"))})
        body.append(table(crow, [("set", "modules"), ("mods", "modules (n)"), ("params", "parameters"),
                                 ("it", "iterations (run of schedule)"), ("full", "square+attrs (replace set)"),
                                 ("kw", "square+attrs (keyword set)"), ("ua", "UA (mean of 3 sets)"),
                                 ("ira", "IRA (mean)"), ("cra", "CRA (mean)")]))
    text = "\n".join(body)
    data = {"configs": results, "extras": extras, "tier": cfg}
    cmd = ("python -m conceptgate.toyworld.erasers.bench_abo_adapter run " + " ".join(names) +
           (f" --cmp-dir {cmp_dir}" if cmp_names else "") + " && ... report")
    write_section("quality-abo-adapter", "All-but-One adapter (fine-tuned form) on the toy world", text, cmd,
                  data=data, json_path=os.path.join(ROOT, "benchmarks.json"))
    print(text)


def main(argv=None):
    p = argparse.ArgumentParser(prog="bench_abo_adapter")
    p.add_argument("what", choices=["run", "report"])
    p.add_argument("configs", nargs="*", default=CONFIGS)
    p.add_argument("--out-dir", default=os.path.join(tempfile.gettempdir(), "conceptgate-bench-abo-adapter"))
    p.add_argument("--cmp-dir", default=None, help="folder with cmp_<modules>.safetensors (module-set comparison)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    if a.what == "run":
        run(a.configs or CONFIGS, a.out_dir, a.threads, a.cmp_dir)
    else:
        report(a.out_dir, a.cmp_dir)


if __name__ == "__main__":
    main()

"""``python -m conceptgate bench abo``: All-but-One **sampling-time guidance** on the toy world (issue 7).

Erases the object "triangle" toward "square" and toward nothing (``""``) with
:class:`~conceptgate.adapters.abo.pipeline.AboGuidedPipeline` (through the quality bench's
``abo`` guidance handler) and measures, on the quick tier of :mod:`.quality` (the same prompts and
seeds for every configuration, DDIM 25 steps, CFG 5):

* **UA / IRA / CRA** per prompt set against the unerased model (target: within 3 points);
* **replacement**: among images whose prompt names triangle, the share judged square (the quality
  bench's ``replacement``) and the share judged square *with the prompt's colour and style*
  (issue 7's definition, target >= 85%), next to the base model asked for a square directly (same
  prompts with the word swapped, same seeds: the ceiling the model itself reaches);
* **layout preservation**: per target image, the object's silhouette (``judges.silhouette_mask``)
  in the erased vs the original generation of the same prompt and seed: centroid shift (px),
  relative area change and mask IoU; reference rows: the base model's generation of the
  square-swapped prompt (what rewriting the prompt does) and of another seed (unrelated layouts);
* **speed**: wall time of whole pipeline calls (25 steps, 8 prompts, VAE decode included) as ratios
  over plain CFG sampling of the same prompts, repetitions interleaved in one run: gate firing with
  an empty alternative (+1 row per firing prompt) and with a named one (+2), and gate not firing.

Gates: the official Facilitated-Transport rule fires on every toy prompt (its cosine half is
0.4-0.9 for unrelated prompts, ``toyworld/erasers/README.md``), which would push every prompt
toward the alternative; the main rows use the non-official calibration ``threshold 0.91``
(``GateSettings(threshold=0.91, temperature=0)``), and one row shows the official rule.
"""

from __future__ import annotations

import os
import re
import time

import numpy as np
import torch

COMMAND = "python -m conceptgate bench abo"
TARGET, ALT = "triangle", "square"
CAL = dict(threshold=0.91, temperature=0.0)


def _configs(which):
    from ..adapters.abo.guidance import abo_eraser
    from ..adapters.gate import GateSettings
    from ..adapters.stack import EraserStack

    cal, ft = GateSettings(**CAL), GateSettings()
    all_ = {
        "base": None,
        "abo->square": EraserStack().with_eraser(abo_eraser(TARGET, ALT), gate=cal),
        "abo->nothing": EraserStack().with_eraser(abo_eraser(TARGET, ""), gate=cal),
        "abo->square (+synonym)": EraserStack().with_eraser(abo_eraser([TARGET, "trigon"], ALT,
                                                                       name="abo_triangle+trigon_to_square"), gate=cal),
        "abo->square (official FT gate)": EraserStack().with_eraser(abo_eraser(TARGET, ALT, name="abo_triangle_to_square_ft"),
                                                                     gate=ft),
    }
    return [(k, all_[k]) for k in which]


def _swap(prompt: str) -> str:
    return re.sub(r"(?<![a-z])(triangle|trigon)(?![a-z])", ALT, prompt)


def layout_stats(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Silhouette centroid shift (px), |area change| / area and IoU between image pairs ``a[i]``, ``b[i]``."""
    from ..toyworld.judges import silhouette_mask

    ma, mb = silhouette_mask(a), silhouette_mask(b)
    yy, xx = np.mgrid[0:64, 0:64]
    shifts, areas, ious = [], [], []
    for x, y in zip(ma, mb):
        sa, sb = x.sum(), y.sum()
        if sa < 20 or sb < 20:  # nothing drawn in one of them
            continue
        ca = np.array([(yy * x).sum() / sa, (xx * x).sum() / sa])
        cb = np.array([(yy * y).sum() / sb, (xx * y).sum() / sb])
        shifts.append(float(np.linalg.norm(ca - cb)))
        areas.append(float(abs(sa - sb) / sb))
        ious.append(float((x & y).sum() / (x | y).sum()))
    n = len(shifts)
    med = (lambda v: float(np.median(v)) if v else float("nan"))
    return {"n": n, "pairs": len(ma), "centroid_shift_px_median": med(shifts),
            "centroid_shift_px_mean": float(np.mean(shifts)) if n else float("nan"),
            "area_change_median": med(areas), "iou_median": med(ious), "iou_mean": float(np.mean(ious)) if n else float("nan")}


def _full_replacement(pred: dict, labels: np.ndarray, mask: np.ndarray, obj: int) -> dict:
    hit = (pred["object"] == obj) & (pred["style"] == labels[:, 1]) & (pred["colour"] == labels[:, 2])
    obj_only = pred["object"] == obj
    n = int(mask.sum())
    return {"n": n, "object_and_attributes": float(hit[mask].mean()) if n else float("nan"),
            "object": float(obj_only[mask].mean()) if n else float("nan")}


def fire_and_quiet_prompts(n: int) -> tuple[list[str], list[str]]:
    """``n`` keyword prompts naming the target (the gate fires) and ``n`` naming other objects (it does not)."""
    from ..toyworld import captions as C

    objs = [v[0] for k, v in C.OBJECT_NAMES.items() if v[0] not in (TARGET, ALT)]
    styles = [v[0] for v in C.STYLE_NAMES.values()]
    cols = [v[0] for v in C.COLOUR_NAMES.values()]
    tpl = C.TRAIN_TEMPLATES[0]
    fire = [tpl.format(c=cols[i % len(cols)], o=TARGET, s=styles[i % len(styles)]) for i in range(n)]
    quiet = [tpl.format(c=cols[i % len(cols)], o=objs[i % len(objs)], s=styles[(i + 1) % len(styles)]) for i in range(n)]
    return fire, quiet


def bench_speed(pipe, repeats: int = 5, prompts_n: int = 8, steps: int = 25, cfg: float = 5.0) -> dict:
    """Ratios over plain CFG in one run, repetitions interleaved (order rotated every repetition)."""
    from ..adapters.abo.pipeline import AboGuidedPipeline

    fire, quiet = fire_and_quiet_prompts(prompts_n)
    cfgs = dict(_configs(["abo->square", "abo->nothing"]))
    lat = torch.stack([torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(50 + i)) for i in range(prompts_n)])

    def call(target, ps):
        t0 = time.perf_counter()
        target(prompt=ps, num_inference_steps=steps, guidance_scale=cfg, latents=lat.clone(), output_type="pt",
               height=64, width=64)
        return time.perf_counter() - t0

    guided_sq = AboGuidedPipeline(pipe, cfgs["abo->square"]).__enter__()
    guided_no = AboGuidedPipeline(pipe, cfgs["abo->nothing"]).__enter__()
    runs = {"plain (firing prompts)": lambda: call(pipe, fire),
            "abo, empty alternative, gate fires": lambda: call(guided_no, fire),
            "abo, named alternative, gate fires": lambda: call(guided_sq, fire),
            "plain (quiet prompts)": lambda: call(pipe, quiet),
            "abo, named alternative, gate 0": lambda: call(guided_sq, quiet)}
    names = list(runs)
    times = {k: [] for k in names}
    load0 = os.getloadavg()[0]
    try:
        for k in names:  # warm-up
            runs[k]()
        rows_before = (guided_sq.unet_hooks.extra_rows, guided_no.unet_hooks.extra_rows)
        for rep in range(repeats):
            order = names[rep % len(names):] + names[: rep % len(names)]
            for k in order:
                times[k].append(runs[k]())
    finally:
        guided_sq.__exit__()
        guided_no.__exit__()
    med = {k: float(np.median(v)) for k, v in times.items()}

    def ratio(a, b):  # median of per-repetition ratios (each pair measured close in time)
        return float(np.median(np.array(times[a]) / np.array(times[b])))

    return {
        "prompts": prompts_n, "steps": steps, "cfg": cfg, "repeats": repeats, "torch_threads": torch.get_num_threads(),
        "median_seconds": med,
        "ratios": {
            "empty alternative, gate fires": {"value": ratio("abo, empty alternative, gate fires", "plain (firing prompts)"),
                                              "target": 1.55, "extra_rows_per_prompt": 1},
            "named alternative, gate fires": {"value": ratio("abo, named alternative, gate fires", "plain (firing prompts)"),
                                              "target": 2.05, "extra_rows_per_prompt": 2},
            "gate does not fire": {"value": ratio("abo, named alternative, gate 0", "plain (quiet prompts)"),
                                   "target": 1.02, "extra_rows_per_prompt": 0},
        },
        "extra_rows_seen": {"named": guided_sq.unet_hooks.extra_rows - rows_before[0],
                            "empty": guided_no.unet_hooks.extra_rows - rows_before[1]},
        "load_average_start": load0, "load_average_end": os.getloadavg()[0],
        "fire_prompts": fire, "quiet_prompts": quiet,
    }


def run_bench(args) -> int:
    from ..toyworld import load_judges, load_pipeline
    from ..toyworld.judges import classify
    from .quality import SEED_BASE, TIERS, build_prompt_sets, evaluate_stack, resolve_concept
    from .report import ROOT, write_section

    if getattr(args, "sweep", None):
        return run_sweep(args)
    if getattr(args, "from_json", None):
        return _rerender(args.from_json)
    t_start, cpu_start = time.time(), time.process_time()
    if args.threads:
        torch.set_num_threads(int(args.threads))
    load0 = os.getloadavg()[0]
    cfg = dict(TIERS["quick"])
    cfg["seeds"] = max(4, int(args.seeds or cfg["seeds"]))
    pipe, judges = load_pipeline(), load_judges()
    pipe.set_progress_bar_config(disable=True)
    say = print
    target = resolve_concept(TARGET)
    alt = resolve_concept(ALT)
    sets = build_prompt_sets(cfg, [target], seed=0)
    seeds = [SEED_BASE + k for k in range(cfg["seeds"])]
    which = ["base", "abo->square", "abo->nothing"] + ([] if args.no_extra else
                                                       ["abo->square (+synonym)", "abo->square (official FT gate)"])
    from ..adapters.progress import iterate

    results, images = [], {}
    for name, stack in iterate(_configs(which), "bench abo", unit="config"):
        say(f"== {name}")
        r = evaluate_stack(pipe, judges, stack, targets=[TARGET], tier=cfg, prompt_sets=sets, log=None)
        images[name] = r.pop("_images")
        results.append({"name": name, "result": r})
        say(f"   {r['seconds']:.0f} s")
    # the base model asked for a square directly (same prompts with the word swapped, same seeds)
    from .quality import generate_with_stack

    swapped, base_swapped = {}, {}
    for sname, items in sets.items():
        idx = [i for i, (_, lab) in enumerate(items) if lab[0] == target.index]
        ps = [_swap(items[i][0]) for i in idx for _ in seeds]
        ss = [s for _ in idx for s in seeds]
        swapped[sname] = (idx, ps)
        if ps:
            base_swapped[sname], _ = generate_with_stack(pipe, ps, ss, None, steps=cfg["steps"], cfg=cfg["cfg"])
    # replacement with attributes, and layout, on the target images
    extra = {}
    for name, _ in _configs(which):
        per = {}
        for sname, items in sets.items():
            labels = np.array([lab for _, lab in items for _ in seeds]).reshape(-1, 3)
            is_t = labels[:, 0] == target.index
            imgs = images[name][sname]
            pred = classify(judges, imgs)
            row = {"replacement": _full_replacement(pred, labels, is_t, alt.index)}
            if is_t.any():
                row["layout_vs_base"] = layout_stats(imgs[torch.from_numpy(is_t)], images["base"][sname][torch.from_numpy(is_t)])
            if (~is_t).any():
                row["layout_non_target_vs_base"] = layout_stats(imgs[torch.from_numpy(~is_t)],
                                                                images["base"][sname][torch.from_numpy(~is_t)])
            per[sname] = row
        extra[name] = per
    ref = {}
    for sname, items in sets.items():
        if sname not in base_swapped:
            continue
        labels = np.array([lab for _, lab in items for _ in seeds]).reshape(-1, 3)
        is_t = labels[:, 0] == target.index
        lab_t = labels[is_t]
        pred = classify(judges, base_swapped[sname])
        base_t = images["base"][sname][torch.from_numpy(is_t)]
        other_seed = torch.roll(base_t, 1, 0)  # the next seed's (or prompt's) image: unrelated layout
        ref[sname] = {"replacement": _full_replacement(pred, lab_t, np.ones(len(lab_t), bool), alt.index),
                      "layout_swapped_prompt_vs_base": layout_stats(base_swapped[sname], base_t),
                      "layout_other_seed_vs_base": layout_stats(other_seed, base_t)}
    say("== speed")
    speed = bench_speed(pipe, repeats=args.repeats)
    result = {"tier": "quick", "tier_settings": cfg, "configs": results, "extra": extra, "reference": ref,
              "speed": speed, "seconds": time.time() - t_start, "cpu_seconds": time.process_time() - cpu_start, "load_average_start": load0,
              "load_average_end": os.getloadavg()[0], "torch_threads": torch.get_num_threads(),
              "gate_calibration": CAL}
    body = render(result)
    cmd = COMMAND + "".join(f" --{k.replace('_', '-')} {getattr(args, k)}" for k in ("threads", "seeds", "repeats")
                            if getattr(args, k, None))
    cmd += " --no-extra" if args.no_extra else ""
    result["command"] = cmd
    write_section("abo-guidance", "All-but-One guidance on the toy world (sampling-time reconstruction)", body, cmd,
                  data=result, json_path=args.json or os.path.join(ROOT, "benchmarks.json"))
    print(body)
    print(f"\nabo bench: {time.time() - t_start:.0f} s")
    return 0


def _rerender(path: str) -> int:
    """Re-render the BENCHMARKS.md section from a saved run (no generation)."""
    import json

    from .report import write_section

    with open(path) as f:
        result = json.load(f)["abo-guidance"]
    body = render(result) + f"\n- Re-rendered from the JSON of the run measured {result.get('measured')}."
    write_section("abo-guidance", "All-but-One guidance on the toy world (sampling-time reconstruction)", body,
                  result.get("command", COMMAND))
    print(body)
    return 0


def run_sweep(args) -> int:
    """Strength sweep on the target prompts only (keyword and held-out sets): does a stronger term
    raise the replacement accuracy, and what does it cost in garbage and layout?"""
    from ..adapters.abo.guidance import abo_eraser
    from ..adapters.gate import GateSettings
    from ..adapters.stack import EraserStack
    from ..toyworld import load_judges, load_pipeline
    from ..toyworld.judges import NONE, classify
    from .quality import SEED_BASE, TIERS, build_prompt_sets, generate_with_stack, resolve_concept
    from .report import ROOT, table, write_section

    t_start, cpu_start = time.time(), time.process_time()
    torch.set_num_threads(int(args.threads or 1))
    cfg = dict(TIERS["quick"])
    cfg["seeds"] = max(4, int(args.seeds or cfg["seeds"]))
    pipe, judges = load_pipeline(), load_judges()
    pipe.set_progress_bar_config(disable=True)
    target, alt = resolve_concept(TARGET), resolve_concept(ALT)
    sets = build_prompt_sets(cfg, [target], seed=0)
    seeds = [SEED_BASE + k for k in range(cfg["seeds"])]
    strengths = [float(x) for x in str(args.sweep).split(",") if x.strip()]
    rows, data = [], {}
    for sname in ("keyword", "heldout"):
        items = [it for it in sets[sname] if it[1][0] == target.index]
        ps = [p for p, _ in items for _ in seeds]
        ss = [s for _ in items for s in seeds]
        labels = np.array([lab for _, lab in items for _ in seeds]).reshape(-1, 3)
        base, _ = generate_with_stack(pipe, ps, ss, None, steps=cfg["steps"], cfg=cfg["cfg"])
        for st in strengths:
            stack = EraserStack().with_eraser(abo_eraser(TARGET, ALT), strength=st, gate=GateSettings(**CAL))
            imgs, _ = generate_with_stack(pipe, ps, ss, stack, steps=cfg["steps"], cfg=cfg["cfg"])
            pred = classify(judges, imgs)
            rep = _full_replacement(pred, labels, np.ones(len(labels), bool), alt.index)
            lay = layout_stats(imgs, base)
            garbage = float((pred["object"] == NONE["object"]).mean())
            data[f"{sname}@{st}"] = {"replacement": rep, "garbage": garbage, "layout": lay}
            rows.append({"s": sname, "st": f"{st:g}", "n": rep["n"], "rep": _pct(rep["object"]),
                         "full": _pct(rep["object_and_attributes"]), "g": _pct(garbage),
                         "lay": f"{lay['centroid_shift_px_median']:.1f} / {lay['iou_median']:.2f}"})
            print(rows[-1])
    body = ("Strength sweep of `abo->square` (calibrated gate) on the **target prompts only** of the quick tier's "
            f"keyword and held-out sets ({cfg['seeds']} seeds each; strength 1 is in the `abo-guidance` section). "
            "square+attrs: judged square with the prompt's colour and style (target >= 85%); layout: median centroid "
            "shift px / median IoU vs the unerased image.\n\n" +
            table(rows, [("s", "prompts"), ("st", "strength"), ("n", "images"), ("rep", "square"),
                         ("full", "square+attrs"), ("g", "garbage"), ("lay", "layout shift / IoU")]) +
            f"\nWall {time.time() - t_start:.0f} s, CPU {time.process_time() - cpu_start:.0f} s, load average "
            f"{os.getloadavg()[0]:.1f} at the end.")
    cmd = f"{COMMAND} --sweep {args.sweep} --threads {args.threads} --seeds {cfg['seeds']}"
    write_section("abo-guidance-strength", "All-but-One guidance: strength sweep (toy world)", body, cmd,
                  data={"rows": data, "command": cmd}, json_path=args.json or os.path.join(ROOT, "benchmarks.json"))
    print(body)
    return 0


def _pct(v):
    if v is None:
        return "–"
    if isinstance(v, dict):
        if v.get("value") is None or v["value"] != v["value"]:
            return "–"
        return f"{100 * v['value']:.0f} [{100 * v['lo']:.0f}, {100 * v['hi']:.0f}]"
    return "–" if v != v else f"{100 * v:.0f}"


def render(result: dict) -> str:
    from .report import table

    cfg = result["tier_settings"]
    lines = [
        "Erase **triangle** toward **square** and toward nothing with the sampling-time rule "
        "`eps_hat = eps(x,e_n) + w[eps(x,e_p) - eps(x,e_n)] - w*gamma(p)*[eps(x,e_erase) - eps(x,e_alt)]` "
        "(a reconstruction from the paper's abstract; `adapters/abo/guidance.py`). Quick tier of the quality bench: DDIM "
        f"{cfg['steps']} steps, CFG {cfg['cfg']}, {cfg['seeds']} seeds per prompt (identical for every row), prompts "
        f"per set {result['configs'][0]['result']['settings']['prompts_per_set']}. Gate: non-official threshold "
        f"{CAL['threshold']} on Facilitated Transport (the official rule fires on every toy prompt, last row). "
        f"Total {result['seconds']:.0f} s, {result['torch_threads']} torch thread(s), load average "
        f"{result['load_average_start']:.1f} -> {result['load_average_end']:.1f}. Percentages, 95% bootstrap intervals "
        "in brackets.",
        "",
    ]
    base = result["configs"][0]["result"]
    bt = {s: m for t in base["targets"] for s, m in t["sets"].items()}
    rows = []
    for c in result["configs"]:
        t = c["result"]["targets"][0]
        for s, m in t["sets"].items():
            d = lambda k: "" if c["name"] == "base" else f" ({100 * (m[k]['value'] - bt[s][k]['value']):+.0f})"
            rep = result["extra"][c["name"]][s]["replacement"]
            rows.append({"c": c["name"], "s": s, "n": m["n_target_images"], "ua": _pct(m["ua"]),
                         "ira": _pct(m["ira"]) + d("ira"), "cra": _pct(m["cra"]) + d("cra"),
                         "g": _pct(m["garbage_rate"]), "keep": _pct(m.get("retain_on_target")),
                         "rep": _pct(rep["object"]), "full": _pct(rep["object_and_attributes"])})
    lines.append("**Erasure and replacement** (target triangle; IRA/CRA change vs base in points in brackets after "
                 "the interval; *square*: target images judged square; *square+attrs*: judged square with the "
                 "prompt's colour and style, issue 7's replacement accuracy, target >= 85%; keep: colour and style "
                 "kept on target images):")
    lines.append("")
    lines.append(table(rows, [("c", "config"), ("s", "prompts"), ("n", "target imgs"), ("ua", "UA"), ("ira", "IRA"),
                              ("cra", "CRA"), ("g", "garbage"), ("keep", "keep"), ("rep", "square"),
                              ("full", "square+attrs")]))
    rows = []
    for s, r in result["reference"].items():
        rows.append({"s": s, "n": r["replacement"]["n"], "rep": _pct(r["replacement"]["object"]),
                     "full": _pct(r["replacement"]["object_and_attributes"])})
    lines.append("Ceiling: the **base model asked for a square** (the target prompts with the word swapped, same "
                 "seeds):")
    lines.append("")
    lines.append(table(rows, [("s", "prompts"), ("n", "images"), ("rep", "square"), ("full", "square+attrs")]))
    rows = []
    for c in result["configs"][1:]:
        for s, r in result["extra"][c["name"]].items():
            lv = r.get("layout_vs_base")
            if lv:
                rows.append({"c": c["name"], "s": s, "n": f"{lv['n']}/{lv['pairs']}",
                             "shift": f"{lv['centroid_shift_px_median']:.1f} ({lv['centroid_shift_px_mean']:.1f})",
                             "area": f"{100 * lv['area_change_median']:.0f}%", "iou": f"{lv['iou_median']:.2f}"})
    for s, r in result["reference"].items():
        for key, label in (("layout_swapped_prompt_vs_base", "base, prompt says square"),
                           ("layout_other_seed_vs_base", "base, another image")):
            lv = r[key]
            rows.append({"c": label, "s": s, "n": f"{lv['n']}/{lv['pairs']}",
                         "shift": f"{lv['centroid_shift_px_median']:.1f} ({lv['centroid_shift_px_mean']:.1f})",
                         "area": f"{100 * lv['area_change_median']:.0f}%", "iou": f"{lv['iou_median']:.2f}"})
    lines.append("**Layout preservation** on target images (same prompt and seed as the unerased generation; "
                 "silhouette from `judges.silhouette_mask`; pairs with an empty silhouette skipped; centroid shift "
                 "median (mean) in px of 64, median |area change|, median mask IoU; the last rows are references: "
                 "the base model given the square-swapped prompt, and an unrelated image):")
    lines.append("")
    lines.append(table(rows, [("c", "config"), ("s", "prompts"), ("n", "pairs"), ("shift", "centroid shift px"),
                              ("area", "area change"), ("iou", "IoU")]))
    sp = result["speed"]
    rows = [{"w": k, "r": f"{v['value']:.3f}x", "t": f"<= {v['target']}x",
             "ok": "met" if v["value"] <= v["target"] else "**missed**", "e": v["extra_rows_per_prompt"]}
            for k, v in sp["ratios"].items()]
    lines.append(f"**Speed** (whole pipeline calls: {sp['prompts']} prompts, {sp['steps']} steps, CFG {sp['cfg']}, "
                 f"VAE decode included; median of {sp['repeats']} interleaved per-repetition ratios over plain CFG on "
                 f"the same prompts; {sp['torch_threads']} torch thread(s), load average {sp['load_average_start']:.1f} "
                 f"-> {sp['load_average_end']:.1f}; medians s: " +
                 ", ".join(f"{k} {v:.2f}" for k, v in sp["median_seconds"].items()) + "):")
    lines.append("")
    lines.append(table(rows, [("w", "case"), ("e", "extra rows per prompt"), ("r", "ratio"), ("t", "target"),
                              ("ok", "status")]))
    lines.extend(_notes(result))
    return "\n".join(lines)


def _notes(result) -> list[str]:
    out = [""]
    base = {s: m for t in result["configs"][0]["result"]["targets"] for s, m in t["sets"].items()}
    for c in result["configs"][1:]:
        m = c["result"]["targets"][0]["sets"]
        bad = [f"{s} {k.upper()} {100 * (m[s][k]['value'] - base[s][k]['value']):+.0f}"
               for s in m for k in ("ira", "cra") if abs(m[s][k]["value"] - base[s][k]["value"]) > 0.03]
        full = [f"{s} {100 * r['replacement']['object_and_attributes']:.0f}%" for s, r in result["extra"][c["name"]].items()
                if "square" in c["name"] and r["replacement"]["object_and_attributes"] < 0.85]
        if bad:
            out.append(f"- {c['name']}: IRA/CRA more than 3 points from base: {', '.join(bad)} (target missed there).")
        if full:
            out.append(f"- {c['name']}: replacement accuracy (square with the prompt's colour and style) below 85%: "
                       f"{', '.join(full)}.")
    out.append("- The synonym set names the object 'trigon': with the calibrated gate (token match) only an eraser that "
               "lists the synonym fires there (the '+synonym' row); the official FT rule fires on every prompt and "
               "so also changes prompts that do not name the target (see its IRA/CRA).")
    lay = [(s, r["layout_vs_base"]["centroid_shift_px_median"], r["layout_vs_base"]["iou_median"])
           for s, r in result["extra"].get("abo->square", {}).items() if r.get("layout_vs_base")]
    refs = result.get("reference", {})
    if lay and refs:
        out.append("- Layout (abo->square vs the unerased image, median centroid shift / IoU): " + ", ".join(
            f"{s} {d:.1f} px / {i:.2f}" for s, d, i in lay) + "; the base model given the square-swapped prompt: " +
            ", ".join(f"{s} {r['layout_swapped_prompt_vs_base']['centroid_shift_px_median']:.1f} px / "
                      f"{r['layout_swapped_prompt_vs_base']['iou_median']:.2f}" for s, r in refs.items()) +
            "; an unrelated image: " + ", ".join(f"{s} {r['layout_other_seed_vs_base']['centroid_shift_px_median']:.1f} px"
                                                for s, r in refs.items()) +
            ". Rows whose gate is 0 are bit-identical (shift 0, IoU 1).")
    if result.get("cpu_seconds"):
        out.append(f"- CPU time of the run: {result['cpu_seconds']:.0f} s (wall {result['seconds']:.0f} s on a shared, "
                   "loaded machine).")
    return out


def add_abo_cli(sub):
    s = sub.add_parser("abo", help="All-but-One guidance on the toy world: replacement, UA/IRA/CRA, layout, speed")
    s.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    s.add_argument("--seeds", type=int, default=4, help="seeds per prompt (at least 4)")
    s.add_argument("--repeats", type=int, default=5, help="interleaved speed repetitions")
    s.add_argument("--no-extra", action="store_true", help="skip the '+synonym' and official-gate rows")
    s.add_argument("--sweep", default=None, help="only a strength sweep on the target prompts, e.g. 1.5,2 "
                   "(own BENCHMARKS.md section)")
    s.add_argument("--json", default=None, help="also write the numbers here (default: benchmarks.json)")
    s.add_argument("--from-json", default=None, help="only re-render the BENCHMARKS.md section from a saved JSON")
    s.set_defaults(func=run_bench)
    return s

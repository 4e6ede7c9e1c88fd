"""``python -m conceptgate demo``: the toy world with and without erasure, in one picture.

Writes into ``./conceptgate-demo/``:

* ``grid.png`` -- rows: target prompts, synonym prompts, unrelated prompts; columns: no erasure,
  each eraser alone, the whole stack. Each cell is annotated with the gate of the eraser(s) acting
  in that column and with what the judges see (object / style);
* ``metrics.json`` -- every cell's prompt, seed, gates and judged labels, and per column the share of
  target / synonym rows whose target the judge no longer sees and of unrelated rows still judged as
  prompted;
* the erasers used: UCE and RECE edits computed on the fly on the toy model (an object with UCE, a
  style with RECE; seconds), as gated ConceptGate ``.safetensors`` files, and ``stack.json`` (a
  stack manifest referencing them).

Erasers shipped under ``toyworld/erasers/*.safetensors`` (SPM membranes and the later mechanisms)
are picked up automatically and get their own column; a kind the benchmark cannot run yet
(conditioning / guidance without a registered handler) gets a grey column saying so.
"""

from __future__ import annotations

import glob
import json
import os
import time

import numpy as np
import torch

from .quality import (DEFAULT_EDITS, KINDS, Target, UnsupportedEraser, _raw_gates, eraser_targets,
                      generate_with_stack, kind_names, make_edit_erasers)

OUT_DIR = "conceptgate-demo"
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "toyworld", "erasers")
SCALE = 2          # 64 px cells drawn at 128 px
LABEL_H = 30       # text under each cell
HEADER_H = 34
LEFT_W = 230


def _prompt_for(t: Target, syn: bool, rng_i: int) -> str:
    """A prompt naming target ``t`` (keyword or synonym) and, for the other kinds, fixed partners."""
    from ..toyworld import captions as C

    others = {"object": (5, 3, 0), "style": (6, 2, 1), "colour": (6, 4, 1)}   # (o, s, c) partners (+ row offset)
    o, s, c = others[t.kind]
    o = t.index if t.kind == "object" else (o + rng_i) % len(C.OBJECT_NAMES)
    s = t.index if t.kind == "style" else (s + rng_i) % len(C.STYLE_NAMES)
    c = t.index if t.kind == "colour" else (c + rng_i) % len(C.COLOUR_NAMES)
    ni = 1 if syn else 0

    def nm(table, i, named):
        names = table[i]
        return names[min(ni, len(names) - 1)] if named else names[0]

    return "a {c} {o} in {s} style".format(o=nm(C.OBJECT_NAMES, o, t.kind == "object"),
                                           s=nm(C.STYLE_NAMES, s, t.kind == "style"), c=C.COLOUR_NAMES[c][0])


def demo_rows(targets, n_unrelated: int = 2) -> list[dict]:
    """One target and one synonym row per target, then unrelated rows naming none of the targets."""
    from ..toyworld import captions as C

    rows = []
    targets = [t for t in targets if t.kind in KINDS]
    for i, t in enumerate(targets):
        rows.append({"kind": "target", "target": t.keyword, "prompt": _prompt_for(t, False, i)})
    for i, t in enumerate(targets):
        if len(kind_names(t.kind)[t.index]) > 1:
            rows.append({"kind": "synonym", "target": t.keyword, "prompt": _prompt_for(t, True, i)})
    taken = {(t.kind, t.index) for t in targets}
    candidates = [(6, 0, 1), (1, 2, 3), (4, 4, 4), (7, 5, 5), (0, 0, 2), (3, 3, 0)]
    for o, s, c in candidates:
        if len([r for r in rows if r["kind"] == "unrelated"]) >= n_unrelated:
            break
        if ("object", o) in taken or ("style", s) in taken or ("colour", c) in taken:
            continue
        rows.append({"kind": "unrelated", "target": None, "prompt": C.prompt(o, s, c), "labels": [o, s, c]})
    return rows


def column_labels(erasers) -> list[str]:
    """Unique column labels: the eraser's name, prefixed with its method when the name does not say
    it (a shipped SPM file named "triangle" becomes "spm triangle"); repeats get the file name."""
    out = []
    for e in erasers:
        label = e.name if (e.method or "").lower() in e.name.lower() else f"{e.method} {e.name}"
        if label in out and e.source:
            label = f"{label} ({os.path.splitext(os.path.basename(e.source))[0]})"
        k = 2
        base = label
        while label in out:
            label, k = f"{base} #{k}", k + 1
        out.append(label)
    return out


def load_shipped(folder: str = SHIPPED_DIR, log=print) -> list:
    """Every loadable ``.safetensors`` eraser in ``folder`` (a file that fails validation is reported
    and skipped). The folder may not exist yet."""
    from ..adapters.files import load_eraser

    out = []
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        try:
            out.append(load_eraser(path))
        except Exception as e:  # a broken file must not break the demo
            log(f"skipping {os.path.relpath(path)}: {e}")
    return out


def _font(size=11):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _wrap(text: str, width: int) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if len(cur) + len(w) + 1 > width and cur:
            lines.append(cur)
            cur = w
        else:
            cur = (cur + " " + w).strip()
    return lines + ([cur] if cur else [])


def draw_grid(path: str, rows: list[dict], columns: list[dict]) -> None:
    """``columns[j]['images']``: (n_rows,3,64,64) tensor or None (unsupported); ``columns[j]['notes']``:
    one label per row under each cell; ``columns[j]['title']``."""
    from PIL import Image, ImageDraw

    cell = 64 * SCALE
    W = LEFT_W + len(columns) * (cell + 6) + 6
    H = HEADER_H + len(rows) * (cell + LABEL_H + 6) + 6
    img = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(img)
    f, fb = _font(11), _font(12)
    for j, col in enumerate(columns):
        x = LEFT_W + j * (cell + 6) + 6
        for k, line in enumerate(_wrap(col["title"], 22)[:2]):
            d.text((x, 4 + 14 * k), line, fill=(0, 0, 0), font=fb)
    colours = {"target": (170, 20, 20), "synonym": (170, 90, 0), "unrelated": (20, 100, 20)}
    for i, row in enumerate(rows):
        y = HEADER_H + i * (cell + LABEL_H + 6) + 6
        d.text((6, y + 4), row["kind"] + (f" ({row['target']})" if row.get("target") else ""),
               fill=colours.get(row["kind"], (0, 0, 0)), font=fb)
        for k, line in enumerate(_wrap(row["prompt"], 34)[:4]):
            d.text((6, y + 22 + 14 * k), line, fill=(0, 0, 0), font=f)
        for j, col in enumerate(columns):
            x = LEFT_W + j * (cell + 6) + 6
            if col["images"] is None:
                d.rectangle([x, y, x + cell, y + cell], fill=(200, 200, 200))
                for k, line in enumerate(_wrap(col.get("why", "not runnable yet"), 20)[:5]):
                    d.text((x + 4, y + 4 + 14 * k), line, fill=(60, 60, 60), font=f)
                continue
            arr = (col["images"][i].permute(1, 2, 0).numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8)
            img.paste(Image.fromarray(arr).resize((cell, cell), Image.NEAREST), (x, y))
            for k, line in enumerate(col["notes"][i].split("\n")[:2]):
                d.text((x, y + cell + 2 + 13 * k), line, fill=(40, 40, 40), font=f)
    img.save(path)


def run_demo(out_dir: str = OUT_DIR, steps: int = 25, cfg: float = 5.0, seed: int = 1000, n_unrelated: int = 2,
             max_targets: int | None = None, shipped_dir: str | None = SHIPPED_DIR, edits=DEFAULT_EDITS,
             log=print) -> dict:
    """Build the demo into ``out_dir``; returns the metrics dict (also written as ``metrics.json``).

    The reduced-size knobs (``steps``, ``n_unrelated``, ``max_targets``, ``shipped_dir=None``) are for tests."""
    from ..adapters.diffusers_host import DiffusersTextEncoder, check_stack_fits
    from ..adapters.errors import IncompatibleModelError
    from ..adapters.stack import EraserStack
    from ..toyworld import load_judges, load_pipeline
    from ..toyworld.judges import classify
    from ..toyworld.models import JUDGE_HEADS

    t0 = time.time()
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(0)
    pipe, judges = load_pipeline(), load_judges()
    t_load = time.time() - t0
    erasers = make_edit_erasers(pipe, edits, out_dir=out_dir, log=log)
    skipped = {}
    if shipped_dir:
        for e in load_shipped(shipped_dir, log):
            try:
                check_stack_fits(EraserStack().with_eraser(e), pipe.unet)
            except IncompatibleModelError as err:
                log(f"skipping {e.name}: {err}")
                skipped[e.name] = str(err)
                continue
            erasers.append(e)
    targets = []
    for e in erasers:
        for t in eraser_targets(e):
            if t not in targets:
                targets.append(t)
    if max_targets is not None:
        targets = targets[:max_targets]
    rows = demo_rows(targets, n_unrelated)
    prompts = [r["prompt"] for r in rows]
    seeds = [seed] * len(rows)
    full = EraserStack()
    for e in erasers:
        full = full.with_eraser(e)
    enc = DiffusersTextEncoder(pipe.tokenizer, pipe.text_encoder)
    gates = _raw_gates(full, enc, prompts)          # [rows, erasers]
    names = column_labels(erasers)

    def judged(images):
        p = classify(judges, images)
        return [{k: JUDGE_HEADS[k][int(p[k][i])] for k in ("object", "style", "colour", "watermark")}
                for i in range(len(images))]

    columns = []
    runnable = EraserStack()
    plan = [("no erasure", None, [])] + [(names[j], EraserStack().with_eraser(e), [j]) for j, e in enumerate(erasers)]
    for title, st, idx in plan:
        t1 = time.time()
        col = {"title": title, "erasers": [names[j] for j in idx]}
        try:
            imgs, _ = generate_with_stack(pipe, prompts, seeds, st, steps=steps, cfg=cfg, batch=64)
            if st is not None:
                runnable = runnable.with_eraser(st.entries[0].eraser)
        except UnsupportedEraser as err:
            imgs, col["why"] = None, f"{erasers[idx[0]].kind} eraser: {err}"
            log(f"{title}: not runnable here ({err})")
        col["images"] = imgs
        col["seconds"] = time.time() - t1
        columns.append(col)
    if len(runnable) > 1:
        t1 = time.time()
        imgs, _ = generate_with_stack(pipe, prompts, seeds, runnable, steps=steps, cfg=cfg, batch=64)
        columns.append({"title": "whole stack", "erasers": [names[next(j for j, e in enumerate(erasers) if e is x.eraser)]
                                                            for x in runnable.entries], "images": imgs,
                        "seconds": time.time() - t1})
    # judge every cell, annotate, and summarise per column
    for col in columns:
        if col["images"] is None:
            col["judged"], col["notes"] = None, None
            continue
        col["judged"] = judged(col["images"])
        col["notes"] = []
        for i, jd in enumerate(col["judged"]):
            g = [float(gates[i, names.index(n)]) for n in col["erasers"]]
            gate_txt = ("gate " + "/".join(f"{v:.2f}" for v in g)) if g else "no eraser"
            col["notes"].append(f"{gate_txt}\n{jd['object']}, {jd['style']}")
    summary = {}
    by_name = dict(zip(names, erasers))
    for col in columns:
        if col["judged"] is None:
            continue
        # an eraser's column is scored on its own targets' rows; "no erasure" on every target row
        mine = {t.keyword for n in col["erasers"] for t in eraser_targets(by_name[n])} if col["erasers"] else None
        gone, kept = [], []
        for r, jd in zip(rows, col["judged"]):
            if r["kind"] in ("target", "synonym"):
                if mine is not None and r["target"] not in mine:
                    continue
                t = next(t for t in targets if t.keyword == r["target"])
                seen = jd[t.kind]
                gone.append(seen != JUDGE_HEADS[t.kind][t.index] and seen != "none")
            else:
                o, s, _ = r["labels"]
                kept.append(jd["object"] == JUDGE_HEADS["object"][o] and jd["style"] == JUDGE_HEADS["style"][s])
        summary[col["title"]] = {"target_not_seen": float(np.mean(gone)) if gone else None,
                                 "unrelated_kept": float(np.mean(kept)) if kept else None}
    png = os.path.join(out_dir, "grid.png")
    draw_grid(png, rows, columns)
    manifest = None
    runnable_written = [e for e in runnable.entries if e.eraser.source]
    if runnable_written:
        manifest = os.path.join(out_dir, "stack.json")
        EraserStack(tuple(runnable_written)).to_manifest(manifest)
    metrics = {
        "sampler": f"DDIM {steps} steps, CFG {cfg}", "seed": seed, "gate_rule": "official Facilitated Transport",
        "erasers": [{"name": n, "eraser_name": e.name, "kind": e.kind, "method": e.method, "concepts": list(e.concepts),
                     "file": e.source, "guide": (e.settings or {}).get("guide")} for n, e in zip(names, erasers)],
        "skipped": skipped,
        "rows": [{**r, "gates": {n: float(gates[i, j]) for j, n in enumerate(names)}} for i, r in enumerate(rows)],
        "columns": [{"title": c["title"], "erasers": c["erasers"], "judged": c["judged"], "seconds": c["seconds"],
                     **({"why": c["why"]} if c.get("why") else {})} for c in columns],
        "summary": summary, "grid": png, "stack_manifest": manifest,
        "seconds": {"load": t_load, "total": time.time() - t0},
    }
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    log(format_table(metrics))
    log(f"\nwrote {png}, {os.path.join(out_dir, 'metrics.json')}"
        + (f", {manifest}" if manifest else "") + f" in {metrics['seconds']['total']:.0f} s")
    return metrics


def format_table(metrics: dict) -> str:
    names = [e["name"] for e in metrics["erasers"]]
    w = [max(9, len(n) + 5) for n in names]
    head = f"{'row':10s} {'prompt':38s} " + " ".join(f"{'gate ' + n:>{k}s}" for n, k in zip(names, w))
    lines = [head, "-" * len(head)]
    for r in metrics["rows"]:
        lines.append(f"{r['kind']:10s} {r['prompt'][:38]:38s} "
                     + " ".join(f"{r['gates'][n]:{k}.2f}" for n, k in zip(names, w)))
    lines.append("")
    lines.append(f"{'column':28s} {'judged object/style per row'}")
    for c in metrics["columns"]:
        if c["judged"] is None:
            lines.append(f"{c['title'][:28]:28s} not runnable: {c.get('why', '')}")
            continue
        lines.append(f"{c['title'][:28]:28s} " + "  ".join(f"{j['object']}/{j['style']}" for j in c["judged"]))
    lines.append("")
    for t, s in metrics["summary"].items():
        lines.append(f"{t[:28]:28s} its target not seen on target+synonym rows: "
                     + ("–" if s["target_not_seen"] is None else f"{100 * s['target_not_seen']:.0f}%")
                     + "; unrelated rows judged as prompted: "
                     + ("–" if s["unrelated_kept"] is None else f"{100 * s['unrelated_kept']:.0f}%"))
    return "\n".join(lines)

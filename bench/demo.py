"""``python -m conceptgate demo``: the toy world with and without erasure, in one picture.

Writes into ``./conceptgate-demo/``:

* ``grid.png`` -- rows: target prompts, synonym prompts, unrelated prompts; columns: no erasure,
  each eraser alone (numbered #1, #2, ...), the whole stack. Each column has a legend under its title
  (the mechanism, what it erases and into what, its gate rule); each cell is annotated with the gate of
  the eraser(s) acting in that column, what the judges see (object / style) and whether that is what the
  column should do: its own target gone ("erased"), everything else as prompted ("kept");
* ``metrics.json`` -- every cell's prompt, seed, gates, judged labels and that verdict, and per column the
  share of its target rows whose target the judge no longer sees and of all its other rows (other
  erasers' targets and unrelated prompts) still judged as prompted;
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

from ..toyworld.models import JUDGE_HEADS
from .quality import (DEFAULT_EDITS, KINDS, Target, UnsupportedEraser, _raw_gates, eraser_targets,
                      generate_with_stack, kind_names, make_edit_erasers)

OUT_DIR = "conceptgate-demo"
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "toyworld", "erasers")
SCALE = 2          # 64 px cells drawn at 128 px
LINE_H = 13        # one line of cell text
LEFT_W = 230
GAP = 8
OK_COLOUR, MISS_COLOUR = (20, 110, 20), (190, 20, 20)
METHODS = {"uce": "UCE edit", "rece": "RECE edit", "spm": "SPM membrane", "abo": "All-but-One",
           "geom": "Geom-Erasing tokens"}


def _prompt_for(t: Target, syn: bool, rng_i: int) -> tuple[str, list[int]]:
    """A prompt naming target ``t`` (keyword or synonym) and, for the other kinds, fixed partners; and its
    (object, style, colour) labels."""
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

    text = "a {c} {o} in {s} style".format(o=nm(C.OBJECT_NAMES, o, t.kind == "object"),
                                           s=nm(C.STYLE_NAMES, s, t.kind == "style"), c=C.COLOUR_NAMES[c][0])
    return text, [o, s, c]


def demo_rows(targets, n_unrelated: int = 2) -> list[dict]:
    """One target and one synonym row per target, then unrelated rows naming none of the targets."""
    from ..toyworld import captions as C

    rows = []
    targets = [t for t in targets if t.kind in KINDS]
    for i, t in enumerate(targets):
        text, labels = _prompt_for(t, False, i)
        rows.append({"kind": "target", "target": t.keyword, "prompt": text, "labels": labels})
    for i, t in enumerate(targets):
        if len(kind_names(t.kind)[t.index]) > 1:
            text, labels = _prompt_for(t, True, i)
            rows.append({"kind": "synonym", "target": t.keyword, "prompt": text, "labels": labels})
    taken = {(t.kind, t.index) for t in targets}
    candidates = [(6, 0, 1), (1, 2, 3), (4, 4, 4), (7, 5, 5), (0, 0, 2), (3, 3, 0)]
    for o, s, c in candidates:
        if len([r for r in rows if r["kind"] == "unrelated"]) >= n_unrelated:
            break
        if ("object", o) in taken or ("style", s) in taken or ("colour", c) in taken:
            continue
        rows.append({"kind": "unrelated", "target": None, "prompt": C.prompt(o, s, c), "labels": [o, s, c]})
    return rows


def erases_watermark(eraser) -> bool:
    return any(c.strip().lower() == "watermark" for c in eraser.concepts)


def watermark_row(pipe, judges, rows, seed: int, steps: int, cfg: float, tries: int = 12):
    """A row for the Geom-Erasing column: the toy model draws its watermark on some seeds only (it is never
    captioned), so the first unrelated prompt is generated on the base model with seeds ``seed + 1 ...``
    (one batch) and the first seed whose image the judges see the watermark and the prompted object in is
    kept. ``None`` when no seed of ``tries`` shows one."""
    from ..toyworld import captions as C
    from ..toyworld.judges import classify

    base = next((r for r in rows if r["kind"] == "unrelated"), None)
    prompt, labels = (base["prompt"], base["labels"]) if base else (C.prompt(6, 0, 1), [6, 0, 1])
    seeds = [seed + 1 + k for k in range(tries)]
    imgs, _ = generate_with_stack(pipe, [prompt] * tries, seeds, None, steps=steps, cfg=cfg, batch=64)
    p = classify(judges, imgs)
    for k, s in enumerate(seeds):
        if JUDGE_HEADS["watermark"][int(p["watermark"][k])] == "present" and int(p["object"][k]) == labels[0]:
            return {"kind": "watermark", "target": "watermark", "prompt": prompt, "labels": list(labels), "seed": s}
    return None


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


def column_legend(eraser, rule: str) -> list[str]:
    """The lines under an eraser column's title: its mechanism, what it does, its gate rule."""
    s = eraser.settings or {}
    concepts = ", ".join(eraser.concepts)
    if eraser.method in ("uce", "rece"):
        does = [f"{concepts} -> {str(s.get('guide') or '').strip() or 'nothing'}"]
    elif eraser.method == "abo":
        does = [f"{concepts} -> {str(s.get('alternative') or '').strip() or 'nothing'}"]
    elif eraser.kind == "conditioning":
        does = [f"learned '{concepts}' tokens", "in the negative prompt"]
    else:
        does = [f"erases {concepts}"]
    return [METHODS.get(eraser.method, eraser.method), *does, f"gate rule: {rule}"]


def score_cell(row: dict, judged: dict, erases, targets) -> tuple[str, bool]:
    """What the column should do on ``row`` and whether it did: ``("erased", ok)`` on the rows of the targets in
    ``erases`` (the judge no longer sees the target, and sees something), else ``("kept", ok)`` (object and
    style judged as prompted)."""
    if row["kind"] == "watermark" and erases and "watermark" in erases:  # Geom: the glyph gone, the object drawn
        return "erased", judged["watermark"] == "absent" and judged["object"] != "none"
    if erases and row["kind"] in ("target", "synonym") and row["target"] in erases:
        t = next(t for t in targets if t.keyword == row["target"])
        seen = judged[t.kind]
        return "erased", seen != JUDGE_HEADS[t.kind][t.index] and seen != "none"
    o, s, _ = row["labels"]
    return "kept", judged["object"] == JUDGE_HEADS["object"][o] and judged["style"] == JUDGE_HEADS["style"][s]


def verdict_text(expect: str, ok: bool) -> str:
    return {("erased", True): "erased", ("erased", False): "NOT erased",
            ("kept", True): "kept", ("kept", False): "CHANGED"}[(expect, ok)]


FOOTER = ("Rows: 'target' names a concept an eraser erases, 'synonym' another word for it, 'unrelated' none of them. "
          "Under each cell: the gate of the column's eraser (1 = acts, 0 = leaves the prompt alone; the stack "
          "column lists the erasers that fired), what the judges see (object, style), and the verdict: 'erased' = "
          "the column's own target is gone, 'kept' = drawn as prompted; red = the column did not do that. "
          "'watermark' = an unrelated prompt with a seed on which the toy model draws its watermark (no caption ever "
          "names it; the Geom-Erasing column's target).")


def draw_grid(path: str, rows: list[dict], columns: list[dict], footer: str = FOOTER) -> None:
    """``columns[j]``: ``title``, ``legend`` (lines under the title), ``images`` ((n_rows,3,64,64) tensor, or None
    for a kind that cannot run here, with ``why``), ``notes`` (per row: lines under the cell) and ``verdicts``
    (per row: (text, ok)). Every column is as wide as its widest text, so nothing is cut off."""
    from PIL import Image, ImageDraw

    cell = 64 * SCALE
    f, fb = _font(11), _font(12)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    titles = [_wrap(c["title"], 22)[:2] for c in columns]
    widths = []
    for col, title in zip(columns, titles):
        lines = [(t, fb) for t in title] + [(t, f) for t in col.get("legend", ())]
        lines += [(t, f) for note in col.get("notes") or () for t in note]
        lines += [(v, f) for v, _ in col.get("verdicts") or ()]
        widths.append(int(max([cell] + [measure.textlength(t, font=font) + 4 for t, font in lines])))
    xs = [LEFT_W + GAP + sum(w + GAP for w in widths[:j]) for j in range(len(columns))]
    header_h = 6 + 15 * max(len(t) for t in titles) + LINE_H * max(len(c.get("legend", ())) for c in columns) + 6
    text_lines = max([len(n) for c in columns for n in (c.get("notes") or ())] or [0]) + 1
    row_h = cell + 4 + LINE_H * text_lines + GAP
    W = xs[-1] + widths[-1] + GAP if columns else LEFT_W
    footer_lines = _wrap(footer, max(40, int(W / 6.2))) if footer else []
    H = header_h + len(rows) * row_h + LINE_H * len(footer_lines) + 10
    img = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(img)
    legend_y = 6 + 15 * max(len(t) for t in titles)  # one line for every column's legend
    for col, title, x in zip(columns, titles, xs):
        for k, line in enumerate(title):
            d.text((x, 6 + 15 * k), line, fill=(0, 0, 0), font=fb)
        for k, line in enumerate(col.get("legend", ())):
            d.text((x, legend_y + LINE_H * k), line, fill=(70, 70, 70), font=f)
    colours = {"target": (170, 20, 20), "synonym": (170, 90, 0), "unrelated": (20, 100, 20), "watermark": (40, 40, 160)}
    for i, row in enumerate(rows):
        y = header_h + i * row_h
        d.text((6, y + 4), row["kind"] + (f" ({row['target']})" if row.get("target") else ""),
               fill=colours.get(row["kind"], (0, 0, 0)), font=fb)
        for k, line in enumerate(_wrap(row["prompt"], 34)[:4]):
            d.text((6, y + 22 + 14 * k), line, fill=(0, 0, 0), font=f)
        for col, x in zip(columns, xs):
            if col["images"] is None:
                d.rectangle([x, y, x + cell, y + cell], fill=(200, 200, 200))
                for k, line in enumerate(_wrap(col.get("why", "not runnable yet"), 20)[:8]):
                    d.text((x + 4, y + 4 + 14 * k), line, fill=(60, 60, 60), font=f)
                continue
            arr = (col["images"][i].permute(1, 2, 0).numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8)
            img.paste(Image.fromarray(arr).resize((cell, cell), Image.NEAREST), (x, y))
            note = col["notes"][i] if col.get("notes") else []
            for k, line in enumerate(note):
                d.text((x, y + cell + 2 + LINE_H * k), line, fill=(40, 40, 40), font=f)
            if col.get("verdicts"):
                text, ok = col["verdicts"][i]
                d.text((x, y + cell + 2 + LINE_H * len(note)), text, fill=OK_COLOUR if ok else MISS_COLOUR, font=fb)
    for k, line in enumerate(footer_lines):
        d.text((6, header_h + len(rows) * row_h + LINE_H * k), line, fill=(90, 90, 90), font=f)
    img.save(path)


def _fmt_gate(v: float) -> str:
    return f"{v:.2f}"


def run_demo(out_dir: str = OUT_DIR, steps: int = 25, cfg: float = 5.0, seed: int = 1000, n_unrelated: int = 2,
             max_targets: int | None = None, shipped_dir: str | None = SHIPPED_DIR, edits=DEFAULT_EDITS,
             log=None) -> dict:
    """Build the demo into ``out_dir``; returns the metrics dict (also written as ``metrics.json``).

    The reduced-size knobs (``steps``, ``n_unrelated``, ``max_targets``, ``shipped_dir=None``) are for tests.
    ``log``: where the lines go (default: stdout, above the progress bar)."""
    from ..adapters.diffusers_host import DiffusersTextEncoder, check_stack_fits
    from ..adapters.errors import IncompatibleModelError
    from ..adapters.progress import bar, write
    from ..adapters.stack import EraserStack
    from ..toyworld import load_judges, load_pipeline
    from ..toyworld.judges import classify

    log = log or write
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
    t_erasers = time.time() - t0 - t_load
    targets = []
    for e in erasers:
        for t in eraser_targets(e):
            if t not in targets:
                targets.append(t)
    if max_targets is not None:
        targets = targets[:max_targets]
    rows = demo_rows(targets, n_unrelated)
    if any(erases_watermark(e) for e in erasers):
        row = watermark_row(pipe, judges, rows, seed, steps, cfg)
        if row:
            rows.append(row)
            log(f"watermark row: '{row['prompt']}', seed {row['seed']} (the base model draws the watermark there)")
        else:
            log("watermark row: no seed of 12 shows the toy model's watermark; the grid has no watermark row")
    prompts = [r["prompt"] for r in rows]
    seeds = [r.get("seed", seed) for r in rows]
    full = EraserStack()
    for e in erasers:
        full = full.with_eraser(e)
    rules = {e.name: x.gate.rule for e, x in zip(erasers, full.entries)}
    enc = DiffusersTextEncoder(pipe.tokenizer, pipe.text_encoder)
    gates = _raw_gates(full, enc, prompts)          # [rows, erasers]
    t_gates = time.time() - t0 - t_load - t_erasers
    names = column_labels(erasers)
    number = {n: j + 1 for j, n in enumerate(names)}

    def judged(images):
        p = classify(judges, images)
        return [{k: JUDGE_HEADS[k][int(p[k][i])] for k in ("object", "style", "colour", "watermark")}
                for i in range(len(images))]

    t1 = time.time()
    per_column = steps * -(-len(prompts) // 64)    # denoising steps per column (batches of 64)
    plan = [("no erasure", None, [])] + [(f"#{j + 1} {names[j]}", EraserStack().with_eraser(e), [j])
                                          for j, e in enumerate(erasers)]
    shown = bar(per_column * (len(plan) + (len(erasers) > 1)), "demo images", unit="step")
    columns = []
    runnable = EraserStack()
    try:
        for title, st, idx in plan:
            t2 = time.time()
            shown.set_postfix_str(title, refresh=False)
            col = {"title": title, "erasers": [names[j] for j in idx],
                   "legend": column_legend(erasers[idx[0]], rules[erasers[idx[0]].name]) if idx
                   else ["the toy model as is"]}
            try:
                imgs, _ = generate_with_stack(pipe, prompts, seeds, st, steps=steps, cfg=cfg, batch=64,
                                              progress=shown.update)
                if st is not None:
                    runnable = runnable.with_eraser(st.entries[0].eraser)
            except UnsupportedEraser as err:
                imgs, col["why"] = None, f"{erasers[idx[0]].kind} eraser: {err}"
                shown.total -= per_column
                log(f"{title}: not runnable here ({err})")
            col["images"] = imgs
            col["seconds"] = time.time() - t2
            columns.append(col)
            if shown.disable:  # no terminal: one line per column instead of the bar
                log(f"column {len(columns)}/{len(plan) + (len(erasers) > 1)} {title}: {col['seconds']:.1f} s")
        if len(runnable) > 1:
            t2 = time.time()
            shown.set_postfix_str("whole stack", refresh=False)
            imgs, _ = generate_with_stack(pipe, prompts, seeds, runnable, steps=steps, cfg=cfg, batch=64,
                                          progress=shown.update)
            members = [names[next(j for j, e in enumerate(erasers) if e is x.eraser)] for x in runnable.entries]
            columns.append({"title": "whole stack", "erasers": members, "images": imgs, "seconds": time.time() - t2,
                            "legend": [f"{' '.join('#' + str(number[n]) for n in members)}", "all at once"]})
            if shown.disable:
                log(f"column {len(columns)}/{len(columns)} whole stack: {columns[-1]['seconds']:.1f} s")
        elif len(erasers) > 1:
            shown.total -= per_column
    finally:
        shown.close()
    t_images = time.time() - t1
    # judge every cell, score it against what its column should do, annotate, and summarise per column
    summary = {}
    by_name = dict(zip(names, erasers))
    for col in columns:
        if col["images"] is None:
            col["judged"] = col["notes"] = col["verdicts"] = col["scores"] = None
            continue
        col["judged"] = judged(col["images"])
        erases = {t.keyword for n in col["erasers"] for t in eraser_targets(by_name[n])}
        erases |= {"watermark" for n in col["erasers"] if erases_watermark(by_name[n])}
        col["notes"], col["verdicts"], col["scores"] = [], [], []
        for i, (r, jd) in enumerate(zip(rows, col["judged"])):
            g = [float(gates[i, names.index(n)]) for n in col["erasers"]]
            if not g:
                gate_txt = "no eraser"
            elif len(g) == 1:
                gate_txt = f"gate {_fmt_gate(g[0])}"
            else:
                fired = [f"#{number[n]}" + ("" if v >= 1 else f" ({_fmt_gate(v)})")
                         for n, v in zip(col["erasers"], g) if v > 0]
                gate_txt = "fired: " + (" ".join(fired) if fired else "none")
            expect, ok = score_cell(r, jd, erases, targets)
            col["notes"].append([gate_txt, f"{jd['object']}, {jd['style']}" + (", watermark" if jd["watermark"] == "present"
                                                                               else "")])
            col["verdicts"].append((verdict_text(expect, ok), ok))
            col["scores"].append({"expect": expect, "ok": bool(ok)})
        erased = [s["ok"] for s in col["scores"] if s["expect"] == "erased"]
        if not col["erasers"]:  # the base model: how often a target row already lacks its target
            erased = [not score_cell(r, jd, None, targets)[1] for r, jd in zip(rows, col["judged"])
                      if r["kind"] in ("target", "synonym")]
        kept = [s["ok"] for s in col["scores"] if s["expect"] == "kept"]
        unrelated = [s["ok"] for r, s in zip(rows, col["scores"]) if r["kind"] == "unrelated"]
        summary[col["title"]] = {
            "target_not_seen": float(np.mean(erased)) if erased else None,
            "others_kept": float(np.mean(kept)) if kept else None,
            "unrelated_kept": float(np.mean(unrelated)) if unrelated else None,
            "rows_erased": sum(s["expect"] == "erased" for s in col["scores"]), "rows_kept": len(kept),
            "watermark_seen": float(np.mean([jd["watermark"] == "present" for jd in col["judged"]])),
        }
    png = os.path.join(out_dir, "grid.png")
    draw_grid(png, rows, columns)
    manifest = None
    runnable_written = [e for e in runnable.entries if e.eraser.source]
    if runnable_written:
        manifest = os.path.join(out_dir, "stack.json")
        EraserStack(tuple(runnable_written)).to_manifest(manifest)
    total = time.time() - t0
    metrics = {
        "sampler": f"DDIM {steps} steps, CFG {cfg}", "seed": seed,
        "scoring": "every column on every row: the rows of its own targets (target and synonym) count as erased when "
                   "the judge no longer sees the target (and sees something); every other row counts as kept when "
                   "object and style are judged as prompted",
        "erasers": [{"name": n, "number": number[n], "eraser_name": e.name, "kind": e.kind, "method": e.method,
                     "concepts": list(e.concepts), "file": e.source, "guide": (e.settings or {}).get("guide"),
                     "alternative": (e.settings or {}).get("alternative"), "gate_rule": rules[e.name]}
                    for n, e in zip(names, erasers)],
        "skipped": skipped,
        "rows": [{**r, "gates": {n: float(gates[i, j]) for j, n in enumerate(names)}} for i, r in enumerate(rows)],
        "columns": [{"title": c["title"], "erasers": c["erasers"], "legend": c.get("legend", []), "judged": c["judged"],
                     "scores": c["scores"], "seconds": c["seconds"], **({"why": c["why"]} if c.get("why") else {})}
                    for c in columns],
        "summary": summary, "grid": png, "stack_manifest": manifest,
        "seconds": {"load": t_load, "erasers": t_erasers, "gates": t_gates, "images": t_images,
                    "judge_and_draw": total - t_load - t_erasers - t_gates - t_images, "total": total},
    }
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    log(format_table(metrics))
    sec = metrics["seconds"]
    log(f"\nwrote {png}, {os.path.join(out_dir, 'metrics.json')}" + (f", {manifest}" if manifest else ""))
    log(f"demo time: {sec['total']:.1f} s (model and judges {sec['load']:.1f} s, erasers {sec['erasers']:.1f} s, "
        f"gates {sec['gates']:.1f} s, images {sec['images']:.1f} s, judging and drawing {sec['judge_and_draw']:.1f} s)")
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
    lines.append(f"{'column':28s} {'its targets erased':>20s} {'every other row kept':>21s} {'(unrelated rows)':>17s}")

    def pct(v, n=None):
        return "–" if v is None else f"{100 * v:.0f}%" + (f" of {n}" if n is not None else "")

    for t, s in metrics["summary"].items():
        erased = pct(s["target_not_seen"], s.get("rows_erased") or None)
        if s.get("rows_erased") == 0 and s["target_not_seen"] is not None:
            erased = f"{pct(s['target_not_seen'])} (base)"  # no erasure: targets the base model already misses
        lines.append(f"{t[:28]:28s} {erased:>20s} {pct(s.get('others_kept'), s.get('rows_kept')):>21s} "
                     f"{pct(s['unrelated_kept']):>17s}")
    return "\n".join(lines)

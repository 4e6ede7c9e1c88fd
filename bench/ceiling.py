"""The base model's own ceiling for "the alternative drawn with the prompt's colour and style" (issue 17).

The headline scores every eraser that names an alternative (All-but-One's target, applied to UCE's guide
too) on *replacement+attrs*: of the images whose prompt names the erased concept, the share judged to show
the alternative **and** the prompt's other two attributes. No eraser can beat the base model at drawing
the alternative itself, and the toy model misses its own colour bar (79-88% against 90%), so the figure has
a ceiling that is the model's, not the eraser's. This bench measures it: the base model, the same prompts
with the erased concept's word (keyword or synonym) replaced by the alternative's keyword, the same seeds,
sampler and judges; the ceiling is the judged "all three" accuracy on those images.

The prompts are the release parts' own: each part's sets are rebuilt from its stored tier settings and
targets (:func:`~conceptgate.bench.prompts.build_prompt_sets` is deterministic) and checked against the
stored prompt and image counts before anything is generated. One measurement per (part's prompt sets,
target, alternative) serves every row that shares it. Results: ``benchmarks.json`` key
``replacement-ceiling`` and its BENCHMARKS.md section; ``bench headline`` shows them beside each
replacement figure (the target itself, >= 85%, is not changed by them).

Caveat: a rewritten prompt may pair the alternative with a style the toy model never saw it in (the toy
world holds out some object x style pairs); the eraser faces the same pair, so the ceiling still applies.
"""

from __future__ import annotations

import json
import os
import re
import time

import torch

from .prompts import KINDS, Target, build_prompt_sets, kind_names, resolve_concept
from .report import ROOT, table, write_section

KEY = "replacement-ceiling"
TITLE = "Replacement ceiling: the base model asked for the alternative directly"
COMMAND = "python -m conceptgate bench ceiling"


def rewrite_prompt(prompt: str, target: Target, alternative: int) -> str:
    """``prompt`` with the target's name (any of its names, longest first, whole words) replaced by the
    alternative's keyword. Raises ValueError when the prompt names none of them."""
    alt = kind_names(target.kind)[alternative][0]
    for name in sorted(kind_names(target.kind)[target.index], key=len, reverse=True):
        pattern = r"(?<![a-z\-])" + re.escape(name) + r"(?![a-z\-])"
        if re.search(pattern, prompt):
            return re.sub(pattern, alt, prompt)
    raise ValueError(f"the prompt {prompt!r} names no {target.keyword!r}")


def ceiling_prompt_sets(sets: dict, target: Target, alternative: int) -> dict:
    """The items of each set whose labels name ``target``, rewritten to ask for ``alternative`` (labels too)."""
    k = KINDS.index(target.kind)
    out = {}
    for name, items in sets.items():
        rows = []
        for prompt, lab in items:
            if lab[k] != target.index:
                continue
            new = list(lab)
            new[k] = alternative
            rows.append((rewrite_prompt(prompt, target, alternative), tuple(new)))
        if rows:
            out[name] = rows
    return out


def _stored_targets(section: dict) -> list[Target]:
    return [Target(t["concept"], t["kind"], t["index"]) for t in section["configs"][0]["result"]["targets"]]


def section_prompt_sets(key: str, section: dict) -> dict:
    """A release run's prompt sets, rebuilt from its stored tier settings and targets; SystemExit naming the
    section when the rebuilt sets do not have the stored prompt and target-image counts."""
    cfg = section["tier_settings"]
    base = section["configs"][0]["result"]
    sets = build_prompt_sets(cfg, _stored_targets(section), 0)
    n_seeds = int(cfg["seeds"])
    for name, m in base["sets"].items():
        if len(sets.get(name, ())) != m["n_prompts"]:
            raise SystemExit(f"bench ceiling: section {key!r}: set {name!r} rebuilt with {len(sets.get(name, ()))} "
                             f"prompts, the run had {m['n_prompts']} (prompt building changed since it ran)")
    for t, stored in zip(_stored_targets(section), base["targets"]):
        k = KINDS.index(t.kind) if t.kind in KINDS else None
        for name, m in stored["sets"].items():
            if k is None or "n_target_images" not in m:
                continue
            n = sum(lab[k] == t.index for _, lab in sets[name]) * n_seeds
            if n != m["n_target_images"]:
                raise SystemExit(f"bench ceiling: section {key!r}: {t.keyword} in {name!r} rebuilt with {n} target "
                                 f"images, the run had {m['n_target_images']}")
    return sets


def wanted(data: dict) -> list[dict]:
    """One entry per (release section, target, alternative) of the headline's current rows with a
    replacement figure: ``{section, target: Target, alternative: index, erasers: [names]}``."""
    from .headline import latest_rows, release_sections

    sections = dict(release_sections(data))
    shown = {(r["section"], r["eraser"]) for r in latest_rows(list(sections.items()))[0]}
    out: dict = {}
    for key, section in sections.items():
        for c in section["configs"][1:]:
            if (key, c["name"]) not in shown:
                continue
            for t in c["result"]["targets"]:
                alt_name = next((m.get("alternative") for m in t["sets"].values()
                                 if "replacement_with_attributes" in m), None)
                if not t.get("erasers") or alt_name is None or t["kind"] not in KINDS:
                    continue
                alt = resolve_concept(alt_name)
                e = out.setdefault((key, t["kind"], t["index"], alt.index),
                                   {"section": key, "target": Target(t["concept"], t["kind"], t["index"]),
                                    "alternative": alt.index, "erasers": []})
                e["erasers"].append(c["name"])
    return list(out.values())


def measure(pipe, judges, sets: dict, cfg: dict, log=None) -> dict:
    """The base model on rewritten sets: per set the judged object / style / colour / all-three accuracy."""
    from .quality import evaluate_stack

    r = evaluate_stack(pipe, judges, None, targets=[], tier=cfg, prompt_sets=sets, log=log)
    keep = ("object", "style", "colour", "all_three", "garbage_rate", "n_images", "n_prompts", "seconds")
    return {name: {k: m[k] for k in keep} for name, m in r["sets"].items()}


def lookup(data: dict) -> dict:
    """``{(section, target keyword, alternative keyword): {set: all_three stat}}`` from a stored run."""
    out = {}
    for e in (data.get(KEY) or {}).get("pairs", ()):
        out[(e["section"], e["target"], e["alternative"])] = {s: m["all_three"] for s, m in e["sets"].items()}
    return out


def render(result: dict, data: dict) -> str:
    from .headline import SETS, _iv

    rows = []
    for e in result["pairs"]:
        sec = data.get(e["section"], {})
        measured = {}
        for c in sec.get("configs", ())[1:]:
            if c["name"] in e["erasers"]:
                t = next(t for t in c["result"]["targets"] if t["keyword"] == e["target"])
                measured[c["name"]] = t["sets"]
        for name, sets in measured.items():
            rows.append({"eraser": name, "pair": f"{e['target']} -> {e['alternative']}", "section": e["section"],
                         **{f"c_{s}": _iv(e["sets"].get(s, {}).get("all_three")) for s in SETS},
                         **{f"m_{s}": _iv(sets.get(s, {}).get("replacement_with_attributes")) for s in SETS},
                         "images": "/".join(str(e["sets"][s]["n_images"]) for s in SETS if s in e["sets"])})
    rt = result["runtime"]
    return "\n".join([
        "The base model asked for the alternative directly: the release part's prompts that name the erased "
        "concept, with its word (keyword or synonym) replaced by the alternative's keyword, the same seeds, "
        "sampler (DDIM 25, CFG 5) and judges; 'ceiling' = judged alternative + prompt's style + colour "
        "(all three). Next to it, the eraser's own replacement+attrs from the part's section (its images of the "
        "original prompts). An eraser can exceed the ceiling only by chance (the images differ); the toy "
        "model's colour accuracy (79-88%, bar 90%) caps both.",
        "",
        table(rows, [("eraser", "eraser"), ("pair", "concept -> alternative"), ("images", "images k/s/h"),
                     ("c_keyword", "ceiling keyword"), ("c_synonym", "ceiling synonym"),
                     ("c_heldout", "ceiling held-out"), ("m_keyword", "eraser keyword"),
                     ("m_synonym", "eraser synonym"), ("m_heldout", "eraser held-out"), ("section", "prompts of")]),
        f"{rt['images']} images, {rt['seconds']:.0f} s ({rt['seconds_per_image']:.2f} s per image), "
        f"load average {rt['load_average_start']:.1f} at the start, {rt['load_average_end']:.1f} at the end.",
    ])


def run_ceiling(args) -> int:
    from ..toyworld import load_judges, load_pipeline
    from .headline import write_headline

    t0 = time.time()
    json_path = args.json or os.path.join(ROOT, "benchmarks.json")
    with open(json_path) as f:
        data = json.load(f)
    if getattr(args, "threads", None):
        torch.set_num_threads(int(args.threads))
    todo = wanted(data)
    if not todo:
        raise SystemExit(f"bench ceiling: no release-tier row with a replacement figure in {json_path}")
    load_start = os.getloadavg()[0]
    torch.manual_seed(0)
    pipe, judges = load_pipeline(), load_judges()
    pairs, n_img = [], 0
    for e in todo:
        section = data[e["section"]]
        t, alt = e["target"], e["alternative"]
        sets = ceiling_prompt_sets(section_prompt_sets(e["section"], section), t, alt)
        print(f"== {e['section']}: {t.keyword} -> {kind_names(t.kind)[alt][0]} ({', '.join(e['erasers'])})")
        m = measure(pipe, judges, sets, section["tier_settings"], log=print)
        n_img += sum(v["n_images"] for v in m.values())
        pairs.append({"section": e["section"], "target": t.keyword, "alternative": kind_names(t.kind)[alt][0],
                      "erasers": e["erasers"], "sets": m})
    dt = time.time() - t0
    gen = sum(v["seconds"] for p in pairs for v in p["sets"].values())
    result = {"pairs": pairs, "runtime": {"images": n_img, "seconds": dt, "seconds_per_image": gen / max(n_img, 1),
                                          "torch_threads": torch.get_num_threads(), "load_average_start": load_start,
                                          "load_average_end": os.getloadavg()[0]}}
    body = render(result, data)
    write_section(KEY, TITLE, body, COMMAND, data=result, json_path=json_path)
    write_headline(json_path)
    print(body)
    return 0


def add_cli(sub):
    from ..cli.bench import HELP

    s = sub.add_parser("ceiling", help=HELP["ceiling"])
    s.add_argument("--json", default=None, help="the release runs' figures, and where the ceiling goes "
                   "(default: benchmarks.json)")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    s.set_defaults(func=run_ceiling)
    return s

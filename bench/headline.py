"""BENCHMARKS.md's headline (issue 17): every eraser of the release-tier quality runs against the erasure
targets, from the stored figures (``benchmarks.json``; no generation).

``python -m conceptgate bench headline`` re-renders it; ``bench quality --tier release`` (and its
``--targets`` parts) re-render it after writing their own section. The Geom watermark row comes from
``bench geom``'s section (the watermark is an implicit concept: its target is a rate reduction).

Targets (issue 17, toy world, each eraser with its default gate):

* UA >= 95% on keyword, synonym and held-out prompts;
* IRA and CRA within 3 points of the base model's, in the same run;
* garbage no higher than the base model's + 3 points;
* All-but-One (an eraser that names an alternative): replacement with the prompt's colour and style
  >= 85% on keyword and held-out prompts;
* Geom: watermark rate down >= 70%, object / style / colour within 2 points of base.
"""

from __future__ import annotations

import json
import os

from .report import ROOT, table, write_section

KEY = "headline"
TITLE = "Headline: the erasers against the targets (release tier)"
COMMAND = "python -m conceptgate bench headline"
SETS = ("keyword", "synonym", "heldout")
UA_BAR, DRIFT, GARBAGE, REPLACEMENT, GEOM_REDUCTION, GEOM_DRIFT = 0.95, 0.03, 0.03, 0.85, 0.70, 0.02


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.0f}"


def _iv(s: dict | None) -> str:
    if not s or s.get("value") is None:
        return "–"
    return f"{100 * s['value']:.0f} [{100 * s['lo']:.0f}, {100 * s['hi']:.0f}]" if "lo" in s else _pct(s["value"])


def release_sections(data: dict) -> list[tuple[str, dict]]:
    """The release tier's run and its named parts, in file order."""
    return [(k, v) for k, v in data.items() if (k == "quality-release" or k.startswith("quality-release-"))
            and isinstance(v, dict) and v.get("configs")]


def eraser_rows(key: str, section: dict) -> list[dict]:
    """One row per (eraser config, its own target): figures and the misses against the targets."""
    configs = section["configs"]
    base = {t["concept"]: t for t in configs[0]["result"]["targets"]}
    rows = []
    for c in configs[1:]:
        for t in c["result"]["targets"]:
            if not t.get("erasers") or t["concept"] not in base:
                continue  # each eraser on its own targets
            b = base[t["concept"]]["sets"]
            misses, ua, worst = [], [], {"ira": 0.0, "cra": 0.0, "garbage": 0.0}
            rep = {}
            for s in SETS:
                m, mb = t["sets"].get(s), b.get(s)
                if m is None or mb is None:
                    continue
                u = m["ua"]["value"]
                ua.append(m["ua"])
                if u < UA_BAR:
                    misses.append(f"UA {s} {100 * u:.0f}")
                for k in ("ira", "cra"):
                    d = m[k]["value"] - mb[k]["value"]
                    worst[k] = d if abs(d) > abs(worst[k]) else worst[k]
                    if abs(d) > DRIFT + 1e-9:
                        misses.append(f"{k.upper()} {s} {100 * d:+.1f}")
                g = m["garbage_rate"]["value"] - mb["garbage_rate"]["value"]
                worst["garbage"] = max(worst["garbage"], g)
                if g > GARBAGE + 1e-9:
                    misses.append(f"garbage {s} {100 * g:+.1f}")
                if "replacement_with_attributes" in m:
                    rep[s] = m["replacement_with_attributes"]
                    if s in ("keyword", "heldout") and rep[s]["value"] < REPLACEMENT:
                        misses.append(f"replacement+attrs {s} {100 * rep[s]['value']:.0f}")
            rows.append({"eraser": c["name"], "target": f"{t['keyword']} ({t['kind']})", "section": key,
                         "ua": " / ".join(_iv(x) for x in ua),
                         "ira": f"{100 * worst['ira']:+.0f}", "cra": f"{100 * worst['cra']:+.0f}",
                         "garbage": f"{100 * worst['garbage']:+.0f}",
                         "replacement": " / ".join(_iv(rep.get(s)) for s in ("keyword", "heldout")) if rep else "–",
                         "images": "/".join(str(t["sets"][s]["n_target_images"]) for s in SETS if s in t["sets"]),
                         "status": "met" if not misses else "**missed**: " + ", ".join(misses)})
    return rows


def geom_rows(geom: dict | None) -> list[dict]:
    if not geom or not geom.get("rows"):
        return []
    base = geom["rows"][0]["metrics"]
    out = []
    for r in geom["rows"][1:]:
        if r["name"] != "geom_watermark":
            continue  # the shipped file; the ablations stay in their section
        m, misses = r["metrics"], []
        red = r.get("wm_reduction")
        if red is None or red < GEOM_REDUCTION:
            misses.append(f"watermark reduction {_pct(red)}%")
        for k in ("object", "style", "colour"):
            d = m[k]["value"] - base[k]["value"]
            if abs(d) > GEOM_DRIFT + 1e-9:
                misses.append(f"{k} {100 * d:+.1f}")
        out.append({"eraser": r["name"], "target": "watermark (implicit)", "section": "geom",
                    "ua": f"watermark rate {_iv(base['watermark_rate'])} -> {_iv(m['watermark_rate'])} "
                          f"(-{_pct(red)}%)",
                    "ira": "–", "cra": "–", "garbage": f"{100 * (m['garbage_rate']['value'] - base['garbage_rate']['value']):+.0f}",
                    "replacement": "–", "images": str(m["n_images"]),
                    "status": "met" if not misses else "**missed**: " + ", ".join(misses)})
    return out


def render(data: dict) -> str:
    rows = []
    for key, section in release_sections(data):
        rows += eraser_rows(key, section)
    rows += geom_rows(data.get("geom"))
    met = sum(r["status"] == "met" for r in rows)
    lines = [
        "Every eraser of the release-tier quality runs (>= 32 target images per prompt set) on its own target, "
        "with its default gate, against issue 17's targets: UA >= 95% on keyword / synonym / held-out prompts "
        "(95% intervals in brackets); IRA and CRA within 3 points of the base model in the same run (worst "
        "change over the three sets); garbage at most base + 3 points (worst change); for erasers that name an "
        "alternative, the alternative drawn with the prompt's colour and style >= 85% on keyword / held-out "
        "prompts; Geom (its own benchmark): watermark rate down >= 70%, object/style/colour within 2 points.",
        "",
        table(rows, [("eraser", "eraser"), ("target", "target"), ("images", "target imgs k/s/h"),
                     ("ua", "UA keyword / synonym / held-out"), ("ira", "IRA Δ"), ("cra", "CRA Δ"),
                     ("garbage", "garbage Δ"), ("replacement", "replacement+attrs k / h"), ("section", "from"),
                     ("status", "status")]),
        f"**{met} of {len(rows)} rows meet every target.** The figures are copied from the sections named in "
        "'from' (each says when and how it was measured); a missed target is listed with its measured figure.",
    ]
    if not any(c.get("peer") for _, s in release_sections(data) for c in s["configs"]):
        lines.append("")
        lines.append("The peers (negative prompt, Safe Latent Diffusion, ESD-x) were not run at the release tier; "
                     "the quick tier's section `quality` compares them on the same prompts and seeds.")
    return "\n".join(lines)


def write_headline(json_path: str | None = None) -> str:
    json_path = json_path or os.path.join(ROOT, "benchmarks.json")
    with open(json_path) as f:
        data = json.load(f)
    body = render(data)
    write_section(KEY, TITLE, body, COMMAND, first=True)
    return body


def add_cli(sub):
    from ..cli.bench import HELP

    s = sub.add_parser("headline", help=HELP["headline"])
    s.add_argument("--json", default=None, help="the figures (default: benchmarks.json)")
    s.set_defaults(func=lambda args: print(write_headline(args.json)) or 0)
    return s

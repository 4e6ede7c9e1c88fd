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
* Geom: watermark rate down >= 70%, object / style / colour within 2 points of base, Fréchet not worse than
  the plain negative's; the shipped file and, beside it, the same file in regional negation at its default strength.
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


SHIPPED_DIR = os.path.join(ROOT, "toyworld", "erasers")


def is_shipped(name: str) -> bool:
    """A row of a file shipped in ``toyworld/erasers`` (the benchmark's on-the-fly edits are not files)."""
    return os.path.isfile(os.path.join(SHIPPED_DIR, f"{name}.safetensors"))


def eraser_rows(key: str, section: dict, ceilings: dict | None = None) -> list[dict]:
    """One row per (eraser config, its own target): figures and the misses against the targets.
    ``ceilings``: :func:`conceptgate.bench.ceiling.lookup` of a ``bench ceiling`` run (the base model asked
    for the alternative directly), shown beside the replacement figures; they do not change a verdict."""
    configs = section["configs"]
    base = {t["concept"]: t for t in configs[0]["result"]["targets"]}
    rows = []
    for c in configs[1:]:
        for t in c["result"]["targets"]:
            if not t.get("erasers") or t["concept"] not in base:
                continue  # each eraser on its own targets
            b = base[t["concept"]]["sets"]
            misses, ua, worst = [], [], {"ira": 0.0, "cra": 0.0, "garbage": 0.0}
            rep, alt = {}, None
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
                    rep[s], alt = m["replacement_with_attributes"], m.get("alternative")
            ceiling = (ceilings or {}).get((key, t["keyword"], alt)) if rep else None
            for s in ("keyword", "heldout"):
                if s in rep and rep[s]["value"] < REPLACEMENT:
                    top = (ceiling or {}).get(s)
                    misses.append(f"replacement+attrs {s} {100 * rep[s]['value']:.0f}"
                                  + (f" (base asked for the {alt}: {100 * top['value']:.0f})" if top else ""))
            rows.append({"eraser": c["name"], "target": f"{t['keyword']} ({t['kind']})", "section": key,
                         "ua": " / ".join(_iv(x) for x in ua),
                         "ira": f"{100 * worst['ira']:+.0f}", "cra": f"{100 * worst['cra']:+.0f}",
                         "garbage": f"{100 * worst['garbage']:+.0f}",
                         "replacement": " / ".join(_iv(rep.get(s)) for s in ("keyword", "heldout")) if rep else "–",
                         "ceiling": " / ".join(_iv(ceiling.get(s)) for s in ("keyword", "heldout")) if ceiling else "–",
                         "shipped": is_shipped(c["name"]),
                         "images": "/".join(str(t["sets"][s]["n_target_images"]) for s in SETS if s in t["sets"]),
                         "status": "met" if not misses else "**missed**: " + ", ".join(misses)})
    return rows


def geom_rows(geom: dict | None) -> list[dict]:
    if not geom or not geom.get("rows"):
        return []
    base = geom["rows"][0]["metrics"]
    plain = next((r["metrics"] for r in geom["rows"] if r["name"] == "plain"), None)
    from ..adapters.geom.regional import DEFAULT_REGIONAL_STRENGTH

    regional_name = f"geom_watermark_regional{DEFAULT_REGIONAL_STRENGTH:g}"
    out = []
    for r in geom["rows"][1:]:
        regional = r["name"] == regional_name
        if r["name"] != "geom_watermark" and not regional:
            continue  # the shipped file (paper's rule; regional negation at its default strength); the rest stays in its section
        m, misses = r["metrics"], []
        red = r.get("wm_reduction")
        if red is None or red < GEOM_REDUCTION:
            misses.append(f"watermark reduction {_pct(red)}%")
        for k in ("object", "style", "colour"):
            d = m[k]["value"] - base[k]["value"]
            if abs(d) > GEOM_DRIFT + 1e-9:
                misses.append(f"{k} {100 * d:+.1f}")
        if plain is not None and m.get("frechet") is not None and m["frechet"] > plain["frechet"]:
            misses.append(f"Fréchet {m['frechet']:.1f} > plain negative {plain['frechet']:.1f}")
        out.append({"eraser": r["name"], "target": "watermark (implicit)", "section": "geom", "shipped": True,
                    **({"label": f"`geom_watermark` in regional negation x{r['name'][len('geom_watermark_regional'):]} "
                                 "(ConceptGate's rule: diffusers and ComfyUI)", "shipped": False} if regional else {}),
                    "ua": f"watermark rate {_iv(base.get('watermark_rate_crossed', base['watermark_rate']))} -> "
                          f"{_iv(m.get('watermark_rate_crossed', m['watermark_rate']))} "
                          f"(-{_pct(red)}%)",
                    "ira": "–", "cra": "–", "garbage": f"{100 * (m['garbage_rate']['value'] - base['garbage_rate']['value']):+.0f}",
                    "replacement": "–", "ceiling": "–", "images": str(m["n_images"]),
                    "status": "met" if not misses else "**missed**: " + ", ".join(misses)})
    return out


def latest_rows(sections: list[tuple[str, dict]], ceilings: dict | None = None) -> tuple[list[dict], list[str]]:
    """Every section's rows, where one eraser on one target was measured in several release runs only the
    most recent (a part re-run after a file was retrained); and the superseded measurements, named."""
    rows, when = {}, {}
    superseded = []
    for key, section in sections:
        for r in eraser_rows(key, section, ceilings):
            k = (r["eraser"], r["target"])
            m = section.get("measured") or ""
            if k in rows:
                older, newer = (rows[k], r) if m >= when[k] else (r, rows[k])
                superseded.append(f"{older['eraser']} on {older['target']} in `{older['section']}` "
                                  f"(replaced by `{newer['section']}`)")
                if newer is rows[k]:
                    continue
            rows[k], when[k] = r, m
    return list(rows.values()), superseded


def verdict_rows(sections: list[tuple[str, dict]]) -> list[dict]:
    """Per target with peers in a release run: ConceptGate's best row against the best peer row."""
    from .peers import peer_verdicts

    out = []
    for key, section in sections:
        configs = section["configs"]
        if not any(c.get("peer") for c in configs):
            continue
        for v in section.get("peer_verdicts") or peer_verdicts(configs):
            best, top = v.get("best") or {}, v.get("best_peer") or {}
            out.append({"target": v["target"], "section": key, "base": _pct(v.get("base")),
                        "best": f"{best.get('name', '–')} {_pct(best.get('score'))}" if best else "–",
                        "peer": f"{top.get('name', '–')} {_pct(top.get('score'))}" if top else "–",
                        "peers": str(len(v.get("peers") or ())),
                        "status": "met" if v.get("ahead") else "**missed**" + (
                            f": not behind: {', '.join(v.get('peers_not_behind') or ())}" if v.get("ahead") is False else
                            ": no ConceptGate row")})
    return out


def unpaired_rows(sections: list[tuple[str, dict]], verdicts: list[dict]) -> list[str]:
    """ConceptGate erasers measured at the release tier in a part without peers whose targets are those of a
    part with peers (a file added later, ``--part``): the same targets give the same prompt sets and seeds, so
    their score is comparable with that run's peers; named as such, not counted as a verdict."""
    from .peers import claims, is_conceptgate, mean_score

    def targets_of(section):
        return section.get("part_targets") or section.get("part")

    with_peers = {targets_of(sec): key for key, sec in sections
                  if targets_of(sec) and any(c.get("peer") for c in sec["configs"])}
    out = []
    for key, section in sections:
        configs = section["configs"]
        peer_key = with_peers.get(targets_of(section))
        if peer_key is None or peer_key == key:
            continue
        for v in (v for v in verdicts if v["section"] == peer_key):
            for i, c in enumerate(configs):
                if is_conceptgate(c, i) and claims(c, v["target"]):
                    base = mean_score(configs[0]["result"], v["target"])[0]
                    out.append(f"{c['name']} on {v['target']} scores {_pct(mean_score(c['result'], v['target'])[0])} "
                               f"in `{key}` (base {_pct(base)} in that run; in `{peer_key}` base {v['base']}, best "
                               f"peer {v['peer']})")
    return out


def render(data: dict) -> str:
    from .ceiling import KEY as CEILING_KEY, lookup

    sections = release_sections(data)
    ceilings = lookup(data)
    rows, superseded = latest_rows(sections, ceilings)
    rows += geom_rows(data.get("geom"))
    verdicts = verdict_rows(sections)
    met = sum(r["status"] == "met" for r in rows)
    shipped = [r for r in rows if r["shipped"]]
    for r in rows:
        r["eraser"] = r.get("label") or (f"`{r['eraser']}`" if r["shipped"] else f"{r['eraser']}, on the fly")
    lines = [
        "Every eraser of the release-tier quality runs (>= 32 target images per prompt set) on its own target, "
        "with its default gate, against issue 17's targets: UA >= 95% on keyword / synonym / held-out prompts "
        "(95% intervals in brackets); IRA and CRA within 3 points of the base model in the same run (worst "
        "change over the three sets); garbage at most base + 3 points (worst change); for erasers that name an "
        "alternative, the alternative drawn with the prompt's colour and style >= 85% on keyword / held-out "
        "prompts; Geom (its own benchmark): watermark rate down >= 70%, object/style/colour within 2 points, "
        "Fréchet not worse than the plain negative's.",
        "",
        table(rows, [("eraser", "eraser"), ("target", "target"), ("images", "target imgs k/s/h"),
                     ("ua", "UA keyword / synonym / held-out"), ("ira", "IRA Δ"), ("cra", "CRA Δ"),
                     ("garbage", "garbage Δ"), ("replacement", "replacement+attrs k / h"),
                     ("ceiling", "base asked for the alternative k / h"), ("section", "from"), ("status", "status")]),
        f"**{met} of {len(rows)} rows meet every target; of the shipped files (`toyworld/erasers`, in code "
        f"font), {sum(r['status'] == 'met' for r in shipped)} of {len(shipped)}.** The rows marked 'on the fly' "
        "are the benchmark's own UCE / RECE edits, made with the papers' recipes (bare word, generic guide) or "
        "in ConceptGate's in-context form at the start of the run; no file ships them. "
        + ("A 'regional negation' row is the shipped Geom file sampled with ConceptGate's rule instead of the "
           "paper's negative prompt, at its default strength (not counted as a shipped file: the file's own rule "
           "is the paper's; `geom-negation` writes a regional copy). "
           if any(r.get("label") for r in rows) else "")
        + "The figures are copied "
        "from the sections named in 'from' (each says when and how it was measured); a missed target is listed "
        "with its measured figure.",
    ]
    if ceilings:
        lines += ["", "'base asked for the alternative': the base model on the same prompts with the erased "
                  "concept's word replaced by the alternative's, same seeds and judges (section "
                  f"`{CEILING_KEY}`, `python -m conceptgate bench ceiling`): the toy model's own rate of drawing "
                  "the alternative with the prompt's colour and style, which caps replacement+attrs; the target "
                  "(>= 85%) is applied unchanged."]
    if superseded:
        lines += ["", "Measured again in a later release run, so left out above: " + "; ".join(superseded) + "."]
    if verdicts:
        ahead = sum(v["status"] == "met" for v in verdicts)
        lines += ["", "**Against the peers** (same run, prompts, seeds and judges; score = mean over the prompt sets of "
                  "(UA + IRA + CRA) / 3; target: ConceptGate's best eraser ahead of every peer row):", "",
                  table(verdicts, [("target", "target"), ("base", "base model"), ("best", "best ConceptGate row"),
                                   ("peer", "best peer row"), ("peers", "peer rows"), ("section", "from"),
                                   ("status", "status")]),
                  f"ConceptGate ahead on {ahead} of {len(verdicts)} targets with peers at the release tier."]
        unpaired = unpaired_rows(sections, verdicts)
        if unpaired:
            lines += ["", "Measured at the release tier without peers in the same run (same prompts, seeds and "
                      "judges as the peer run, so comparable, but not counted above): " + "; ".join(unpaired) + "."]
    peer_targets = {v["target"] for v in verdicts}
    without = sorted({r["target"].split(" (")[0] for r in rows if r["section"] != "geom"} - peer_targets)
    if without:
        lines += ["", "The peers (negative prompt, Safe Latent Diffusion, ESD-x) were not run at the release tier for "
                  + ", ".join(without) + "; the quick tier's section `quality` compares them on the same prompts "
                  "and seeds."]
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

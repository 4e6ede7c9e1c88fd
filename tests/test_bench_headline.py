"""BENCHMARKS.md's headline (bench/headline.py): each release-tier eraser row against issue 17's targets, from the
stored figures; the section is placed first and says it is rendered, not measured. Also the named parts of a tier
(`bench quality --targets`): their section keys and titles."""

import json

import pytest

from conceptgate.bench import headline as H
from conceptgate.bench import quality as Q


def _s(v, n=40):
    return {"value": v, "lo": max(v - 0.05, 0.0), "hi": min(v + 0.05, 1.0), "n": n}


def _sets(ua, garbage=0.0, ira=0.95, cra=0.9, rep=None):
    out = {}
    for s in H.SETS:
        m = {"ua": _s(ua), "garbage_rate": _s(garbage), "ira": _s(ira), "cra": _s(cra), "n_target_images": 40}
        if rep is not None:
            m["replacement_accuracy"] = _s(rep)
            m["replacement_with_attributes"] = _s(rep)
            m["alternative"] = "square"
        out[s] = m
    return out


def _target(sets, erasers=()):
    return {"concept": "triangle", "keyword": "triangle", "kind": "object", "erasers": list(erasers), "sets": sets}


def _section(rows):
    configs = [{"name": "base", "result": {"targets": [_target(_sets(0.0, garbage=0.02))]}}]
    for name, sets in rows:
        configs.append({"name": name, "result": {"targets": [_target(sets, [name])]}})
    return {"tier": "release", "configs": configs}


def test_rows_meet_or_name_each_missed_target():
    data = {"quality-release": _section([
        ("good", _sets(0.97, garbage=0.03)),
        ("weak", _sets(0.92, garbage=0.08, ira=0.9)),
        ("abo", _sets(1.0, rep=0.80)),
    ])}
    rows = {r["eraser"]: r for r in H.eraser_rows("quality-release", data["quality-release"])}
    assert rows["good"]["status"] == "met"
    weak = rows["weak"]["status"]
    assert weak.startswith("**missed**") and "UA keyword 92" in weak and "garbage synonym +6.0" in weak
    assert "IRA heldout -5.0" in weak
    assert "replacement+attrs keyword 80" in rows["abo"]["status"] and "synonym 80" not in rows["abo"]["status"]
    text = H.render(data)
    assert "**1 of 3 rows meet every target; of the shipped files" in text and "0 of 0.**" in text
    assert "| weak, on the fly |" in text and "were not run at the release tier" in text
    assert "base asked for the alternative'" not in text  # no ceiling measured: no note


def test_shipped_files_are_counted_apart_from_the_benchmarks_own_edits():
    data = {"quality-release": _section([("spm_triangle", _sets(0.97)), ("uce-triangle", _sets(0.6))])}
    rows = {r["eraser"]: r for r in H.eraser_rows("quality-release", data["quality-release"])}
    assert rows["spm_triangle"]["shipped"] and not rows["uce-triangle"]["shipped"]  # a file in toyworld/erasers
    text = H.render(data)
    assert "**1 of 2 rows meet every target; of the shipped files (`toyworld/erasers`, in code font), 1 of 1.**" in text
    assert "| `spm_triangle` |" in text and "| uce-triangle, on the fly |" in text


def test_the_base_models_ceiling_is_shown_beside_the_replacement_figures():
    data = {"quality-release": _section([("abo", _sets(1.0, rep=0.80))])}
    ceilings = {("quality-release", "triangle", "square"): {"keyword": _s(0.84), "heldout": _s(0.78)}}
    row = H.eraser_rows("quality-release", data["quality-release"], ceilings)[0]
    assert row["ceiling"] == "84 [79, 89] / 78 [73, 83]"
    assert "replacement+attrs keyword 80 (base asked for the square: 84)" in row["status"]  # still a miss
    assert "replacement+attrs heldout 80 (base asked for the square: 78)" in row["status"]
    assert H.eraser_rows("quality-release", data["quality-release"])[0]["ceiling"] == "–"
    data["replacement-ceiling"] = {"pairs": [{"section": "quality-release", "target": "triangle", "alternative": "square",
                                              "sets": {"keyword": {"all_three": _s(0.84)}}}]}
    text = H.render(data)
    assert "base asked for the alternative'" in text and "| 84 [79, 89] / – |" in text


def test_a_later_release_run_supersedes_an_eraser_measured_before():
    old = _section([("spm", _sets(0.92)), ("abo", _sets(1.0))]) | {"measured": "2026-12-01 18:58 UTC"}
    new = _section([("spm", _sets(0.97))]) | {"measured": "2026-12-02 05:30 UTC"}
    rows, superseded = H.latest_rows([("quality-release", old), ("quality-release-triangle", new)])
    by = {r["eraser"]: r for r in rows}
    assert by["spm"]["section"] == "quality-release-triangle" and by["spm"]["status"] == "met"
    assert by["abo"]["section"] == "quality-release" and len(rows) == 2
    assert superseded == ["spm on triangle (object) in `quality-release` (replaced by `quality-release-triangle`)"]
    rows, _ = H.latest_rows([("quality-release-triangle", new), ("quality-release", old)])  # file order does not matter
    assert {r["eraser"]: r["section"] for r in rows}["spm"] == "quality-release-triangle"
    assert "Measured again in a later release run" in H.render({"quality-release": old, "quality-release-triangle": new})


def test_peer_verdicts_of_a_release_run_join_the_headline():
    section = _section([("spm", _sets(0.97))])
    peer = {"name": "neg-triangle", "peer": {"target": "triangle", "kind": "object", "method": "negative"},
            "result": {"targets": [_target(_sets(0.3))]}}
    section["configs"].append(peer)
    section["peer_verdicts"] = [{"target": "triangle", "kind": "object", "base": 0.6, "best": {"name": "spm", "score": 0.94},
                                 "best_peer": {"name": "neg-triangle", "score": 0.72}, "ahead": True,
                                 "peers": [{"name": "neg-triangle", "score": 0.72}], "peers_not_behind": []}]
    rows = H.verdict_rows([("quality-release-triangle", section)])
    assert rows == [{"target": "triangle", "section": "quality-release-triangle", "base": "60", "best": "spm 94",
                     "peer": "neg-triangle 72", "peers": "1", "status": "met"}]
    text = H.render({"quality-release-triangle": section})
    assert "ConceptGate ahead on 1 of 1 targets" in text and "were not run at the release tier" not in text
    # a file added later, measured in a part without peers: named with its score, not counted as a verdict
    section["part"] = "triangle"
    later = _section([("uce", _sets(1.0))])
    later.update(part="triangle-uce", part_targets="triangle")
    for c, v in zip(later["configs"], (0.61, 0.99)):
        for m in c["result"]["targets"][0]["sets"].values():
            m["mean"] = _s(v)
    text = H.render({"quality-release-triangle": section, "quality-release-triangle-uce": later})
    assert "ConceptGate ahead on 1 of 1 targets" in text
    assert ("without peers in the same run" in text and "uce on triangle scores 99 in `quality-release-triangle-uce` "
            "(base 61 in that run; in `quality-release-triangle` base 60, best peer neg-triangle 72)" in text)
    verdicts = H.verdict_rows([("quality-release-triangle", section)])
    assert H.unpaired_rows([("quality-release-triangle", section)], verdicts) == []
    other = _section([("uce", _sets(1.0))])  # another part's targets: other prompt sets, not comparable
    other.update(part="triangle-striped")
    assert H.unpaired_rows([("quality-release-triangle", section), ("quality-release-triangle-striped", other)],
                           verdicts) == []
    section["peer_verdicts"][0].update(ahead=False, peers_not_behind=["neg-triangle"])
    assert H.verdict_rows([("x", section)])[0]["status"] == "**missed**: not behind: neg-triangle"


def test_geom_row_from_its_own_section():
    def metrics(wm, colour):
        return {k: _s(v, 128) for k, v in dict(object=0.9, style=0.97, colour=colour, garbage_rate=0.02,
                                                  watermark_rate=wm).items()} | {"n_images": 128}

    geom = {"rows": [{"name": "base", "metrics": metrics(0.34, 0.84)},
                     {"name": "geom_watermark", "metrics": metrics(0.08, 0.83), "wm_reduction": 0.76},
                     {"name": "geom_watermark_alpha1", "metrics": metrics(0.3, 0.8), "wm_reduction": 0.1}]}
    rows = H.geom_rows(geom)
    assert [r["eraser"] for r in rows] == ["geom_watermark"] and rows[0]["status"] == "met"
    geom["rows"][1]["wm_reduction"] = 0.41
    assert "watermark reduction 41%" in H.geom_rows(geom)[0]["status"]
    # the shipped file in regional negation: its own row, labelled, not counted as a shipped file
    geom["rows"].append({"name": "geom_watermark_regional2", "metrics": metrics(0.1, 0.83), "wm_reduction": 0.71})
    geom["rows"].append({"name": "geom_watermark_regional2.5", "metrics": metrics(0.1, 0.83), "wm_reduction": 0.75})
    rows = H.geom_rows(geom)  # the default strength only (2); other strengths stay in the geom section
    assert [r["shipped"] for r in rows] == [True, False] and rows[1]["status"] == "met"
    text = H.render({"geom": geom})
    assert "| `geom_watermark` in regional negation x2 (ConceptGate's rule: diffusers and ComfyUI) |" in text
    assert "A 'regional negation' row is the shipped Geom file" in text and "of the shipped files" in text
    assert "A 'regional negation' row" not in H.render({"geom": {"rows": geom["rows"][:2]}})
    # Fréchet against the plain negative's, as the geom section reads the target
    for r, fd in zip(geom["rows"], (200.0, 190.0)):  # base, geom_watermark
        r["metrics"]["frechet"] = fd
    geom["rows"].insert(1, {"name": "plain", "metrics": metrics(0.33, 0.84) | {"frechet": 185.0}})
    assert H.geom_rows(geom)[0]["status"].endswith("Fréchet 190.0 > plain negative 185.0")


def test_headline_goes_first_and_parts_have_their_own_keys(tmp_path, monkeypatch):
    md, js = tmp_path / "BENCHMARKS.md", tmp_path / "b.json"
    md.write_text("# ConceptGate benchmarks\n\nintro\n\n<!-- bench:quality:start -->\n## Q\nx\n<!-- bench:quality:end -->\n")
    monkeypatch.setenv("CONCEPTGATE_BENCHMARKS", str(md))
    part = _section([("uce_star", _sets(0.97))])
    part["part"] = "star-circle"
    js.write_text(json.dumps({"quality-release-star-circle": part}))
    H.write_headline(str(js))
    text = md.read_text()
    assert text.index("<!-- bench:headline:start -->") < text.index("<!-- bench:quality:start -->")
    assert "Rendered " in text and "(no generation)" in text and "| `uce_star` |" in text
    H.write_headline(str(js))                                       # replaced in place, not added twice
    assert md.read_text().count("<!-- bench:headline:start -->") == 1
    assert Q.section_key("release", "star-circle") == "quality-release-star-circle"
    assert Q.section_title("release", "star-circle") == "Quality on the toy world (release tier, targets star, circle)"


def test_part_and_shipped_options():
    from conceptgate import cli

    a = cli.build_parser().parse_args(["bench", "quality", "--tier", "release", "--targets", "triangle", "--shipped",
                                       "uce_triangle", "--part", "triangle-uce"])
    assert Q.parse_shipped(a.shipped) == ["uce_triangle"] and Q.parse_part(a.part) == "triangle-uce"
    b = cli.build_parser().parse_args(["bench", "quality", "--shipped"])
    assert b.shipped == "all" and Q.parse_shipped(b.shipped) is None and Q.parse_shipped(None) is None
    with pytest.raises(SystemExit, match="not a section name"):
        Q.parse_part("Triangle UCE")
    assert Q.section_key("release", "triangle-uce") == "quality-release-triangle-uce"
    assert Q.section_title("release", "triangle-uce", "triangle") == \
        "Quality on the toy world (release tier, targets triangle; part triangle-uce)"
    assert Q.section_title("release", "star-circle", "star-circle") == \
        "Quality on the toy world (release tier, targets star, circle)"


def test_targets_option_names_the_part():
    targets, part = Q.parse_targets(" star, circle ")
    assert [(t.kind, t.index) for t in targets] == [("object", 3), ("object", 0)] and part == "star-circle"
    assert Q.parse_targets(None) == ([], None)
    with pytest.raises(SystemExit, match="'blorp' is not a toy concept"):
        Q.parse_targets("star,blorp")

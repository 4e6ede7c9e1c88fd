"""`bench ceiling` (bench/ceiling.py): the base model asked for an eraser's alternative directly, on the release
parts' own prompts (rebuilt from the stored runs and checked against their counts) and seeds."""

import copy
import json
import os

import pytest

from conceptgate.bench import ceiling as C
from conceptgate.bench.prompts import Target, resolve_concept
from conceptgate.bench.report import ROOT

TRIANGLE, SQUARE = resolve_concept("triangle"), resolve_concept("square").index


def _stored():
    with open(os.path.join(ROOT, "benchmarks.json")) as f:
        return json.load(f)


def test_rewrite_replaces_the_concepts_word_whichever_name_the_prompt_uses():
    assert C.rewrite_prompt("a red triangle in striped style", TRIANGLE, SQUARE) == "a red square in striped style"
    assert C.rewrite_prompt("green trigon, rendered checkered", TRIANGLE, SQUARE) == "green square, rendered checkered"
    cross = resolve_concept("cross")
    assert C.rewrite_prompt("a blue plus sign", cross, SQUARE) == "a blue square"   # the longest name first
    striped = resolve_concept("striped")
    flat = resolve_concept("flat")
    assert flat is not None and flat.kind == "style"
    assert "striped" not in C.rewrite_prompt("a red circle in striped style", striped, flat.index)
    with pytest.raises(ValueError, match="names no 'triangle'"):
        C.rewrite_prompt("a red circle", TRIANGLE, SQUARE)


def test_ceiling_sets_keep_the_targets_prompts_relabelled_to_the_alternative():
    sets = {"keyword": [("a red triangle in striped style", (2, 1, 0)), ("a red circle in striped style", (0, 1, 0))],
            "synonym": [("a red disc", (0, 1, 0))]}
    out = C.ceiling_prompt_sets(sets, TRIANGLE, SQUARE)
    assert out == {"keyword": [("a red square in striped style", (SQUARE, 1, 0))]}  # a set without the target: dropped


def test_every_stored_release_run_is_rebuilt_with_its_own_counts():
    data = _stored()
    from conceptgate.bench.headline import release_sections

    sections = release_sections(data)
    assert len(sections) >= 5
    for key, section in sections:
        sets = C.section_prompt_sets(key, section)
        assert {k: len(v) for k, v in sets.items()} == {
            k: m["n_prompts"] for k, m in section["configs"][0]["result"]["sets"].items()}
    key, section = sections[-1]
    bad = copy.deepcopy(section)
    bad["configs"][0]["result"]["targets"][0]["sets"]["keyword"]["n_target_images"] += 8
    with pytest.raises(SystemExit, match=f"section '{key}'.*target images"):
        C.section_prompt_sets(key, bad)
    bad = copy.deepcopy(section)
    bad["tier_settings"]["keyword"] += 1
    with pytest.raises(SystemExit, match="prompts, the run had"):
        C.section_prompt_sets(key, bad)


def test_wanted_are_the_headlines_rows_with_an_alternative():
    todo = C.wanted(_stored())
    got = {(e["section"], e["target"].keyword, e["alternative"]): sorted(e["erasers"]) for e in todo}
    assert got[("quality-release-circle", "circle", SQUARE)] == ["abo_circle_to_square",
                                                                 "abo_circle_to_square_in_prompt"]
    assert not any(k[0] == "quality-release-star-circle" for k in got)  # superseded by later parts: not shown
    assert all(isinstance(e["target"], Target) for e in todo)


def test_run_writes_its_section_and_the_headline_shows_it(tmp_path, monkeypatch):
    """End to end on a shrunken copy of a stored part (1 seed, 2 DDIM steps): real generation and judges."""
    data = _stored()
    key = "quality-release-triangle-uce"
    section = copy.deepcopy(data[key])
    section["tier_settings"].update(seeds=1, steps=2)
    for t in section["configs"][0]["result"]["targets"]:
        for m in t["sets"].values():
            m["n_target_images"] //= 8
    small = {key: section}
    js, md = tmp_path / "b.json", tmp_path / "BENCHMARKS.md"
    js.write_text(json.dumps(small))
    monkeypatch.setenv("CONCEPTGATE_BENCHMARKS", str(md))

    class Args:
        json, threads = str(js), None

    assert C.run_ceiling(Args()) == 0
    out = json.loads(js.read_text())
    pair, = out[C.KEY]["pairs"]
    assert (pair["section"], pair["target"], pair["alternative"], pair["erasers"]) == (key, "triangle", "heart",
                                                                                       ["uce_triangle"])
    assert {s: m["n_images"] for s, m in pair["sets"].items()} == {"keyword": 4, "synonym": 4, "heldout": 4}
    for m in pair["sets"].values():
        assert 0.0 <= m["all_three"]["lo"] <= m["all_three"]["value"] <= m["all_three"]["hi"] <= 1.0
    assert C.lookup(out)[(key, "triangle", "heart")]["heldout"] == pair["sets"]["heldout"]["all_three"]
    text = md.read_text()
    assert "<!-- bench:replacement-ceiling:start -->" in text and "| uce_triangle | triangle -> heart |" in text
    assert "base asked for the alternative k / h" in text and "base asked for the heart" in text

"""``python -m conceptgate demo`` end to end at a reduced size: grid PNG, metrics JSON, eraser files,
a stack manifest, UCE/RECE columns, and pick-up of shipped erasers (also broken ones)."""

import json
import os

import pytest

from conceptgate.bench import demo as D


@pytest.mark.slow
def test_demo_end_to_end_reduced(tmp_path, capsys):
    from conceptgate import toyworld as tw
    from conceptgate.adapters.files import save_eraser
    from conceptgate.bench.quality import make_edit_erasers

    # a "shipped" folder: one valid eraser (a UCE edit of 'star' saved as a file) and one broken file
    shipped = tmp_path / "erasers"
    shipped.mkdir()
    (star,) = make_edit_erasers(tw.load_pipeline(), [dict(method="uce", concept="star", guide="shape")])
    save_eraser(star, str(shipped / "uce-star.safetensors"))
    (shipped / "broken.safetensors").write_bytes(b"not a safetensors file")

    out = tmp_path / "demo"
    m = D.run_demo(out_dir=str(out), steps=3, n_unrelated=1, shipped_dir=str(shipped))
    assert (out / "grid.png").stat().st_size > 1000
    data = json.loads((out / "metrics.json").read_text())
    titles = [c["title"] for c in data["columns"]]
    assert titles == ["no erasure", "#1 uce-triangle", "#2 rece-striped", "#3 uce-star", "whole stack"]
    assert data["columns"][-1]["erasers"] == ["uce-triangle", "rece-striped", "uce-star"]
    assert data["columns"][1]["legend"] == ["UCE edit", "triangle -> shape", "gate rule: context"]
    assert data["columns"][-1]["legend"][0] == "#1 #2 #3"
    kinds = [r["kind"] for r in data["rows"]]
    assert kinds.count("target") == 3 and kinds.count("synonym") == 3 and kinds.count("unrelated") == 1
    for r in data["rows"]:
        assert set(r["gates"]) == {"uce-triangle", "rece-striped", "uce-star"}
        if r["kind"] == "target":
            assert r["gates"][{"triangle": "uce-triangle", "striped": "rece-striped", "star": "uce-star"}[r["target"]]] \
                == pytest.approx(1.0)
    for c in data["columns"]:  # every column scored on every row: its own targets erased, the rest kept
        assert len(c["judged"]) == len(c["scores"]) == len(data["rows"])
        mine = {"uce-triangle": {"triangle"}, "rece-striped": {"striped"}, "uce-star": {"star"}}
        erases = set().union(*(mine[n] for n in c["erasers"])) if c["erasers"] else set()
        for r, sc in zip(data["rows"], c["scores"]):
            assert sc["expect"] == ("erased" if r.get("target") in erases else "kept")
    s = data["summary"]["#2 rece-striped"]
    assert s["rows_erased"] == 2 and s["rows_kept"] == len(data["rows"]) - 2 and s["others_kept"] is not None
    assert os.path.exists(out / "uce-triangle.safetensors") and os.path.exists(out / "rece-striped.safetensors")
    man = json.loads((out / "stack.json").read_text())
    assert [e["name"] for e in man["entries"]][:2] == ["uce-triangle", "rece-striped"]
    assert set(data["summary"]) == set(titles) and m["grid"].endswith("grid.png")
    printed = capsys.readouterr().out
    assert "gate uce-triangle" in printed and "skipping" in printed and "broken.safetensors" in printed
    assert "demo time:" in printed and m["seconds"]["total"] > 0


def test_demo_rows_and_table():
    from conceptgate.bench.quality import resolve_concept

    rows = D.demo_rows([resolve_concept("triangle"), resolve_concept("striped")], n_unrelated=2)
    assert [r["kind"] for r in rows] == ["target", "target", "synonym", "synonym", "unrelated", "unrelated"]
    assert "triangle" in rows[0]["prompt"] and "trigon" in rows[2]["prompt"] and "zebra-lined" in rows[3]["prompt"]
    for r in rows[4:]:
        assert not any(w in r["prompt"] for w in ("triangle", "trigon", "striped", "zebra-lined"))
    assert D.load_shipped("/nonexistent/folder") == []


def test_scoring_every_column_on_every_row():
    from conceptgate.bench.quality import resolve_concept

    targets = [resolve_concept("triangle"), resolve_concept("striped")]
    rows = D.demo_rows(targets, n_unrelated=1)
    tri, stripes = rows[0], rows[1]
    seen = {"object": "triangle", "style": "dots", "colour": "red", "watermark": "absent"}
    assert D.score_cell(tri, seen, {"triangle"}, targets) == ("erased", False)       # still a triangle
    assert D.score_cell(tri, dict(seen, object="cross"), {"triangle"}, targets) == ("erased", True)
    assert D.score_cell(tri, dict(seen, object="none"), {"triangle"}, targets) == ("erased", False)  # garbage
    assert D.score_cell(tri, seen, {"striped"}, targets) == ("kept", True)            # another eraser's row
    ring = {"object": "circle", "style": "stripes", "colour": "blue", "watermark": "absent"}
    assert D.score_cell(stripes, ring, {"triangle"}, targets) == ("kept", False)      # a side effect counts
    assert D.score_cell(rows[-1], ring, {"triangle"}, targets)[0] == "kept"


def test_grid_fits_every_label(tmp_path):
    """Columns grow to their widest text: a long stack gate line is never cut off at the image edge."""
    import torch
    from PIL import Image

    rows = [{"kind": "target", "target": "triangle", "prompt": "a red triangle in polka-dot style"}]
    long = "fired: #1 #2 (0.52) #3 #4 #5 #6 #7 #8 #9 #10"
    cols = [{"title": "no erasure", "legend": ["the toy model as is"], "images": torch.rand(1, 3, 64, 64),
             "notes": [["no eraser", "triangle, dots"]], "verdicts": [("kept", True)]},
            {"title": "whole stack", "legend": ["#1 #2 #3 #4 #5 #6 #7 #8 #9 #10", "all at once"],
             "images": torch.rand(1, 3, 64, 64), "notes": [[long, "circle, dots"]], "verdicts": [("erased", True)]}]
    D.draw_grid(str(tmp_path / "g.png"), rows, cols)
    img = Image.open(tmp_path / "g.png")
    from PIL import ImageDraw

    width = ImageDraw.Draw(img).textlength(long, font=D._font(11))
    assert img.width >= D.LEFT_W + 2 * D.GAP + 64 * D.SCALE + width


@pytest.mark.slow
def test_watermark_row_is_a_seed_where_the_base_model_draws_it():
    """The Geom column's row: a seed on which the base model draws the (never captioned) watermark."""
    from conceptgate import toyworld as tw
    from conceptgate.bench.generation import generate_with_stack
    from conceptgate.bench.quality import resolve_concept
    from conceptgate.toyworld.judges import classify

    pipe, judges = tw.load_pipeline(), tw.load_judges()
    rows = D.demo_rows([resolve_concept("triangle")], n_unrelated=1)
    row = D.watermark_row(pipe, judges, rows, seed=1000, steps=25, cfg=5.0)
    assert row is not None and row["kind"] == "watermark" and row["prompt"] == rows[-1]["prompt"]
    imgs, _ = generate_with_stack(pipe, [row["prompt"]], [row["seed"]], None, steps=25, cfg=5.0)
    p = classify(judges, imgs)
    assert int(p["watermark"][0]) == 1 and int(p["object"][0]) == row["labels"][0]
    drawn = {"object": D.JUDGE_HEADS["object"][row["labels"][0]], "style": D.JUDGE_HEADS["style"][row["labels"][1]],
             "colour": "red"}
    targets = [resolve_concept("triangle")]
    assert D.score_cell(row, dict(drawn, watermark="absent"), {"watermark"}, targets) == ("erased", True)
    assert D.score_cell(row, dict(drawn, watermark="present"), {"watermark"}, targets) == ("erased", False)
    assert D.score_cell(row, dict(drawn, watermark="present"), {"triangle"}, targets) == ("kept", True)

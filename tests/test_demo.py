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
    assert titles == ["no erasure", "uce-triangle", "rece-striped", "uce-star", "whole stack"]
    assert data["columns"][-1]["erasers"] == ["uce-triangle", "rece-striped", "uce-star"]
    kinds = [r["kind"] for r in data["rows"]]
    assert kinds.count("target") == 3 and kinds.count("synonym") == 3 and kinds.count("unrelated") == 1
    for r in data["rows"]:
        assert set(r["gates"]) == {"uce-triangle", "rece-striped", "uce-star"}
        if r["kind"] == "target":
            assert r["gates"][{"triangle": "uce-triangle", "striped": "rece-striped", "star": "uce-star"}[r["target"]]] \
                == pytest.approx(1.0)
    for c in data["columns"]:
        assert len(c["judged"]) == len(data["rows"])
    assert os.path.exists(out / "uce-triangle.safetensors") and os.path.exists(out / "rece-striped.safetensors")
    man = json.loads((out / "stack.json").read_text())
    assert [e["name"] for e in man["entries"]][:2] == ["uce-triangle", "rece-striped"]
    assert set(data["summary"]) == set(titles) and m["grid"].endswith("grid.png")
    printed = capsys.readouterr().out
    assert "gate uce-triangle" in printed and "skipping" in printed and "broken.safetensors" in printed


def test_demo_rows_and_table():
    from conceptgate.bench.quality import resolve_concept

    rows = D.demo_rows([resolve_concept("triangle"), resolve_concept("striped")], n_unrelated=2)
    assert [r["kind"] for r in rows] == ["target", "target", "synonym", "synonym", "unrelated", "unrelated"]
    assert "triangle" in rows[0]["prompt"] and "trigon" in rows[2]["prompt"] and "zebra-lined" in rows[3]["prompt"]
    for r in rows[4:]:
        assert not any(w in r["prompt"] for w in ("triangle", "trigon", "striped", "zebra-lined"))
    assert D.load_shipped("/nonexistent/folder") == []

"""``bench speed lora`` runs end to end on the toy model and writes its section (2 iterations: a smoke run;
the figures in BENCHMARKS.md come from the full command)."""

import json

import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("peft")


def test_bench_speed_lora_writes_its_section(tmp_path, monkeypatch):
    from conceptgate.bench.speed_lora import bench_lora

    monkeypatch.setenv("CONCEPTGATE_BENCHMARKS", str(tmp_path / "B.md"))
    result, body = bench_lora(iterations=2, json_path=str(tmp_path / "b.json"), log=lambda *_: None)
    for kind in ("spm", "abo"):
        e = result["trainers"][kind]
        assert e["hooks_s"] > 0 and e["peft_s"] > 0 and e["ratio_q1"] <= e["ratio_median"] <= e["ratio_q3"]
        assert e["max_loss_rel_diff"] < 1e-4 and e["max_factor_diff"] < 1e-5 < e["max_factor"]
    md = (tmp_path / "B.md").read_text()
    assert "<!-- bench:speed-lora:start -->" in md and "ratio peft/hooks" in md
    assert json.load(open(tmp_path / "b.json"))["speed-lora"]["trainers"]["spm"]["modules"] > 0

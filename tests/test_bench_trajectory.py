"""bench trajectory (issue 20, item 3): the scores it reads and the verdict it writes."""

import pytest
import torch

from conceptgate.bench.trajectory import SHOULD_FIRE, auc, trajectory_scores, verdict


def test_auc_counts_pairs_and_ties():
    assert auc(torch.tensor([2.0, 3.0]), torch.tensor([1.0, 0.0])) == 1.0
    assert auc(torch.tensor([0.0]), torch.tensor([1.0])) == 0.0
    assert auc(torch.tensor([1.0, 2.0]), torch.tensor([1.0])) == 0.75  # one tie (half), one win
    assert auc(torch.tensor([]), torch.tensor([1.0])) != auc(torch.tensor([]), torch.tensor([1.0]))  # nan


@pytest.fixture(scope="module")
def toy():
    from conceptgate.adapters.diffusers_host import DiffusersTextEncoder
    from conceptgate.toyworld import load_pipeline

    pipe = load_pipeline()
    return pipe, DiffusersTextEncoder(pipe.tokenizer, pipe.text_encoder)


@torch.no_grad()
def test_scores_on_the_toy_model(toy):
    from conceptgate.bench.generation import _latents

    pipe, enc = toy
    prompts = enc(["a triangle", "a red circle in dotted style"]).hidden
    concept, empty, anchor = enc(["a triangle"]).hidden, enc([""]).hidden, enc(["a shape"]).hidden
    out = trajectory_scores(pipe.unet, pipe.scheduler, _latents(pipe, [0, 1]), prompts, concept, empty, anchor,
                            steps=4, record=(0, 2))
    assert sorted(out) == [0, 2]
    for k in out:
        assert set(out[k]) == {"plain", "anchored"}
        assert out[k]["plain"].shape == (2,)
        # the prompt that is the concept text has the concept's own guidance direction
        assert out[k]["plain"][0] == pytest.approx(1.0, abs=1e-4)
        assert out[k]["anchored"][0] == pytest.approx(1.0, abs=1e-4)
        assert float(out[k]["plain"][1]) < 0.999


@torch.no_grad()
def test_call_cost_ratio(toy):
    from conceptgate.bench.trajectory import measure_cost

    pipe, enc = toy
    c = measure_cost(pipe, enc, steps=4, k=2)
    assert c["call_s"] > 0 and c["call_with_row_s"] > 0
    # the loop ratio is the per-call ratio on k of the steps' calls
    assert c["ratio"] == pytest.approx((2 + 2 * c["call_with_row_s"] / c["call_s"]) / 4)


def _result(fire: float, false_fire: float, ratio: float) -> dict:
    r = {s: {"fire": fire, "auc": 0.9, "context": 1.0, "either": 1.0} for s in SHOULD_FIRE}
    r.update(threshold=0.5, false_fire=false_fire, false_fire_either=false_fire)
    return {"concepts": {"triangle": {"steps": {0: {"plain": r, "anchored": r}}}}, "cost": {"ratio": ratio}}


def test_verdict_follows_the_figures():
    assert verdict(_result(0.96, 0.02, 1.05)).startswith("Verdict: the trajectory gate meets")
    low = verdict(_result(0.60, 0.02, 1.05))
    assert low.startswith("Verdict: not built") and "60%" in low
    assert verdict(_result(0.96, 0.02, 1.30)).startswith("Verdict: not built")  # too slow

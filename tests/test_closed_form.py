"""Tests for the UCE / RECE closed-form math (adapters/rece/closed_form.py, issue 5)."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from conceptgate.adapters.rece import closed_form as cf
from conceptgate.adapters.rece.closed_form import (
    EncodingCache, PreserveGram, VectorSet, aligned_tail_vectors, apply_deltas, default_preserve_scale,
    encode_texts, factor_delta, factor_edit, last_token_vectors, last_word_index, measure_interference,
    rece_adversarial_embedding, rece_defaults, rece_edit, stack_vector_sets, sum_deltas, uce_edit,
    uce_edit_vectors, uce_vectors,
)

F64 = torch.float64
D = 24
OUTS = (16, 24, 32, 40)


def make_weights(d=D, outs=OUTS, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"down_blocks.{i}.attentions.0.transformer_blocks.0.attn2.to_{'kv'[i % 2]}":
            (torch.randn(o, d, generator=g, dtype=F64) / math.sqrt(d)).to(dtype)
            for i, o in enumerate(outs)}


def randn(*shape, seed=1, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def outputs(weights, rows):
    """All layers' outputs on ``rows`` stacked: (sum_out x n)."""
    return torch.cat([w.to(F64) @ rows.to(F64).T for w in weights.values()])


def rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


# ---------------------------------------------------------------------------
# UCE correctness
# ---------------------------------------------------------------------------

def test_erased_vectors_map_to_guide_outputs_in_exact_limit():
    w = make_weights()
    c, g = randn(3, D, seed=1), randn(3, D, seed=2)
    target = outputs(w, g)
    errs = []
    for a_e in (1.0, 1e2, 1e4, 1e8):
        new = apply_deltas(w, uce_edit(w, c, g, erase_scale=a_e))
        errs.append(rel(outputs(new, c), target))
    assert all(e2 < e1 for e1, e2 in zip(errs, errs[1:])), errs
    assert errs[0] < 1.0                    # the default already moves toward the guide
    assert errs[-1] < 1e-6                  # a_e >> lam: exact mapping in the limit


def test_preserved_vectors_keep_outputs():
    w = make_weights()
    c, g, p = randn(3, D, seed=1), randn(3, D, seed=2), randn(5, D, seed=3)
    before = outputs(w, p)
    no_pres = rel(outputs(apply_deltas(w, uce_edit(w, c, g)), p), before)
    with_pres = rel(outputs(apply_deltas(w, uce_edit(w, c, g, p)), p), before)
    assert with_pres < no_pres
    # both constraints dominant: erased -> guide and preserved -> themselves, near exactly
    new = apply_deltas(w, uce_edit(w, c, g, p, erase_scale=1e8, preserve_scale=1e8))
    assert rel(outputs(new, p), before) < 1e-6
    assert rel(outputs(new, c), outputs(w, g)) < 1e-6


def test_directions_orthogonal_to_edited_vectors_unchanged():
    w = make_weights()
    q, _ = torch.linalg.qr(randn(D, D, seed=4))
    span, comp = q[:, :7], q[:, 7:]
    c = (randn(3, 7, seed=5) @ span.T)
    g = randn(3, D, seed=6)                 # the guide may be anything
    p = (randn(4, 7, seed=7) @ span.T)
    for method in ("lowrank", "full"):
        res = uce_edit(w, c, g, p, method=method)
        for name, delta in res.items():
            moved = torch.linalg.norm(delta @ comp) / torch.linalg.norm(w[name] @ comp)
            assert moved < 1e-12, (method, name, float(moved))
            assert torch.linalg.norm(delta @ span) > 1e-3     # the edit itself is not empty


def test_lowrank_form_equals_literal_bracket_form():
    w = make_weights()
    c, g, p = randn(4, D, seed=1), randn(4, D, seed=2), randn(6, D, seed=3)
    a = uce_edit(w, c, g, p, lam=0.3, erase_scale=2.0, preserve_scale=0.7)
    b = uce_edit(w, c, g, p, lam=0.3, erase_scale=2.0, preserve_scale=0.7, method="full")
    for name in w:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-13)


def _exact_uce(w, c, g, p, lam, a_e, a_p):
    """W_new by the bracket formula in exact rational arithmetic (Gauss-Jordan)."""
    fr = lambda t: [[Fraction(float(x)) for x in row] for row in t.tolist()]
    W, C, G, P = fr(w), fr(c), fr(g), fr(p)
    out, d = len(W), len(W[0])
    lam, a_e, a_p = Fraction(lam), Fraction(a_e), Fraction(a_p)
    wv = lambda v: [sum(W[r][k] * v[k] for k in range(d)) for r in range(out)]
    m = [[lam * (i == j) for j in range(d)] for i in range(d)]
    rhs = [[lam * W[r][j] for j in range(d)] for r in range(out)]
    for vecs, tgts, s in ((C, G, a_e), (P, P, a_p)):
        for cv, tv in zip(vecs, tgts):
            t = wv(tv)
            for i in range(d):
                for j in range(d):
                    m[i][j] += s * cv[i] * cv[j]
            for r in range(out):
                for j in range(d):
                    rhs[r][j] += s * t[r] * cv[j]
    # W_new M = rhs  <=>  M W_new^T = rhs^T   (M symmetric)
    aug = [m[i][:] + [rhs[r][i] for r in range(out)] for i in range(d)]
    for col in range(d):
        piv = next(r for r in range(col, d) if aug[r][col] != 0)
        aug[col], aug[piv] = aug[piv], aug[col]
        pv = aug[col][col]
        aug[col] = [x / pv for x in aug[col]]
        for r in range(d):
            if r != col and aug[r][col] != 0:
                f = aug[r][col]
                aug[r] = [x - f * y for x, y in zip(aug[r], aug[col])]
    return torch.tensor([[float(aug[i][d + r]) for i in range(d)] for r in range(out)], dtype=F64)


def test_float64_solve_agrees_with_exact_rational_reference():
    d = 5
    w = {"mid_block.attentions.0.transformer_blocks.0.attn2.to_k": randn(3, d, seed=11)}
    c, g, p = randn(2, d, seed=12), randn(2, d, seed=13), randn(1, d, seed=14)
    exact = _exact_uce(w["mid_block.attentions.0.transformer_blocks.0.attn2.to_k"], c, g, p,
                       0.5, 1.0, 1.0)
    for method in ("lowrank", "full"):
        res = uce_edit(w, c, g, p, method=method)
        (name, delta), = res.items()
        assert rel(w[name] + delta, exact) < 1e-13
        assert rel(delta, exact - w[name]) < 1e-12


def test_results_cast_back_to_input_dtype():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        w = make_weights(dtype=dtype)
        res = uce_edit(w, randn(2, D, dtype=torch.float32), randn(2, D, seed=3, dtype=torch.float32))
        assert all(res[k].dtype == dtype and res[k].shape == w[k].shape for k in w)


def test_default_preserve_scale_rule():
    assert default_preserve_scale(1) == 1.0
    assert default_preserve_scale(4) == 0.25
    assert default_preserve_scale(1733) == 0.1
    w = make_weights()
    c, g = randn(2, D, seed=1), randn(2, D, seed=2)
    one = PreserveGram.from_vectors(randn(77, D, seed=3), n_prompts=1)   # '' = 77 token rows
    many = PreserveGram.from_vectors(randn(200, D, seed=3), n_prompts=20)
    assert uce_edit(w, c, g, one).params["preserve_scale"] == 1.0
    assert uce_edit(w, c, g, many).params["preserve_scale"] == 0.1
    assert uce_edit(w, c, g, randn(4, D, seed=3)).params["preserve_scale"] == 0.25
    assert uce_edit(w, c, g, many, preserve_scale=0.5).params["preserve_scale"] == 0.5


# ---------------------------------------------------------------------------
# low-rank structure and export
# ---------------------------------------------------------------------------

def test_delta_rank_equals_number_of_edited_vectors_and_factors_are_exact():
    w64 = make_weights()
    n = 5
    c, g, p = randn(n, D, seed=1), randn(n, D, seed=2), randn(3, D, seed=3)
    res = uce_edit(w64, c, g, p)
    assert res.rank == n
    for name, delta in res.items():
        assert int(torch.linalg.matrix_rank(delta)) == n
        up, down, info = factor_delta(delta, factors=res.factors[name])
        assert info["method"] == "construction" and info["rank"] == n
        assert info["rel_error"] < 1e-13
        assert rel(up @ down, delta) < 1e-13

    w32 = make_weights(dtype=torch.float32)
    res32 = uce_edit(w32, c.float(), g.float(), p.float())
    facs = factor_edit(res32)
    for name, (up, down, info) in facs.items():
        assert up.dtype == torch.float32 and up.shape == (w32[name].shape[0], n)
        assert down.shape == (n, D) and info["alpha"] == n
        assert info["rel_error"] < 1e-6                    # float32 precision
        # the factors recover the float64 construction exactly (up to the fp32 cast)
        assert info["rel_error_float64"] < 1e-6


def test_svd_path_for_imported_full_deltas_reports_error():
    w = make_weights(dtype=torch.float32)
    n = 4
    res = uce_edit(w, randn(n, D, seed=1, dtype=torch.float32), randn(n, D, seed=2, dtype=torch.float32))
    name = next(iter(w))
    edited = w[name] + res[name]            # what a published artifact stores
    imported = edited - w[name]             # subtract the base: rounding noise, full rank
    up, down, info = factor_delta(imported, tol=1e-5)
    assert info["method"] == "svd" and info["rank"] == n
    assert info["rel_error"] < 1e-5
    up, down, info = factor_delta(imported, rank=n - 1)
    s = torch.linalg.svdvals(imported.to(F64))
    tail = float(s[n - 1:].square().sum().sqrt() / s.square().sum().sqrt())
    assert info["rank"] == n - 1 and info["rel_error"] == pytest.approx(tail, rel=1e-3)
    assert info["rel_error"] > 1e-3


def test_rece_rank_adds_up_over_epochs_and_factors_reconstruct():
    w = make_weights()
    c, g = randn(3, D, seed=1), randn(3, D, seed=2)
    start = uce_edit(w, c, g)
    concept, target = randn(4, D, seed=5), randn(4, D, seed=6)
    res = rece_edit(w, concept, target, start=start, epochs=2, lam_reg=0.1)
    assert res.rank == 3 + 2 * 4
    for name, delta in res.items():
        assert int(torch.linalg.matrix_rank(delta)) == res.rank
        up, down, info = factor_delta(delta, factors=res.factors[name])
        assert info["rank"] == res.rank and info["rel_error"] < 1e-13


# ---------------------------------------------------------------------------
# RECE
# ---------------------------------------------------------------------------

def test_rece_embedding_regenerates_concept_then_next_epoch_neutralises_it():
    w = make_weights(outs=(32, 32, 48, 48, 64))
    concept, blank = randn(6, D, seed=21), randn(6, D, seed=22)
    uce = uce_edit(w, concept, blank)                      # concept -> ' ' (aligned rows)
    w1 = apply_deltas(w, uce)
    orig = outputs(w, concept)
    base = torch.linalg.norm(outputs(w1, concept) - orig)   # the UCE model on the plain concept
    cprime = rece_adversarial_embedding(w, w1, concept, lam_reg=1e-3)
    assert cprime.shape == concept.shape and cprime.dtype == F64
    regen = torch.linalg.norm(outputs(w1, cprime) - orig)
    assert regen < 0.3 * base                              # W' c' ~ W c: concept regenerated

    res = rece_edit(w, concept, blank, start=uce, epochs=1, lam_reg=1e-3)
    assert torch.allclose(res.embeddings[0], cprime, atol=1e-10)
    w2 = apply_deltas(w, res)
    after = torch.linalg.norm(outputs(w2, cprime) - orig)
    assert after > 0.9 * base                              # no longer regenerates
    # ... its outputs moved to the current weights' outputs on the target (' ')
    to_guide_before = torch.linalg.norm(outputs(w1, cprime) - outputs(w1, blank))
    to_guide_after = torch.linalg.norm(outputs(w2, cprime) - outputs(w1, blank))
    assert to_guide_after < 0.05 * to_guide_before


def test_rece_embedding_exact_when_the_edited_layer_is_invertible():
    d = 12
    w = {"mid_block.attentions.0.transformer_blocks.0.attn2.to_v": randn(d, d, seed=31) + 3 * torch.eye(d, dtype=F64)}
    c = randn(3, d, seed=32)
    w1 = apply_deltas(w, uce_edit(w, c, randn(3, d, seed=33)))
    cprime = rece_adversarial_embedding(w, w1, c, lam_reg=1e-12)
    assert rel(outputs(w1, cprime), outputs(w, c)) < 1e-8


def test_rece_fast_path_matches_dense_reference_every_epoch():
    w = make_weights()
    c, g, pres = randn(5, D, seed=41), randn(5, D, seed=42), randn(5, D, seed=43)
    start = uce_edit(w, c, g, pres)
    res = rece_edit(w, c, g, pres, start=start, epochs=3, lam_reg=0.1)
    current = apply_deltas(w, start)
    acc = dict(start)
    for k, emb in enumerate(res.embeddings):
        ref = rece_adversarial_embedding(w, current, c, 0.1)
        assert torch.allclose(emb, ref, rtol=0, atol=1e-10), k
        # the epoch edit equals a UCE edit of the current weights with lam1 = lam2 = 0.1
        step = uce_edit(current, emb, g, pres, lam=0.1, preserve_scale=0.1, erase_scale=1.0)
        for name in w:
            assert torch.allclose(res.epoch_factors[k][name][0] @ res.epoch_factors[k][name][1],
                                  step[name], rtol=0, atol=1e-12)
        acc = sum_deltas(acc, step)
        current = apply_deltas(w, acc)
    for name in w:
        assert torch.allclose(res[name], acc[name], rtol=0, atol=1e-12)
    after1 = res.deltas_after(1)
    for name in w:
        assert torch.allclose(after1[name], sum_deltas(start, *[
            {n: u @ dn for n, (u, dn) in res.epoch_factors[0].items()}])[name], atol=1e-12)
        assert torch.allclose(res.deltas_after(3)[name], res[name], atol=1e-12)
        assert torch.equal(res.deltas_after(0)[name], start[name])


def test_rece_dense_start_and_gram_cache_give_the_same_edit():
    w = make_weights()
    c, g, pres = randn(5, D, seed=44), randn(5, D, seed=45), randn(5, D, seed=46)
    start = uce_edit(w, c, g, pres)
    cf.clear_gram_cache()
    a = rece_edit(w, c, g, pres, start=start, epochs=2, lam_reg=0.1)            # factored start
    b = rece_edit(w, c, g, pres, start=dict(start), epochs=2, lam_reg=0.1)      # dense start
    hit = rece_edit(w, c, g, pres, start=start, epochs=2, lam_reg=0.1)          # cached Gram
    assert b.factors is None and a.rank == 5 + 2 * 5
    for name in w:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-12)
        assert torch.equal(a[name], hit[name])
    # an in-place change of the weights invalidates the cached Gram
    name = next(iter(w))
    w[name].mul_(2.0)
    fresh = rece_edit(w, c, g, pres, start=uce_edit(w, c, g, pres), epochs=1, lam_reg=0.1,
                      gram_cache=False)
    cached = rece_edit(w, c, g, pres, start=uce_edit(w, c, g, pres), epochs=1, lam_reg=0.1)
    assert torch.allclose(fresh.embeddings[0], cached.embeddings[0], rtol=0, atol=1e-12)


def test_rece_type_defaults_and_batched_concepts():
    assert (rece_defaults("nudity").lam_reg, rece_defaults("nudity").epochs) == (0.1, 3)
    assert (rece_defaults("style").lam_reg, rece_defaults("style").epochs) == (1e-3, 1)
    assert rece_defaults("art") is rece_defaults("style")
    assert rece_defaults("object_hard").lam_reg == 1e-3 and rece_defaults("object_easy").lam_reg == 0.1
    assert rece_defaults("unsafe").epochs == 2
    with pytest.raises(ValueError, match="unknown RECE concept type"):
        rece_defaults("landscape")
    w = make_weights()
    concept, blank = randn(2, 5, D, seed=51), randn(5, D, seed=52)   # 2 prompts, broadcast target
    res = rece_edit(w, concept, blank, concept_type="nudity")
    assert res.params["epochs"] == 3 and res.params["lam_reg"] == 0.1
    assert len(res.embeddings) == 3 and res.embeddings[0].shape == concept.shape
    assert res.rank == 3 * 10


# ---------------------------------------------------------------------------
# multi-concept
# ---------------------------------------------------------------------------

def test_joint_solve_vs_stacked_separate_edits_interference():
    w = make_weights()
    c1, g1, c2, g2 = (randn(3, D, seed=s) for s in (61, 62, 63, 64))
    pres = randn(4, D, seed=65)
    s1 = VectorSet(c1, g1, PreserveGram.from_vectors(pres, 1))
    s2 = VectorSet(c2, g2, PreserveGram.from_vectors(pres, 1))
    joint_set = stack_vector_sets(s1, s2)
    assert joint_set.erase.shape == (6, D) and joint_set.preserve.n_prompts == 2
    kw = dict(erase_scale=1e3, preserve_scale=1.0)
    d1, d2 = uce_edit_vectors(w, s1, **kw), uce_edit_vectors(w, s2, **kw)
    joint = uce_edit_vectors(w, joint_set, **kw)
    m = measure_interference(w, [d1, d2], joint, joint_set.erase, joint_set.guide)
    assert m["output_rel_diff"] > 1e-3 and m["delta_rel_diff"] > 1e-3
    assert m["target_rel_err_joint"] < m["target_rel_err_stacked"]
    assert set(m["per_layer"]) == set(w)
    # sanity of the measure: concepts in orthogonal subspaces, no preserve -> additive
    q, _ = torch.linalg.qr(randn(D, D, seed=66))
    o1, o2 = randn(3, 6, seed=67) @ q[:, :6].T, randn(3, 6, seed=68) @ q[:, 6:12].T
    e1, e2 = uce_edit(w, o1, g1), uce_edit(w, o2, g2)
    j = uce_edit(w, torch.cat([o1, o2]), torch.cat([g1, g2]))
    m0 = measure_interference(w, [e1, e2], j, torch.cat([o1, o2]))
    assert m0["output_rel_diff"] < 1e-10


# ---------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------

def test_bad_inputs_raise_value_error():
    w = make_weights()
    c, g = randn(2, D, seed=1), randn(2, D, seed=2)
    with pytest.raises(ValueError, match="shape mismatch"):
        uce_edit(w, randn(2, D + 1), randn(2, D + 1))
    with pytest.raises(ValueError, match="shape mismatch"):
        uce_edit({**w, "odd.attn2.to_k": randn(8, D + 2)}, c, g)
    with pytest.raises(ValueError, match="guide"):
        uce_edit(w, c, randn(2, D + 1))
    with pytest.raises(ValueError, match="same number"):
        uce_edit(w, c, randn(3, D))
    bad = dict(w)
    name = next(iter(bad))
    bad[name] = bad[name].clone()
    bad[name][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        uce_edit(bad, c, g)
    nan_c = c.clone()
    nan_c[1, 3] = float("nan")
    with pytest.raises(ValueError, match="erase vectors contains NaN"):
        uce_edit(w, nan_c, g)
    inf_p = randn(2, D)
    inf_p[0, 0] = float("inf")
    with pytest.raises(ValueError, match="preserve vectors contains NaN or Inf"):
        uce_edit(w, c, g, inf_p)
    with pytest.raises(ValueError, match="ridge"):
        uce_edit(w, c, g, lam=0.0)
    with pytest.raises(ValueError, match="2-D"):
        uce_edit({name: randn(3, 4, D)}, c, g)
    with pytest.raises(ValueError, match="preserve Gram"):
        uce_edit(w, c, g, PreserveGram.from_vectors(randn(3, D + 1)))
    with pytest.raises(ValueError, match="same modules"):
        rece_adversarial_embedding(w, {name: w[name]}, c, 0.1)
    with pytest.raises(ValueError, match="NaN"):
        rece_adversarial_embedding(w, bad, c, 0.1)
    with pytest.raises(ValueError, match="shape mismatch"):
        rece_edit(w, randn(5, D + 1), randn(5, D + 1), epochs=1, lam_reg=0.1)
    with pytest.raises(ValueError, match="epochs and lam_reg"):
        rece_edit(w, c, g)
    with pytest.raises(ValueError, match="factors"):
        factor_delta(w[name], factors=(randn(3, 2), randn(2, D)))


# ---------------------------------------------------------------------------
# token conventions and encoding cache
# ---------------------------------------------------------------------------

BOS, EOS, L, HD = cf.CLIP_BOS_TOKEN_ID, cf.CLIP_EOS_TOKEN_ID, 77, 8


class FakeEncoder:
    """Tokenises on whitespace; hidden state depends on token, position and left context."""

    def __init__(self, pad_id=EOS, with_mask=False, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(50000, HD, generator=g)
        self.pos = torch.randn(L, HD, generator=g) * 0.1
        self.pad_id, self.with_mask, self.calls, self.texts = pad_id, with_mask, 0, 0

    def ids(self, text):
        words = [1000 + (sum(map(ord, wd)) * 31 + len(wd)) % 40000 for wd in text.split()]
        seq = [BOS] + words[:L - 2] + [EOS]
        return seq + [self.pad_id] * (L - len(seq)), len(seq)

    def __call__(self, texts):
        self.calls += 1
        self.texts += len(texts)
        rows, masks = [], []
        for t in texts:
            seq, n = self.ids(t)
            rows.append(seq)
            masks.append([1] * n + [0] * (L - n))
        ids = torch.tensor(rows)
        emb = self.table[ids] + self.pos
        hidden = emb + 0.5 * torch.cumsum(emb, 1) / torch.arange(1, L + 1)[:, None]
        if self.with_mask:
            return hidden, ids, torch.tensor(masks)
        return hidden, ids


def test_last_word_index_matches_attention_mask_rule():
    enc = FakeEncoder(with_mask=True)
    _, ids, mask = enc(["", "a photo of a cat", "nudity"])
    assert last_word_index(ids).tolist() == [0, 5, 1]
    assert last_word_index(ids, mask).tolist() == [0, 5, 1]
    sd2 = FakeEncoder(pad_id=0)                          # SD2.x pads with id 0
    _, ids2 = sd2(["a photo of a cat"])
    assert last_word_index(ids2).tolist() == [5]
    with pytest.raises(ValueError, match="end-of-text"):
        last_word_index(torch.full((1, L), 5))


def test_aligned_tail_convention_old_uce():
    enc = FakeEncoder()
    h, ids = enc(["a nude woman", " "])
    er, gr = aligned_tail_vectors(h[0], ids[0], h[1], ids[1])
    # last word (index 3) .. end  ->  guide BOS (index 0) ..; right-truncated to equal length
    assert er.shape == (L - 3, HD) and gr.shape == (L - 3, HD)
    assert torch.equal(er, h[0, 3:]) and torch.equal(gr, h[1, :L - 3])
    # a guide with a longer prompt truncates the concept's tail instead
    h2, ids2 = enc(["cat", "a big dog"])
    er2, gr2 = aligned_tail_vectors(h2[0], ids2[0], h2[1], ids2[1])
    assert torch.equal(er2, h2[0, 1:L - 2]) and torch.equal(gr2, h2[1, 3:])


def test_last_token_convention_new_uce():
    enc = FakeEncoder()
    h, ids = enc(["", "a photo of a cat"])
    rows = last_token_vectors(h, ids)
    assert torch.equal(rows[0], h[0, 0]) and torch.equal(rows[1], h[1, 5])


def test_uce_vectors_both_conventions_and_encoding_cache():
    enc = FakeEncoder()
    cache = EncodingCache()
    preserve = [f"artist number {i}" for i in range(30)]
    old = uce_vectors(enc, "nude", " ", preserve, "aligned_tail", cache=cache)
    assert old.erase.shape == (L - 1, HD) and old.guide.shape == (L - 1, HD)
    assert old.preserve.n_prompts == 30 and old.preserve.n_vectors == 30 * L
    new = uce_vectors(enc, ["nude", "naked"], "", preserve, "last_token", cache=cache)
    assert new.erase.shape == (2, HD) and new.preserve.n_vectors == 30
    texts_after_first = enc.texts
    assert texts_after_first == 1 + 1 + 30 + 1 + 1     # each distinct text encoded once
    again = uce_vectors(enc, "nude", " ", preserve, "aligned_tail", cache=cache)
    assert enc.texts == texts_after_first               # all cached (encodings and Gram)
    assert torch.equal(again.preserve.gram, old.preserve.gram)
    other = FakeEncoder(seed=1)                         # a different encoder: no cache hits
    encode_texts(other, ["nude"], cache=cache)
    assert other.texts == 1
    # the Gram equals the Gram of all token rows
    h, _ = enc(preserve)
    rows = h.reshape(-1, HD).to(F64)
    assert torch.allclose(old.preserve.gram, rows.T @ rows)
    # end to end: a long preserve list defaults to a_p = 0.1
    w = {"mid_block.attentions.0.transformer_blocks.0.attn2.to_k": randn(6, HD, seed=71)}
    res = uce_edit_vectors(w, old)
    # one rank per erase vector (L - 1 of them), at most the width HD: (delta, identity) factors beyond it
    assert res.params["preserve_scale"] == 0.1 and res.params["n_erase_vectors"] == L - 1
    assert res.rank == min(L - 1, HD)


def test_encoding_cache_by_key_and_eviction():
    cache = EncodingCache(max_texts_per_encoder=2)
    encode = FakeEncoder()
    lam = lambda texts: encode(texts)                   # fresh callables: use an explicit key
    encode_texts(lam, ["a", "b"], cache=cache, encoder_key="sd15-fp32-skip1")
    encode_texts(lambda t: encode(t), ["a", "b"], cache=cache, encoder_key="sd15-fp32-skip1")
    assert encode.texts == 2
    encode_texts(lam, ["c"], cache=cache, encoder_key="sd15-fp32-skip1")   # evicts "a"
    encode_texts(lam, ["a"], cache=cache, encoder_key="sd15-fp32-skip1")
    assert encode.texts == 4 and len(cache) == 2
    bad = lambda texts: (torch.full((len(texts), L, HD), float("nan")), torch.full((len(texts), L), EOS))
    with pytest.raises(ValueError, match="NaN"):
        uce_vectors(bad, "x", " ", cache=None)


# ---------------------------------------------------------------------------
# module collection / configs (no timing here)
# ---------------------------------------------------------------------------

def test_standard_shapes_and_collection():
    sd = cf.cross_attention_shapes("sd15")
    assert len(sd) == 32
    assert sorted({o for o, _ in sd.values()}) == [320, 640, 1280]
    assert sum(1 for o, _ in sd.values() if o == 1280) == 12 and {c for _, c in sd.values()} == {768}
    xl = cf.cross_attention_shapes("sdxl")
    assert len(xl) == 140 and {c for _, c in xl.values()} == {2048}
    assert sorted({o for o, _ in xl.values()}) == [640, 1280]

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q, self.to_k, self.to_v = (torch.nn.Linear(HD, 4, bias=False) for _ in range(3))

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn1, self.attn2 = Attn(), Attn()

    m = torch.nn.Module()
    m.block = Block()
    got = cf.collect_cross_attention_weights(m)
    assert sorted(got) == ["block.attn2.to_k", "block.attn2.to_v"]
    got_sd = cf.collect_cross_attention_weights(m.state_dict())
    assert sorted(got_sd) == sorted(got)
    from conceptgate.bench.speed_uce import benchmark_speed

    assert callable(benchmark_speed)

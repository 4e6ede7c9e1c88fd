"""UCE/RECE erase sets in context (issue 17, item 1): synonyms and sentences, span-aligned rows."""

import pytest
import torch

from conceptgate.adapters.prompts import prompt_pairs, sentence_pairs
from conceptgate.adapters.rece import EditSpec, compute_edit
from conceptgate.adapters.rece import closed_form as cf

EOS = cf.CLIP_EOS_TOKEN_ID
L = 10


def ids(*tokens):
    row = [49406, *tokens] + [EOS] * (L - 1 - len(tokens))
    return torch.tensor([row])


def hidden_from(i):
    """States that identify (row, position): h[b, l] = [l, token]."""
    return torch.stack([torch.arange(L, dtype=torch.float32), i[0].float()], -1)[None]


@pytest.mark.parametrize("erase,guide,pairs", [
    # same length: the concept token onto the guide token, then position by position
    ((1, 7, 2), (1, 8, 2), [(2, 2)] + [(k, k) for k in range(3, L)]),
    # a two-token concept onto a one-token guide: both concept rows onto the guide token, the rest shifted
    ((1, 7, 9, 2), (1, 8, 2), [(2, 2), (3, 2)] + [(4 + k, 3 + k) for k in range(L - 4)]),
    # an empty guide: the concept onto the token before it, the rest shifted back by one
    ((1, 7, 2), (1, 2), [(2, 1)] + [(3 + k, 2 + k) for k in range(L - 3)]),
])
def test_span_aligned_rows(erase, guide, pairs):
    ei, gi = ids(*erase), ids(*guide)
    er, gr = cf.span_aligned_vectors(hidden_from(ei), ei, hidden_from(gi), gi)
    assert [(int(a[0]), int(b[0])) for a, b in zip(er, gr)] == pairs


def test_span_aligned_refuses_identical_prompts():
    i = ids(1, 7, 2)
    with pytest.raises(ValueError, match="equals its guide"):
        cf.span_aligned_vectors(hidden_from(i), i, hidden_from(i), i)


def test_published_spec_is_unchanged_by_the_new_fields():
    plain = EditSpec(method="uce", concepts=("triangle",), guide="shape")
    assert "synonyms" not in plain.resolved() and "context" not in plain.resolved()
    assert EditSpec(method="uce", concepts=("triangle",), guide="shape", context="bare").key() == plain.key()
    wide = EditSpec(method="uce", concepts=("triangle",), guide="shape", synonyms=("trigon", "triangle"),
                    preserve=("square",), context="generic")
    assert wide.synonyms == ("trigon",)  # the concept itself is not its own synonym
    assert wide.resolved()["context"] == "generic"
    assert "a photo of a square" in wide.resolved()["uce"]["preserve"]


def test_sentence_pairs_keep_the_sentence():
    assert ("a photo of a triangle", "a photo of a") in sentence_pairs("triangle", "", "generic")
    assert sentence_pairs("triangle", "shape", "generic") == prompt_pairs("triangle", "shape", "generic")
    import conceptgate.toyworld  # noqa: F401  registers the toy context

    toy = sentence_pairs("triangle", "shape", "toy")
    assert any("trigon" in e for e, _ in toy)  # the toy context names the concept by its synonyms too
    assert all(e.replace("triangle", "shape").replace("trigon", "shape") == a for e, a in toy)


@pytest.fixture(scope="module")
def toy_host():
    import conceptgate.toyworld as tw
    from conceptgate.adapters.rece import DiffusersEditHost

    return DiffusersEditHost.from_pipeline(tw.load_pipeline())


def _kv(weights, edit, x):
    """Outputs of every edited to_k/to_v on rows ``x`` (edited if ``edit`` is given)."""
    return torch.cat([x @ (w + (edit[name] if edit is not None else 0)).T.double() for name, w in sorted(weights.items())], -1)


def test_context_edit_erases_the_concept_in_sentences(toy_host):
    """On the toy model: the states of the concept inside sentences (which a bare-word edit never saw) are
    mapped much closer to the guide's states when the edit is solved in context; the eraser names the
    synonym, so the gate fires on it."""
    weights = {k: v.double() for k, v in toy_host.cross_attention_weights().items()}
    kw = dict(method="uce", concepts=("triangle",), guide="shape", preserve=("square", "circle"), cache=None)
    bare = compute_edit(toy_host, **kw)
    wide = compute_edit(toy_host, synonyms=("trigon",), context="toy", **kw)
    assert wide.eraser.concepts == ["triangle", "trigon"]
    assert wide.eraser.settings["context"] == "toy"
    eh, ei = toy_host.encode(["a red trigon in striped style"])
    gh, gi = toy_host.encode(["a red shape in striped style"])
    er, gr = cf.span_aligned_vectors(eh, ei, gh, gi)
    er, gr = er.double(), gr.double()
    target = _kv(weights, None, gr)

    def err(outcome):
        return float(torch.linalg.norm(_kv(weights, {k: d.double() for k, d in outcome.result.items()}, er) - target))

    assert err(wide) < 0.5 * err(bare)
    # a preserved word in a sentence: the edit in context moves its outputs less than the bare-word edit
    ph, _ = toy_host.encode(["a blue square in dotted style"])
    keep = ph[0].double()

    def moved(outcome):
        edit = {k: d.double() for k, d in outcome.result.items()}
        return float(torch.linalg.norm(_kv(weights, edit, keep) - _kv(weights, None, keep))
                     / torch.linalg.norm(_kv(weights, None, keep)))

    assert moved(wide) < moved(bare) < 0.5

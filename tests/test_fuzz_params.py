"""Fuzzing the webui's text parsers (hypothesis): ``<erase:...>`` tags, selection strings, script arguments
and pasted infotext give a result or :class:`~conceptgate.extension.params.InputError`, never another
exception; whatever they accept is finite and in range; names survive the infotext round trip."""

import math

from hypothesis import given, settings, strategies as st

from conceptgate.extension import params as P

FUZZ = settings(max_examples=300, deadline=None)
TEXT = st.text(max_size=60) | st.text(alphabet=":,<>%\"erase\\ 0123456789.-naifNIe", max_size=60)
ANY = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
                   lambda c: st.lists(c, max_size=4) | st.dictionaries(TEXT, c, max_size=4), max_leaves=10)


def _ok_strength(s):
    assert isinstance(s, float) and math.isfinite(s)


@FUZZ
@given(items=st.lists(TEXT, max_size=4))
def test_tag_items(items):
    try:
        name, s = P.tag_params(items)
    except P.InputError:
        return
    assert name and 0 <= s <= 10


@FUZZ
@given(prompt=TEXT.map(lambda t: t) | st.builds(lambda a, b: f"x <erase:{a}:{b}> y", TEXT, TEXT))
def test_tags_in_prompt(prompt):
    try:
        tags = P.tags_in(prompt)
    except P.InputError:
        return
    for name, s in tags:
        assert 0 <= s <= 10


@FUZZ
@given(text=TEXT)
def test_selection_strings(text):
    try:
        sel = P.parse_selection(text)
    except P.InputError:
        return
    for _, s in sel:
        _ok_strength(s)
    if all(n and n == n.strip() for n, _ in sel):
        assert [n for n, _ in P.parse_selection(P.format_selection(sel))] == [n for n, _ in sel]


@FUZZ
@given(args=st.lists(ANY, max_size=7) | st.builds(lambda d: [d], st.dictionaries(
    st.sampled_from(["enabled", "erasers", "preset", "combine", "gate", "cond_only"]), ANY)))
def test_script_args(args):
    try:
        a = P.ScriptArgs.from_args(args)
    except P.InputError:
        return
    for _, s in a.erasers:
        assert 0 <= s <= 10


@FUZZ
@given(fields=st.dictionaries(st.sampled_from(list(P.INFOTEXT_KEYS) + ["Prompt", "Steps"]), TEXT | ANY, max_size=7))
def test_pasted_infotext(fields):
    r = P.restore(fields, rename=lambda n, h: None)  # never raises
    assert isinstance(r, P.ScriptArgs)
    for _, s in r.erasers:
        assert 0 <= s <= 10
    P.parse_used(fields.get(P.KEY))
    P.parse_hashes(fields.get(P.KEY_HASHES))


@FUZZ
@given(names=st.lists(st.text(min_size=1, max_size=40).filter(lambda n: n.strip() == n and n), min_size=1, max_size=4),
       strength=st.floats(0, 10), gate=st.floats(0, 1))
def test_names_round_trip_the_infotext(names, strength, gate):
    used = [P.UsedEraser(n, strength, gate, "ab" * 32) for n in names]
    info = P.infotext_params(used, P.ScriptArgs())
    back = P.parse_used(info[P.KEY])
    assert [b[0] for b in back] == names
    assert list(P.parse_hashes(info[P.KEY_HASHES])) == list(dict.fromkeys(names))

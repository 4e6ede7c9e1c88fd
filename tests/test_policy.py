"""The operator policy's core (adapters/policy.py): reading is strict and every problem names the field;
locked entries survive anything a user stack says; the per-entry best-effort opt-out of manifests."""

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conceptgate.adapters import EraserFileError, EraserStack, layout_from_diffusers_config, load_eraser, save_eraser
from conceptgate.adapters.files import sha256_file
from conceptgate.adapters.manifest import ManifestError
from conceptgate.adapters.policy import PolicyCache, PolicyError, configured_path, read_policy
from conceptgate.adapters.synthetic import random_eraser
from tiny_models import tiny_unet

LAYOUT = layout_from_diffusers_config(tiny_unet(seed=3).config)


@pytest.fixture
def files(tmp_path):
    for name, seed in (("tri", 1), ("circ", 2)):
        save_eraser(random_eraser(LAYOUT, concepts=[name], seed=seed, name=name), tmp_path / f"{name}.safetensors")
    return tmp_path


def _entry(folder, name="tri", **kw):
    return dict({"file": f"{name}.safetensors", "sha256": sha256_file(folder / f"{name}.safetensors")}, **kw)


def _write(folder, data, name="policy.json"):
    path = folder / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_enforce_keeps_every_locked_entry(files):
    policy = read_policy(_write(files, {"conceptgate_policy": 1, "locked": [_entry(files, strength=1.0, gate={"rule": "tokens"})]}))
    tri, circ = load_eraser(files / "tri.safetensors"), load_eraser(files / "circ.safetensors")
    for user in (EraserStack(), EraserStack().with_eraser(tri, False, 1.0), EraserStack().with_eraser(tri, True, 0.0),
                 EraserStack().with_eraser(circ, True, 1.0)):
        out = policy.enforce(user)
        locked = [e for e in out.entries if e.eraser.name == "tri"]
        assert len(locked) == 1 and locked[0].enabled and locked[0].strength == 1.0 and locked[0].locked
        assert locked[0].gate.rule == "tokens"
        assert len(out) == len(user) + (0 if any(e.eraser.name == "tri" for e in user.entries) else 1)
    raised = policy.enforce(EraserStack().with_eraser(tri, True, 2.5))
    assert raised.entries[0].strength == 2.5  # users may raise a locked eraser
    assert policy.without_locked(raised).entries == ()
    with pytest.raises(ValueError, match="locked by the operator"):
        raised.with_entry(0, enabled=False)


@pytest.mark.parametrize("data, message", [
    ("not json", "not a JSON policy"),
    ([1, 2], "a JSON list"),
    ({"conceptgate_policy": 2, "locked": []}, "needs 'conceptgate_policy': 1"),
    ({"conceptgate_policy": 1, "locked": [], "extra": 1}, "unknown field 'extra'"),
    ({"conceptgate_policy": 1, "locked": []}, "locked: must be a non-empty list"),
    ({"conceptgate_policy": 1, "locked": [{"file": "tri.safetensors"}]}, r"locked\[0\].sha256: required"),
    ({"conceptgate_policy": 1, "locked": ["tri"]}, r"locked\[0\]: must be an object"),
    ({"conceptgate_policy": 1, "search_dirs": "x", "locked": [{}]}, "search_dirs: must be a list"),
    ('{"conceptgate_policy": 1, "locked": [{"file": "tri.safetensors", "sha256": "%s", "strength": NaN}]}' % ("a" * 64),
     "numbers must be finite"),
])
def test_malformed_policies_name_the_field(files, data, message):
    with pytest.raises(PolicyError, match=message):
        read_policy(_write(files, data))


def test_entry_faults_name_the_field(files, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    save_eraser(random_eraser(LAYOUT, concepts=["x"], seed=4, name="x"), outside / "x.safetensors")
    cases = [
        (dict(_entry(files), enabled=False), r"locked\[0\].enabled: not allowed"),
        (dict(_entry(files), best_effort=True), r"locked\[0\].best_effort: not allowed"),
        (dict(_entry(files), sha256="0" * 64), "sha256 differs"),
        (dict(_entry(files), strength=-1), r"locked\[0\].strength"),
        (dict(_entry(files), file="../" + outside.name + "/x.safetensors", sha256=sha256_file(outside / "x.safetensors")),
         "outside the manifest's folder"),
        (dict(_entry(files), file=str(outside / "x.safetensors")), "absolute path"),
        (dict(_entry(files), file="gone.safetensors"), "not found"),
        (dict(_entry(files), gate={"rule": "nope"}), r"locked\[0\].gate"),
    ]
    for entry, message in cases:
        with pytest.raises(PolicyError, match=message):
            read_policy(_write(files, {"conceptgate_policy": 1, "locked": [entry]}))


def test_search_dirs_are_the_only_other_place_files_come_from(files, tmp_path_factory):
    policy_dir = tmp_path_factory.mktemp("etc")
    data = {"conceptgate_policy": 1, "search_dirs": [str(files)], "locked": [_entry(files)]}
    assert read_policy(_write(policy_dir, data)).entries[0].eraser.name == "tri"
    with pytest.raises(PolicyError, match="not found"):
        read_policy(_write(policy_dir, dict(data, search_dirs=[])))


def test_cache_rereads_on_change_and_keeps_failing_until_fixed(files):
    path = _write(files, {"conceptgate_policy": 1, "locked": [_entry(files)]})
    cache = PolicyCache()
    assert cache.get(str(path)).entries[0].eraser.name == "tri"
    assert cache.get(None) is None
    _write(files, {"conceptgate_policy": 1, "locked": [dict(_entry(files), sha256="0" * 64)]})
    os.utime(path, ns=(1, 1))
    for _ in range(2):
        with pytest.raises(PolicyError, match="sha256 differs"):
            cache.get(str(path))
    _write(files, {"conceptgate_policy": 1, "locked": [_entry(files, "circ")]})
    assert cache.get(str(path)).entries[0].eraser.name == "circ"
    os.remove(path)
    with pytest.raises(PolicyError, match="policy file not found"):
        cache.get(str(path))


def test_configured_path(monkeypatch, tmp_path):
    default = tmp_path / "conceptgate_policy.json"
    monkeypatch.delenv("CONCEPTGATE_POLICY", raising=False)
    assert configured_path(str(default)) is None  # no file, no variable: no policy
    default.write_text("{}")
    assert configured_path(str(default)) == str(default)
    monkeypatch.setenv("CONCEPTGATE_POLICY", "")
    assert configured_path(str(default)) is None  # explicitly off
    monkeypatch.setenv("CONCEPTGATE_POLICY", str(tmp_path / "missing.json"))
    assert configured_path(str(default)) == str(tmp_path / "missing.json")  # named but missing: read fails closed


def test_manifest_best_effort_entry_is_skipped_and_said(files):
    stack = EraserStack().with_eraser(load_eraser(files / "tri.safetensors")).with_eraser(
        load_eraser(files / "circ.safetensors"), best_effort=True)
    path = files / "stack.json"
    stack.to_manifest(path)
    data = json.loads(path.read_text())
    assert data["entries"][1]["best_effort"] is True and "best_effort" not in data["entries"][0]
    os.remove(files / "circ.safetensors")
    loaded = EraserStack.from_manifest(path)
    assert [e.eraser.name for e in loaded.entries] == ["tri"] and "circ" in loaded.skipped[0]
    from conceptgate.adapters.gate import EncodedText
    import torch

    _, report = loaded.gates(EncodedText(torch.zeros(1, 77, 32), [set()]), banks=None, encoder=lambda t: None)
    assert any("skipped (best effort)" in n for n in report.notes) and "skipped (best effort)" in report.text()
    data["entries"][1]["best_effort"] = False
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="not found"):
        EraserStack.from_manifest(path)


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=4),
                     max_leaves=20)
_fields = st.fixed_dictionaries({}, optional={
    "conceptgate_policy": st.sampled_from([1, 1, 2, "1", True]), "search_dirs": _json, "description": _json,
    "locked": st.lists(st.fixed_dictionaries({}, optional={
        "file": st.sampled_from(["tri.safetensors", "../x", "/etc/passwd", "", "circ.safetensors"]) | st.text(max_size=10),
        "sha256": st.sampled_from(["", "0" * 64]) | _json, "strength": _json, "gate": _json, "name": _json,
        "concepts": _json, "enabled": _json}), max_size=3) | _json})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=_fields)
def test_fuzz_policy_reader_gives_a_policy_or_our_error(files, data):
    path = _write(files, data, "fuzz.json")
    try:
        policy = read_policy(path)
    except EraserFileError:
        return
    assert policy.entries and all(e.locked and e.enabled for e in policy.entries)

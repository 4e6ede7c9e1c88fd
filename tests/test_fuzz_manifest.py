"""Fuzzing the stack-manifest reader (hypothesis): random JSON structures around the manifest schema and
random text give a stack or an EraserFileError naming the manifest, never another exception."""

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conceptgate.adapters import EraserFileError, EraserStack, layout_from_diffusers_config, save_eraser
from conceptgate.adapters.files import sha256_file
from conceptgate.adapters.synthetic import random_eraser
from tiny_models import tiny_unet

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz_manifest")
    layout = layout_from_diffusers_config(tiny_unet(seed=1).config)
    save_eraser(random_eraser(layout, concepts=["x"], seed=1, name="good", rank=1), d / "good.safetensors")
    return d


SCALARS = (st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=10)
           | st.sampled_from(["good.safetensors", "../good.safetensors", "/etc/passwd", "additive", "official", "ft",
                              "false", "NaN", ""]))
JSON = st.recursive(SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                    max_leaves=15)
FIELDS = ["file", "sha256", "name", "concepts", "enabled", "strength", "gate", "extra"]
GATE = st.dictionaries(st.sampled_from(["rule", "factor", "threshold", "temperature", "cond_only", "x"]), JSON, max_size=3)


def _entry(sha):
    values = {"file": st.sampled_from(["good.safetensors", "./good.safetensors", "../x", "missing.safetensors"]) | JSON,
              "sha256": st.sampled_from([sha, "", "0" * 64]) | JSON, "gate": GATE | JSON,
              "strength": st.floats() | st.integers(-5, 20) | JSON}
    return st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=6).flatmap(
        lambda d: st.fixed_dictionaries({k: values.get(k, JSON) for k in d}))


def _read(folder, text):
    path = folder / "fuzz.json"
    path.write_text(text)
    try:
        stack = EraserStack.from_manifest(path, search_dirs=[str(folder)])
    except EraserFileError as e:
        assert "fuzz.json" in str(e) or "good.safetensors" in str(e)
        return None
    assert all(0 <= e.strength <= 10 for e in stack.entries)
    return stack


@FUZZ
@given(data=st.data())
def test_structured_manifests(folder, data):
    sha = sha256_file(folder / "good.safetensors")
    manifest = data.draw(st.fixed_dictionaries(
        {"conceptgate_stack": st.sampled_from([1, 1, 1, True, 2, "1"])},
        optional={"combine": st.sampled_from(["additive", "official", "sum"]) | JSON,
                  "entries": st.lists(_entry(sha) | JSON, max_size=3) | JSON, "other": JSON}))
    _read(folder, json.dumps(manifest))


@FUZZ
@given(value=JSON)
def test_any_json(folder, value):
    _read(folder, json.dumps(value))


@FUZZ
@given(text=st.text(max_size=300))
def test_any_text(folder, text):
    _read(folder, text)

"""Fuzzing the eraser file reader (hypothesis): random bytes and mutated valid files give a loaded eraser
or an EraserFileError naming the file, never another exception; ``describe`` (``inspect``) never raises."""

import json
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conceptgate.adapters import EraserFileError, describe, layout_from_diffusers_config, load_eraser, save_eraser
from conceptgate.adapters.files import read_header
from conceptgate.adapters.synthetic import random_eraser
from tiny_models import tiny_unet

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz_files")
    layout = layout_from_diffusers_config(tiny_unet(seed=1).config)
    e = random_eraser(layout, concepts=["red triangle"], seed=1, name="good", rank=1)
    save_eraser(e, d / "good.safetensors")
    return d


def _check(path):
    try:
        load_eraser(path)
    except EraserFileError as e:
        assert os.path.basename(str(path)) in str(e)
    info, problems = describe(path)  # never raises
    assert isinstance(problems, list)
    try:
        read_header(path)
    except EraserFileError:
        pass


@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes(folder, data):
    path = folder / "random.safetensors"
    path.write_bytes(data)
    _check(path)


@FUZZ
@given(header=st.binary(max_size=400), body=st.binary(max_size=64))
def test_random_header_after_a_plausible_length(folder, header, body):
    path = folder / "plausible.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + body)
    _check(path)


@FUZZ
@given(data=st.data())
def test_mutated_valid_file(folder, data):
    good = (folder / "good.safetensors").read_bytes()
    n = struct.unpack("<Q", good[:8])[0]
    buf = bytearray(good)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip_header", "flip_any", "truncate", "insert", "length"]))
        if op == "flip_header" and min(8 + n, len(buf)) > 8:
            i = data.draw(st.integers(8, min(8 + n, len(buf)) - 1))
            buf[i] = data.draw(st.integers(0, 255))
        elif op == "flip_any" and buf:
            i = data.draw(st.integers(0, len(buf) - 1))
            buf[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "truncate":
            del buf[data.draw(st.integers(0, len(buf))):]
        elif op == "insert":
            i = data.draw(st.integers(0, len(buf)))
            buf[i:i] = data.draw(st.binary(min_size=1, max_size=16))
        elif op == "length" and len(buf) >= 8:
            buf[:8] = struct.pack("<Q", data.draw(st.one_of(st.integers(0, 2 ** 64 - 1), st.integers(0, len(buf)))))
    path = folder / "mutated.safetensors"
    path.write_bytes(bytes(buf))
    _check(path)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12)


@FUZZ
@given(entries=st.dictionaries(st.sampled_from(["lora_unet_x.alpha", "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight",
                                                "__metadata__", "conceptgate.tensor.v"]), JSON, max_size=3),
       meta=st.dictionaries(st.sampled_from(["conceptgate.format", "conceptgate.kind", "conceptgate.concepts",
                                             "conceptgate.settings", "conceptgate.name", "prompts", "alpha", "rank"]),
                            st.one_of(st.text(max_size=12), JSON.map(json.dumps)), max_size=5),
       body=st.binary(max_size=64))
def test_structured_headers(folder, entries, meta, body):
    header = dict(entries)
    header.setdefault("__metadata__", meta)
    raw = json.dumps(header).encode()
    path = folder / "structured.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    _check(path)

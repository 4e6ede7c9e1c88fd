"""Fail closed (issue 13, items 2-4): every bad input gets an error that names the file or field, and no
fault ends in an image made without an eraser that was asked for.

Files (header shape and size), manifests (paths, sha256, schema), strengths (core, manifests, webui),
the webui glue through the host stand-in (which, like the real webui, catches and only logs what script
stages raise), GatedPipeline re-entry, names in infotext / Markdown, the eraser-folder scan, weights_only.
"""

import json
import os
import resource
import struct
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from conceptgate.adapters import EraserFileError, EraserStack, describe, layout_from_diffusers_config, load_eraser, save_eraser
from conceptgate.adapters.files import MAX_HEADER_BYTES, read_header, sha256_file
from conceptgate.adapters.manifest import ManifestError
from conceptgate.adapters.synthetic import random_eraser
from tiny_models import tiny_unet

UNET = tiny_unet(seed=3)
LAYOUT = layout_from_diffusers_config(UNET.config)


def _raw(path, header, body=b""):
    data = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(data)) + data + body)
    return path


def _good(tmp_path, name="good"):
    e = random_eraser(LAYOUT, concepts=["red triangle"], seed=1, name=name)
    path = tmp_path / f"{name}.safetensors"
    save_eraser(e, path)
    return path


# ------------------------------------------------------------------ files
def test_header_that_is_a_json_list_is_named_in_load_and_inspect(tmp_path):
    path = _raw(tmp_path / "list.safetensors", [1, 2, 3])
    with pytest.raises(EraserFileError, match=r"list\.safetensors: not a safetensors file \(its header is a JSON list"):
        load_eraser(path)
    info, problems = describe(path)
    assert problems and "JSON list" in problems[0]
    from conceptgate.extension.library import Library

    usable, other = Library(str(tmp_path)).listing()  # the webui's file listing does not crash either
    assert "list" in other and "list" not in usable


def test_huge_header_is_refused_before_it_is_read(tmp_path):
    """A header claiming 2 GB (in a sparse 2 GB file): refused from its 8-byte length, nothing allocated."""
    path = tmp_path / "big.safetensors"
    n = 2_000_000_000
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n) + b"{" + b" " * 100)
        f.truncate(8 + n + 16)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    with pytest.raises(EraserFileError, match=f"claims {n} bytes, more than the format's limit of {MAX_HEADER_BYTES}"):
        load_eraser(path)
    assert time.perf_counter() - t < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 50_000  # KiB: the peak did not move


@pytest.mark.parametrize("content", [b"hello world, this is a text file\n" * 20, b"\x89PNG\r\n\x1a\n" + b"\x00" * 100,
                                     b"GIF89a....", b"\x00" * 64])
def test_a_text_file_is_not_a_safetensors_file(tmp_path, content):
    path = tmp_path / "notes.safetensors"
    path.write_bytes(content)
    with pytest.raises(EraserFileError, match="notes.safetensors: not a safetensors file"):
        load_eraser(path)


OK_ENTRY = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


@pytest.mark.parametrize("entry,message", [
    ({"dtype": "F99", "shape": [2, 2], "data_offsets": [0, 16]}, "unknown dtype"),
    ({"dtype": 5, "shape": [2, 2], "data_offsets": [0, 16]}, "unknown dtype"),
    ({"dtype": "F32", "shape": [-2, 2], "data_offsets": [0, 16]}, "shape must be"),
    ({"dtype": "F32", "shape": "22", "data_offsets": [0, 16]}, "shape must be"),
    ({"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 16]}, "shape must be"),
    ({"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 0]}, "data_offsets"),
    ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0]}, "data_offsets"),
    ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, "16"]}, "data_offsets"),
    ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}, "12 bytes for shape"),
    ({"dtype": "F32", "shape": [2, 2, 2 ** 39], "data_offsets": [0, 16]}, "bytes for shape"),
    ([1, 2], "not an object"),
])
def test_malformed_tensor_entries_are_named(tmp_path, entry, message):
    path = _raw(tmp_path / "bad.safetensors", {"lora_unet_x.alpha": entry}, b"\x00" * 16)
    with pytest.raises(EraserFileError, match=message) as err:
        load_eraser(path)
    assert "bad.safetensors" in str(err.value) and "'lora_unet_x.alpha'" in str(err.value)


@pytest.mark.parametrize("header,message", [
    ({"__metadata__": {"a": 1}, "t": OK_ENTRY}, "__metadata__"),
    ({"__metadata__": [1]}, "__metadata__"),
    (b"{" + b'"a":' * 0 + b"[" * 50_000 + b"]" * 50_000 + b"}", "unreadable header"),
    (b'{"t": NaN}', "unreadable header"),
    (b"\xff\xfe{}", "not a safetensors file"),
    ("{}".encode("utf-16"), "not a safetensors file"),
])
def test_malformed_headers_are_named(tmp_path, header, message):
    path = _raw(tmp_path / "h.safetensors", header, b"\x00" * 16)
    with pytest.raises(EraserFileError, match=message):
        load_eraser(path)
    with pytest.raises(EraserFileError):
        read_header(path)


def test_malformed_conceptgate_metadata_and_factors_are_named(tmp_path):
    good = _good(tmp_path)
    from conceptgate.adapters.files import read_safetensors

    tensors, meta = read_safetensors(good)
    for key, value, message in [("conceptgate.concepts", '"snoopy"', "list of strings"),
                                ("conceptgate.concepts", "[1, 2]", "list of strings"),
                                ("conceptgate.settings", "[]", "settings must be a JSON object"),
                                ("conceptgate.concepts", "[" * 5000, "not valid JSON")]:
        save_file(tensors, str(tmp_path / "m.safetensors"), metadata={**meta, key: value})
        with pytest.raises(EraserFileError, match=message):
            load_eraser(tmp_path / "m.safetensors")
    up = next(k for k in tensors if k.endswith("lora_up.weight"))
    for bad, message in [(torch.zeros(3), "2-D"), (torch.zeros(2, 2, dtype=torch.int32), "floating-point")]:
        save_file({**tensors, up: bad}, str(tmp_path / "f.safetensors"), metadata=meta)
        with pytest.raises(EraserFileError, match=message):
            load_eraser(tmp_path / "f.safetensors")
    alpha = next(k for k in tensors if k.endswith(".alpha"))
    save_file({**tensors, alpha: torch.ones(3)}, str(tmp_path / "a.safetensors"), metadata=meta)
    with pytest.raises(EraserFileError, match="alpha: 3 values"):
        load_eraser(tmp_path / "a.safetensors")


def test_control_characters_and_long_names_in_metadata_are_cleaned(tmp_path):
    e = random_eraser(LAYOUT, concepts=["x"], seed=1, name="evil\x1b[31m\n<b>" + "n" * 100_000)
    save_eraser(e, tmp_path / "n.safetensors")
    back = load_eraser(tmp_path / "n.safetensors")
    assert len(back.name) <= 200 and "\x1b" not in back.name and "\n" not in back.name


# ------------------------------------------------------------------ manifests
def _manifest(tmp_path, entries, name="m.json", **top):
    path = tmp_path / name
    path.write_text(json.dumps({"conceptgate_stack": 1, "entries": entries, **top}))
    return path


def _entry(path, **kw):
    return {"file": os.path.basename(path), "sha256": sha256_file(path), **kw}


@pytest.fixture
def opened(monkeypatch):
    """Every file the manifest reader hashes or loads."""
    from conceptgate.adapters import manifest

    seen = []
    real_sha, real_load = manifest.sha256_file, manifest.load_eraser
    monkeypatch.setattr(manifest, "sha256_file", lambda p: seen.append(os.path.realpath(p)) or real_sha(p))
    monkeypatch.setattr(manifest, "load_eraser", lambda p, **k: seen.append(os.path.realpath(p)) or real_load(p, **k))
    return seen


def test_manifest_paths_are_confined_and_outside_files_never_opened(tmp_path, opened):
    outside = tmp_path / "outside"
    inside = tmp_path / "presets"
    outside.mkdir()
    inside.mkdir()
    secret = _good(outside, "secret")
    digest = sha256_file(secret)
    os.symlink(secret, inside / "link.safetensors")
    cases = {"absolute": str(secret), "dotdot": "../outside/secret.safetensors", "symlink": "link.safetensors",
             "passwd": "/etc/passwd", "home": "~/x.safetensors"}
    for why, file in cases.items():
        path = _manifest(inside, [{"file": file, "sha256": digest}], name=f"{why}.json")
        with pytest.raises(ManifestError, match=r"entries\[0\]\.file") as err:
            EraserStack.from_manifest(path)
        assert f"{why}.json" in str(err.value), why
        assert "size" not in str(err.value)
    assert not [p for p in opened if p.startswith(str(outside))]
    # the configured eraser folders are allowed, and a/../b inside the folder is fine
    path = _manifest(inside, [{"file": "../outside/secret.safetensors", "sha256": digest}], name="ok.json")
    assert len(EraserStack.from_manifest(path, search_dirs=[str(outside)])) == 1
    (inside / "sub").mkdir()
    good = _good(inside, "good")
    path = _manifest(inside, [{"file": "sub/../good.safetensors", "sha256": sha256_file(good)}], name="ok2.json")
    assert len(EraserStack.from_manifest(path)) == 1


def test_manifest_needs_sha256_unless_explicitly_allowed(tmp_path):
    good = _good(tmp_path)
    for entry in ({"file": "good.safetensors"}, {"file": "good.safetensors", "sha256": ""},
                  {"file": "good.safetensors", "sha256": None}):
        path = _manifest(tmp_path, [entry])
        with pytest.raises(ManifestError, match=r"m\.json: entries\[0\]\.sha256: missing"):
            EraserStack.from_manifest(path)
        assert len(EraserStack.from_manifest(path, allow_unhashed=True)) == 1
    path = _manifest(tmp_path, [{"file": "good.safetensors", "sha256": "abc"}])
    with pytest.raises(ManifestError, match=r"entries\[0\]\.sha256: must be 64"):
        EraserStack.from_manifest(path)
    path = _manifest(tmp_path, [{"file": "good.safetensors", "sha256": "0" * 64}])
    with pytest.raises(EraserFileError, match="sha256 differs"):
        EraserStack.from_manifest(path)
    assert sha256_file(good)  # untouched


@pytest.mark.parametrize("change,message", [
    ({"enabled": "false"}, r"entries\[0\]\.enabled: must be true or false"),
    ({"enabled": 0}, r"entries\[0\]\.enabled"),
    ({"strength": "1"}, r"entries\[0\]\.strength: strength must be a number"),
    ({"strength": -1}, r"entries\[0\]\.strength: strength -1 is not a finite number in \[0, 10\]"),
    ({"strength": 11}, r"entries\[0\]\.strength"),
    ({"strength": True}, r"entries\[0\]\.strength"),
    ({"strength": 10 ** 400}, r"entries\[0\]\.strength"),
    ({"concepts": "snoopy"}, r"entries\[0\]\.concepts: must be a list of strings"),
    ({"concepts": ["ok", 3]}, r"entries\[0\]\.concepts\[1\]"),
    ({"gate": ["ft"]}, r"entries\[0\]\.gate: must be an object"),
    ({"gate": {"rule": "nope"}}, r"entries\[0\]\.gate: unknown gate rule"),
    ({"gate": {"rules": "ft"}}, r"entries\[0\]\.gate\.rules: unknown field"),
    ({"gate": {"cond_only": "yes"}}, r"entries\[0\]\.gate\.cond_only: must be true or false"),
    ({"gate": {"threshold": [1]}}, r"entries\[0\]\.gate\.threshold"),
    ({"enable": False}, r"entries\[0\]\.enable: unknown field"),
    ({"file": 5}, r"entries\[0\]\.file: must be a non-empty relative path"),
    ({"name": "x\x00y"}, r"entries\[0\]\.name"),
])
def test_manifest_schema_errors_name_the_field(tmp_path, change, message):
    good = _good(tmp_path)
    path = _manifest(tmp_path, [_entry(good), {**_entry(good), **change}])
    with pytest.raises(ManifestError, match=message.replace(r"\[0\]", r"\[1\]")) as err:
        EraserStack.from_manifest(path)
    assert "m.json" in str(err.value)


@pytest.mark.parametrize("text,message", [
    ('{"conceptgate_stack": 1, "entries": [{"file": "good.safetensors", "strength": NaN}]}', "NaN is not allowed"),
    ('{"conceptgate_stack": 1, "entries": [{"file": "good.safetensors", "strength": Infinity}]}', "Infinity"),
    ('{"conceptgate_stack": 1, "entries": [{"file": "good.safetensors", "strength": 1e309}]}', r"entries\[0\]\.strength"),
    ('[1, 2]', "a JSON list, not an object"),
    ('{"conceptgate_stack": true, "entries": []}', "conceptgate_stack"),
    ('{"conceptgate_stack": 1, "entries": {"file": "x"}}', "entries: must be a list"),
    ('{"conceptgate_stack": 1, "entries": [["x"]]}', r"entries\[0\]: must be an object"),
    ('{"conceptgate_stack": 1, "entries": [{"sha256": "00"}]}', r"entries\[0\]\.file: missing"),
    ('{"conceptgate_stack": 1, "combine": "sum", "entries": []}', "combine: must be one of"),
    ('{"conceptgate_stack": 1, "combine": ["additive"], "entries": []}', "combine"),
    ('{"conceptgate_stack": 1, "entries": []' + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply|unknown field"),
    ("[" * 200_000, "nested too deeply|not a JSON"),
    ('{"conceptgate_stack": 1, "entries": [' + "{}, " * 300 + "{}]}", "at most 256"),
    ("\xff\xfe", "not UTF-8|not a JSON"),
])
def test_malformed_manifests_give_errors_not_tracebacks(tmp_path, text, message):
    _good(tmp_path)
    path = tmp_path / "m.json"
    path.write_bytes(text.encode("latin-1") if text.startswith("\xff") else text.encode())
    with pytest.raises(EraserFileError, match=message) as err:
        EraserStack.from_manifest(path)
    assert "m.json" in str(err.value)


def test_manifest_round_trip_keeps_values_and_refuses_negative_strength_on_write(tmp_path):
    good = load_eraser(_good(tmp_path))
    stack = EraserStack(combine="official").with_eraser(good, strength=0.5).with_entry(0, enabled=False)
    stack.to_manifest(tmp_path / "p.json")
    back = EraserStack.from_manifest(tmp_path / "p.json")
    assert back.combine == "official" and back.entries[0].strength == 0.5 and back.entries[0].enabled is False
    assert back.entries[0].gate == stack.entries[0].gate
    with pytest.raises(ValueError, match=r"\[0, 10\]"):
        EraserStack().with_eraser(good, strength=-1.0).to_manifest(tmp_path / "neg.json")


# ------------------------------------------------------------------ strengths in the core
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e309, 11.0, -10.5])
def test_stack_entries_refuse_non_finite_or_out_of_range_strength(bad):
    e = random_eraser(LAYOUT, concepts=["x"], seed=1, name="x")
    with pytest.raises(ValueError, match="strength"):
        EraserStack().with_eraser(e, strength=bad)
    with pytest.raises(ValueError, match="strength"):
        EraserStack().with_eraser(e).with_entry(0, strength=bad)
    assert EraserStack().with_eraser(e, strength=-1.0).entries[0].strength == -1.0  # a graph may amplify on purpose


# ------------------------------------------------------------------ webui params and names
def test_webui_strengths_are_finite_non_negative_and_bounded():
    from conceptgate.extension import params

    for text in ("nan", "inf", "-inf", "1e309", "-2", "-0.5", "10.5"):
        with pytest.raises(params.InputError, match="strength"):
            params.tag_params(["tri", text])
        with pytest.raises(params.InputError, match="strength"):
            params.ScriptArgs.from_args([True, f"tri:{text}"])
        with pytest.raises(params.InputError, match="strength"):
            params.ScriptArgs.from_args([{"erasers": [["tri", float(text)]]}])
    assert params.tag_params(["tri", "0"]) == ("tri", 0.0)
    for bad in ([True, 5], [True, [["a", "x"]]], [True, "", 3], [True, "", "None", ["additive"]]):
        with pytest.raises(params.InputError):
            params.ScriptArgs.from_args(bad)


def test_names_with_separators_html_and_control_characters_round_trip_the_infotext():
    from conceptgate.extension import params

    names = ["a,b", "x:y:z", "50%", 'q"uote', "<img src=x onerror=alert(1)>", "tab\tnew\nline\x1b", "ünï ✓"]
    used = [params.UsedEraser(n, 0.5, 0.25, f"{i:02d}" * 32) for i, n in enumerate(names)]
    args = params.ScriptArgs(True, [(n, 0.5) for n in names])
    info = params.infotext_params(used, args)
    assert "<" not in info["ConceptGate"] and "\n" not in info["ConceptGate"] and "\x1b" not in info["ConceptGate"]
    assert [u[0] for u in params.parse_used(info["ConceptGate"])] == names
    assert list(params.parse_hashes(info["ConceptGate hashes"])) == names
    assert params.restore(info).erasers == [(n, 0.5) for n in names]
    assert params.parse_selection(params.format_selection(args.erasers)) == args.erasers
    long = "n" * 100_000
    info = params.infotext_params([params.UsedEraser(long, 1.0, 0.5, "ab" * 32)], args)
    assert len(info["ConceptGate"]) < 300 and len(info["ConceptGate hashes"]) < 300
    (name, _, _), = params.parse_used(info["ConceptGate"])
    restored = params.restore(info, rename=lambda n, h: long if h == "ab" * 6 else None)
    assert restored.erasers == [(long, 1.0)]  # a cut name is found again by its hash


def test_markdown_text_escapes_markup():
    from conceptgate.extension.params import markdown_text

    out = markdown_text("<script>alert(1)</script> `x` [a](javascript:x) **b**\x1b" + "z" * 100_000)
    assert "<script>" not in out and "](" not in out and "\x1b" not in out and len(out) < 500
    assert "\\<script\\>" in out


def test_eraser_folder_scan_survives_a_symlink_loop(tmp_path):
    from conceptgate.extension.library import Library

    (tmp_path / "a" / "b").mkdir(parents=True)
    os.symlink(tmp_path / "a", tmp_path / "a" / "b" / "loop")
    os.symlink(tmp_path, tmp_path / "a" / "up")
    e = random_eraser(LAYOUT, concepts=["x"], seed=1, name="x")
    save_eraser(e, tmp_path / "a" / "b" / "x.safetensors")
    t = time.perf_counter()
    files = Library(str(tmp_path)).eraser_files()
    assert time.perf_counter() - t < 5
    assert list(files) == ["a/b/x"]


# ------------------------------------------------------------------ GatedPipeline re-entry
def _pipe(unet):
    tok = SimpleNamespace(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, unk_token_id=49407)
    return SimpleNamespace(unet=unet, tokenizer=tok, text_encoder=None)


def _hooks(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_gated_pipeline_refuses_re_entry_and_leaves_no_hook():
    from conceptgate.adapters.diffusers_host import GatedPipeline

    unet = tiny_unet(seed=4)
    stack = EraserStack().with_eraser(random_eraser(LAYOUT, concepts=["x"], seed=1, name="x"))
    gated = GatedPipeline(_pipe(unet), stack)
    with gated:
        n = _hooks(unet)
        assert n > 0
        with pytest.raises(RuntimeError, match="already entered"):
            with gated:
                pass
        assert _hooks(unet) == n
        other = GatedPipeline(_pipe(unet), stack)
        with pytest.raises(RuntimeError, match="another GatedPipeline"):
            with other:
                pass
        assert _hooks(unet) == n
    assert _hooks(unet) == 0
    with GatedPipeline(_pipe(unet), stack):  # the UNet is free again
        pass
    assert _hooks(unet) == 0


# ------------------------------------------------------------------ weights_only resume
def test_toyworld_checkpoints_load_with_weights_only(tmp_path):
    from conceptgate.toyworld.train import Ckpt

    ck = Ckpt(str(tmp_path))
    m = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(m.parameters())
    m(torch.ones(1, 2)).sum().backward()
    opt.step()
    ck.save("x_partial", {"models": {"m": m.state_dict()}, "opt": opt.state_dict(), "step": 3,
                          "stats": {"seconds": 1.5, "stopped_early_at": None}})
    st = ck.load("x_partial")
    assert st["step"] == 3 and torch.equal(st["models"]["m"]["weight"], m.weight)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, ck.path("evil"))
    with pytest.raises(Exception, match="[Ww]eights only|weights_only"):
        ck.load("evil")


def test_pyproject_sets_a_torch_lower_bound_with_weights_only_default():
    import re

    text = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")).read()
    m = re.search(r'"torch>=(\d+)\.(\d+)"', text)
    assert m and (int(m.group(1)), int(m.group(2))) >= (2, 6)
    assert "hypothesis" in text


# ------------------------------------------------------------------ the webui glue fails closed
# The stand-in's script runner, extra-network activation and CFG callbacks catch and only log exceptions,
# as the real webui does; so an error must stop the generation by other means (state.fail_closed).
import a1111_stub  # noqa: E402
from test_a1111_webui import Host, world  # noqa: E402,F401  (module fixture)
from test_a1111_forge import ForgeHost  # noqa: E402

HOSTS = ["a1111", "forge", "forge-legacy"]


def _host(kind, world, processing):
    return Host(world, processing) if kind == "a1111" else ForgeHost(world, processing, legacy=kind == "forge-legacy")


def _reported():
    return [e for _, e in sys.modules["modules.scripts"].REPORTED] + \
        [e for _, e in sys.modules["modules.extra_networks"].REPORTED] + \
        [e for _, e in sys.modules["modules.script_callbacks"].REPORTED]


def _clean(h):
    dm = h.sd_model.model.diffusion_model
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in dm.modules())


@pytest.mark.parametrize("kind", HOSTS)
def test_unknown_names_and_bad_strengths_stop_the_generation(world, kind):
    from conceptgate.extension.params import InputError

    off = [False, "", "None", "additive", "ft", False]
    with a1111_stub.installed(kind) as processing:
        h = _host(kind, world, processing)
        cases = [
            ("a red triangle", [True, "nope:1", "None", "additive", "ft", False], EraserFileError, "no eraser named 'nope'"),
            ("a red triangle", [{"erasers": "tri:1, nope"}], EraserFileError, "no eraser named 'nope'"),
            ("a red triangle", [True, "tri:1", "missing.json", "additive", "ft", False], EraserFileError, "no stack preset"),
            ("a red triangle <erase:nope:1>", off, EraserFileError, "no eraser named 'nope'"),
            ("a red triangle <erase:tri:nan>", off, InputError, "strength"),
            ("a red triangle <erase:tri:1e309>", off, InputError, "strength"),
            ("a red triangle <erase:tri:-2>", off, InputError, "strength"),
            ("a red triangle", [True, "tri:inf", "None", "additive", "ft", False], InputError, "strength"),
            ("a red triangle", [True, "tri:-1", "None", "additive", "ft", False], InputError, "strength"),
        ]
        for prompt, args, error, message in cases:
            n = len(_reported())
            with pytest.raises(error, match=message):
                h.run(prompt, args)
            assert len(_reported()) > n, (prompt, args)  # the host itself swallowed it: fail_closed stopped it
            assert _clean(h)
        p, processed = h.run("a red triangle", [True, "tri:1", "None", "additive", "ft", False])  # next one works
        assert len(processed.images) == 1 and "tri:1:" in p.extra_generation_params["ConceptGate"]
        assert _clean(h)


@pytest.mark.parametrize("kind", HOSTS)
def test_a_non_finite_gate_stops_the_generation(world, kind, monkeypatch):
    from conceptgate.adapters import stack as stack_mod

    real = stack_mod.EraserStack.gates

    def nan_gates(self, *a, **k):
        coeffs, report = real(self, *a, **k)
        return torch.full_like(coeffs, float("nan")), report

    with a1111_stub.installed(kind) as processing:
        h = _host(kind, world, processing)
        monkeypatch.setattr(stack_mod.EraserStack, "gates", nan_gates)
        with pytest.raises(ValueError, match="gate of 'tri' is not a finite number"):
            h.run(["a red triangle", "a blue circle"], [True, "tri:1", "None", "additive", "ft", False], batch_size=2)
        monkeypatch.setattr(stack_mod.EraserStack, "gates", real)
        assert _clean(h)
        p, processed = h.run("a red triangle", [True, "tri:1", "None", "additive", "ft", False])
        assert len(processed.images) == 1 and _clean(h)


@pytest.mark.parametrize("rule", ["ft", "cos", "tokens", "context", "always"])
@pytest.mark.parametrize("kind", ["forge", "forge-legacy"])
def test_forge_batch_of_two_has_finite_gates(world, kind, rule):
    """Issue 14 measured gate NaN for a Forge batch of 2 with ft and cos (the gate code was rewritten since);
    every rule, both Forge lines: finite, the same as a batch of one per image, the batch's strongest applied."""
    a = [True, "tri:1, circ:1", "None", "additive", rule, False]
    with a1111_stub.installed(kind) as processing:
        h = _host(kind, world, processing)
        p, processed = h.run(["a red triangle", "a blue circle"], a, batch_size=2)
        assert len(processed.images) == 2
        text = p.extra_generation_params["ConceptGate"]
        gates = p.conceptgate.image_gates
        assert "nan" not in text and gates.isfinite().all(), text
        for i, prompt in enumerate(["a red triangle", "a blue circle"]):
            single, _ = h.run([prompt], a)
            assert torch.allclose(single.conceptgate.image_gates[0], gates[i], atol=1e-5), (prompt, rule)
        assert torch.equal(p.conceptgate.batch_images["coeffs"][0], gates.max(0).values)


def test_erase_tags_without_the_registered_network_stop_the_generation(world):
    with a1111_stub.installed("a1111") as processing:
        h = Host(world, processing)
        h.extra_networks.initialize()  # another extension cleared the registry after us
        with pytest.raises(RuntimeError, match="'erase' extra network is not registered"):
            h.run("a red triangle <erase:tri:1>", [False, "", "None", "additive", "ft", False])

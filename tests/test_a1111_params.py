"""The webui glue's pure rules: script arguments, <erase:...> items, infotext fields, prompt words,
the eraser folder, and the entry module importing the checkout when `conceptgate` is not installed."""

import os
import subprocess
import sys

import pytest

from conceptgate.extension import params, text
from conceptgate.extension.library import Library, default_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_selection_strings():
    assert params.parse_selection("a:1, b c:0.5, d,, e:-0.25") == [("a", 1.0), ("b c", 0.5), ("d", 1.0), ("e", -0.25)]
    assert params.format_selection([("a", 1.0), ("b c", 0.5)]) == "a:1, b c:0.5"
    with pytest.raises(ValueError, match="bad strength"):
        params.parse_selection("a:b:c")


def test_tag_items():
    assert params.tag_params(["snoopy"]) == ("snoopy", 1.0)
    assert params.tag_params(["snoopy", "0.4"]) == ("snoopy", 0.4)
    assert params.tags_in("x <lora:a:1> <erase:b:0.5> <erase:c>") == [("b", 0.5), ("c", 1.0)]
    with pytest.raises(ValueError):
        params.tag_params(["", "1"])


def test_script_args_list_dict_and_validation():
    a = params.ScriptArgs.from_args([True, "a:0.5", "p.json", "official", "cos", True])
    assert a == params.ScriptArgs(True, [("a", 0.5)], "p.json", "official", "cos", True)
    assert params.ScriptArgs.from_args(a.to_args()) == a
    assert params.ScriptArgs.from_args([{"erasers": "a:0.5", "combine": "official"}]).enabled is True
    assert params.ScriptArgs.from_args([]) == params.ScriptArgs()
    with pytest.raises(ValueError, match="combine"):
        params.ScriptArgs.from_args([True, "", "None", "sum"])


def test_infotext_params_and_restore():
    used = [params.UsedEraser("tri", 0.8, 0.9123, "ab" * 32), params.UsedEraser("circ", 1.0, None, None),
            params.UsedEraser("tag", 0.5, 0.1, "cd" * 32)]
    args = params.ScriptArgs(True, [("tri", 0.8)], "both.json", "official", "context", True)  # the default rule
    p = params.infotext_params(used, args)
    assert p == {"ConceptGate": "tri:0.8:0.912, circ:1:off, tag:0.5:0.100",
                 "ConceptGate hashes": f"tri: {'ab' * 6}, tag: {'cd' * 6}", "ConceptGate preset": "both.json",
                 "ConceptGate combine": "official", "ConceptGate cond only": "True"}
    pasted = dict(p, Prompt="a cat <erase:tag:0.5>")
    r = params.restore(pasted, rename=lambda n, h: "tri_v2" if h == "ab" * 6 else n)
    assert r == params.ScriptArgs(True, [("tri_v2", 0.8)], "both.json", "official", "context", True)
    assert params.restore({"Prompt": "x"}) == params.ScriptArgs()
    assert params.infotext_params([], args) == {}


def test_prompt_words_and_and_parts():
    assert text.subprompts("a cat AND a dog :1.2 AND ANDROID") == ["a cat", "a dog", "ANDROID"]
    assert text.plain_words("(van gogh:1.3), [starry:night:0.5] BREAK ((sky)) \\(x\\)") == "van gogh , starry night sky x"


def test_library_listing(tmp_path):
    from conceptgate.adapters import reference_layout, save_eraser
    from conceptgate.adapters.eraser import Eraser
    from conceptgate.adapters.synthetic import random_eraser

    (tmp_path / "styles").mkdir()
    save_eraser(random_eraser(reference_layout("sd1"), which="attn2_kv", name="a"), tmp_path / "styles" / "a.safetensors")
    save_eraser(Eraser(name="g", kind="guidance", concepts=["c"], method="abo"), tmp_path / "g.safetensors")
    (tmp_path / "stack.json").write_text("{}")
    lib = Library(str(tmp_path))
    usable, other = lib.listing()
    assert usable == ["g", "styles/a"] and not other  # guidance erasers are reachable in the webui now
    assert lib.presets() == {"stack.json": str(tmp_path / "stack.json")}
    assert lib.path_of("a") == lib.path_of("styles/a")
    assert lib.load("a").name == "a" or lib.load("a").name == "styles/a"
    assert default_folder("/w/models", "") == os.path.join("/w/models", "conceptgate")
    assert default_folder("/w/models", "~/cg") == os.path.expanduser("~/cg")


def test_entry_module_loads_the_checkout_when_conceptgate_is_not_importable():
    code = f"""
import sys, importlib.util
sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]
sys.path_hooks[:] = [h for h in sys.path_hooks if 'editable' not in getattr(h, '__module__', '')]
sys.path_importer_cache.clear()
sys.path[:] = [p for p in sys.path if p not in ('', {ROOT!r})]
assert importlib.util.find_spec('conceptgate') is None
sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
import a1111_stub
with a1111_stub.installed('a1111'):
    entry = a1111_stub.load_entry_script()
    import conceptgate, conceptgate.adapters
    print(conceptgate.__file__, entry.ConceptGateScript.__module__)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [os.path.join(ROOT, "__init__.py"), "conceptgate.extension.script"]


def test_stub_is_removed_after_use():
    import a1111_stub

    with a1111_stub.installed("a1111"):
        a1111_stub.load_entry_script()
        assert "modules.scripts" in sys.modules
    assert not [m for m in sys.modules if m.split(".")[0] in ("modules", "backend", "ldm_patched", "gradio")]
    assert not [m for m in sys.modules if m.startswith("conceptgate.extension.") or m == "conceptgate_webui"]

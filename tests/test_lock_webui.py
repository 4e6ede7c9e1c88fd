"""The operator lock in the webuis, through the host stand-in's call sequence (issue 13): with a policy in
force, unticking the accordion, ``<erase:x:0>``, API arguments without the eraser and a Forge batch of
2 all keep the locked eraser (the image equals the directly erased one, or an error stops the generation);
users may add erasers or raise the locked one; the infotext says ``locked``; a broken policy stops every
generation with its reason."""

import json
import sys

import pytest
import torch

import a1111_stub
from conceptgate.adapters.files import sha256_file
from test_a1111_webui import Host, world  # noqa: F401  (module fixture)
from test_a1111_forge import ForgeHost
from test_fail_closed import _clean, _reported

OFF = [False, "", "None", "additive", "tokens", False]


def args(erasers):
    return [True, erasers, "None", "additive", "tokens", False]


@pytest.fixture
def policy(world, tmp_path, monkeypatch):
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"conceptgate_policy": 1, "search_dirs": [world["folder"]], "locked": [
        {"file": "tri.safetensors", "sha256": sha256_file(f"{world['folder']}/tri.safetensors"), "strength": 1.0,
         "gate": {"rule": "tokens"}}]}))
    monkeypatch.setenv("CONCEPTGATE_POLICY", str(path))
    return path


@pytest.fixture(scope="module")
def refs(world):
    import os

    os.environ["CONCEPTGATE_POLICY"] = ""
    try:
        with a1111_stub.installed("a1111") as processing:
            h = Host(world, processing)
            out = {
                "unerased": h.run("a red triangle", OFF)[1].images[0],
                "erased": h.run("a red triangle", args("tri:1"))[1].images[0],
                "both": h.run("a red triangle", args("tri:1, circ:1"))[1].images[0],
                "raised": h.run("a red triangle", args("tri:1.5"))[1].images[0],
            }
    finally:
        del os.environ["CONCEPTGATE_POLICY"]
    assert (out["erased"] - out["unerased"]).abs().max() > 1e-3
    return out


def test_a1111_nothing_a_user_sends_removes_the_locked_eraser(world, refs, policy):
    with a1111_stub.installed("a1111") as processing:
        h = Host(world, processing)
        for prompt, a in [("a red triangle", OFF),  # accordion unticked
                          ("a red triangle <erase:tri:0>", OFF),  # a tag at strength 0
                          ("a red triangle", args("tri:0")),  # the accordion at strength 0
                          ("a red triangle", [{"enabled": False, "erasers": ""}]),  # API args without it
                          ("a red triangle", [{"erasers": "tri:0"}])]:
            p, processed = h.run(prompt, a)
            assert torch.allclose(processed.images[0], refs["erased"], atol=1e-5), (prompt, a)
            assert p.extra_generation_params["ConceptGate locked"] == "tri"
            assert "tri:1:" in p.extra_generation_params["ConceptGate"]
            assert _clean(h)


def test_a1111_users_may_add_erasers_or_raise_the_locked_one(world, refs, policy):
    with a1111_stub.installed("a1111") as processing:
        h = Host(world, processing)
        p, processed = h.run("a red triangle", [{"erasers": "circ:1"}])
        assert torch.allclose(processed.images[0], refs["both"], atol=1e-5)
        p, processed = h.run("a red triangle <erase:tri:1.5>", OFF)
        assert torch.allclose(processed.images[0], refs["raised"], atol=1e-5)
        assert "tri:1.5:" in p.extra_generation_params["ConceptGate"]


def test_negative_strength_and_unknown_names_are_errors_under_the_lock(world, policy):
    from conceptgate.adapters import EraserFileError
    from conceptgate.extension.params import InputError

    with a1111_stub.installed("a1111") as processing:
        h = Host(world, processing)
        for prompt, a, error in [("a red triangle <erase:tri:-2>", OFF, InputError),
                                 ("a red triangle", args("nope:1"), EraserFileError)]:
            n = len(_reported())
            with pytest.raises(error):
                h.run(prompt, a)
            assert len(_reported()) > n and _clean(h)


@pytest.mark.parametrize("kind", ["forge", "forge-legacy"])
def test_forge_batch_of_two_keeps_the_locked_eraser(world, policy, kind):
    with a1111_stub.installed(kind) as processing:
        h = ForgeHost(world, processing, legacy=kind == "forge-legacy")
        p, processed = h.run(["a red triangle", "a blue circle"], OFF, batch_size=2)
        assert len(processed.images) == 2
        state = p.conceptgate
        assert [(e.eraser.name, e.strength, e.locked) for e in state.stack.entries] == [("tri", 1.0, True)]
        assert state.image_gates.isfinite().all() and state.image_gates[0, 0] == 1.0  # the strongest gate of the batch
        assert state.forge_files, "no patch was put on the UNet"
        assert p.extra_generation_params["ConceptGate locked"] == "tri"


@pytest.mark.parametrize("kind", ["a1111", "forge"])
def test_broken_policy_stops_every_generation(world, policy, kind):
    from conceptgate.adapters.policy import PolicyError

    data = json.loads(policy.read_text())
    data["locked"][0]["sha256"] = "0" * 64
    policy.write_text(json.dumps(data))
    with a1111_stub.installed(kind) as processing:
        h = Host(world, processing) if kind == "a1111" else ForgeHost(world, processing)
        n = len(_reported())
        with pytest.raises(PolicyError, match="sha256 differs"):
            h.run("a green square", OFF)
        assert len(_reported()) > n and _clean(h)


def test_accordion_shows_locked_entries_greyed(world, policy):
    with a1111_stub.installed("a1111") as processing:
        h = Host(world, processing)
        import gradio as gr

        from conceptgate.extension import ui

        created = []
        real = gr.Checkbox.__init__

        def spy(self, *a, **k):
            created.append((a, k))
            real(self, *a, **k)

        gr.Checkbox.__init__ = spy
        try:
            ui.build(h.script, False)
        finally:
            gr.Checkbox.__init__ = real
        locked = [(a, k) for a, k in created if "locked" in k.get("label", "")]
        assert locked and locked[0][1]["interactive"] is False and locked[0][0][0] is True
        assert not [1 for a, k in created if k.get("label") == "tri"]  # no free toggle for it


# ------------------------------------------------------------------ locked Geom-Erasing and All-but-One erasers
from test_a1111_mechanisms import kinds  # noqa: E402,F401  (module fixture: wm, abo_tri, abo_circ in the folder)


@pytest.fixture
def policy_kinds(world, kinds, tmp_path, monkeypatch):
    """The operator locks a Geom-Erasing eraser (its own rule: always) and an All-but-One guidance eraser."""
    folder = world["folder"]
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"conceptgate_policy": 1, "search_dirs": [folder], "locked": [
        {"file": "wm.safetensors", "sha256": sha256_file(f"{folder}/wm.safetensors"), "gate": {"rule": "always"}},
        {"file": "abo_tri.safetensors", "sha256": sha256_file(f"{folder}/abo_tri.safetensors"),
         "gate": {"rule": "always"}}]}))
    monkeypatch.setenv("CONCEPTGATE_POLICY", str(path))
    return path


def _host(kind, world, processing):
    return Host(world, processing) if kind == "a1111" else ForgeHost(world, processing, legacy=kind == "forge-legacy")


@pytest.mark.parametrize("kind", ["a1111", "forge", "forge-legacy"])
def test_locked_geom_and_abo_erasers_act_whatever_the_user_sends(world, kinds, policy_kinds, kind, monkeypatch):
    direct = [True, "wm:1, abo_tri:1", "None", "additive", "always", False]  # the locked entries' rules
    with a1111_stub.installed(kind) as processing:
        h = _host(kind, world, processing)
        seen = []
        sys.modules["modules.script_callbacks"].on_cfg_denoiser(
            lambda prm: seen.append((prm.x.shape[0], (prm.text_uncond["crossattn"] if isinstance(prm.text_uncond, dict)
                                                      else prm.text_uncond).shape[1])))
        results = []
        for prompt, a in [("a red triangle", OFF), ("a red triangle <erase:wm:0> <erase:abo_tri:0>", OFF),
                          ("a red triangle", [{"erasers": "wm:0, abo_tri:0"}])]:
            seen.clear()
            p, processed = h.run(prompt, a)
            assert p.extra_generation_params["ConceptGate locked"] == "wm, abo_tri"
            fields = sys.modules["modules.infotext_utils"].parse_generation_parameters(processed.infotexts[0])
            assert fields["ConceptGate Geom"] == "wm" and fields["ConceptGate All-but-One"] == "abo_tri:triangle>square"
            assert all(length == 154 for _, length in seen)  # the tokens joined the negative at every step
            if kind == "a1111":
                assert all(rows == 4 for rows, _ in seen)  # cond + erase + alternative + uncond rows
            else:
                assert len(p.sampled_unets[0].model_options["sampler_post_cfg_function"]) == 1
            results.append(processed.images[0])
            assert _clean(h)
        monkeypatch.setenv("CONCEPTGATE_POLICY", "")
        _, ref = h.run("a red triangle", direct)
        for img in results:
            assert torch.allclose(img, ref.images[0], atol=1e-5)  # equal to the directly erased image
        _, plain = h.run("a red triangle", OFF)
        assert not torch.allclose(plain.images[0], ref.images[0], atol=1e-3)

"""The AUTOMATIC1111 glue, replayed against the host stand-in (tests/a1111_stub) on a real tiny LDM UNet.

Checks: the entry module and registrations; per-row outputs of every UNet call equal a hand merge
W + m * delta for that row's gate, in every CFG batch layout A1111 produces; weights untouched and
hooks gone after postprocess; <erase:...> next to <lora:...>; the infotext round trip; the same
gate and delta as the ComfyUI path.
"""

import copy
import os
import sys

import pytest
import torch

import a1111_stub
from conceptgate.adapters import EraserStack, GateSettings, dense_deltas, layout_from_diffusers_config, save_eraser
from conceptgate.adapters.gate import to_window
from conceptgate.adapters.synthetic import random_eraser
from tiny_models import tiny_text_encoder, tiny_unet

TOL = 1e-4


@pytest.fixture(scope="module")
def world(comfy, tmp_path_factory):
    from transformers import CLIPTokenizer
    from conceptgate.nodes import comfy_models

    unet = tiny_unet(seed=5)
    te = tiny_text_encoder(seed=5)
    tok = CLIPTokenizer.from_pretrained(os.path.join(comfy, "comfy", "sd1_tokenizer"))
    layout = layout_from_diffusers_config(unet.config)
    models = tmp_path_factory.mktemp("models")
    folder = models / "conceptgate"
    folder.mkdir()
    tri = random_eraser(layout, concepts=["red triangle"], seed=11, scale=0.25, name="tri")
    circ = random_eraser(layout, concepts=["blue circle"], seed=12, scale=0.25, name="circ")
    save_eraser(tri, folder / "tri.safetensors")
    save_eraser(circ, folder / "circ.safetensors")
    model = comfy_models.unet_to_comfy(unet)
    return {"unet": unet, "te": te, "tok": tok, "models": str(models), "folder": str(folder),
            "model": model, "clip": comfy_models.text_encoder_to_comfy(te), "cache": {}}


class Host:
    """The stand-in webui with the extension loaded, in the webui's order."""

    def __init__(self, world, processing, kind="a1111", sdxl=False):
        from a1111_stub.models import A1111Model

        self.world = world
        self.processing = processing
        self.shared = sys.modules["modules.shared"]
        self.callbacks = sys.modules["modules.script_callbacks"]
        self.extra_networks = sys.modules["modules.extra_networks"]
        self.shared.models_path = world["models"]
        self.entry = a1111_stub.load_entry_script()  # scripts are loaded ...
        self.extra_networks.initialize()  # ... then initialize() clears the extra-network registry ...
        self.callbacks.ui_settings_callback()
        self.callbacks.before_ui_callback()  # ... then on_before_ui
        self.script = self.entry.ConceptGateScript()
        self.script.args_from, self.script.args_to = 0, 6
        self.dm = copy.deepcopy(world["model"].model.diffusion_model)
        self.sd_model = A1111Model(self.dm, world["te"], world["tok"], sdxl=sdxl)
        self.shared.sd_model = self.sd_model

    def run(self, prompt, args, **kw):
        from modules.scripts import ScriptRunnerStub

        p = self.processing.StableDiffusionProcessing(prompt, sd_model=self.sd_model, scripts=ScriptRunnerStub([self.script]),
                                                      script_args=args, **kw)
        return p, self.processing.process_images(p)


@pytest.fixture
def host(world):
    with a1111_stub.installed("a1111") as processing:
        yield Host(world, processing)


# ------------------------------------------------------------------ expectations, computed by hand
_EXPECTED = {}


def expected_coeffs(world, text, erasers, strengths):
    key = (text, tuple(e.sha256 for e in erasers), tuple(strengths))
    if key not in _EXPECTED:
        _EXPECTED[key] = _expected_coeffs(world, text, erasers, strengths)
    return _EXPECTED[key]


def _expected_coeffs(world, text, erasers, strengths):
    """strength x FT gate of one (sub)prompt: cosine on the host's first 77-token window, token share
    of the prompt's words, max over each eraser's concepts (written out, not through the glue)."""
    from a1111_stub.models import A1111Model

    model = A1111Model(None, world["te"], world["tok"])
    def enc(t):
        hidden = model.get_learned_conditioning([t])
        words = t.replace("BREAK", " ")
        ids = world["tok"]([words], add_special_tokens=False)["input_ids"][0]
        return to_window(hidden), set(ids)
    ph, pt = enc(text)
    out = []
    for e, s in zip(erasers, strengths):
        best = 0.0
        for c in e.concepts:
            ch, ct = enc(c)
            cos = torch.nn.functional.cosine_similarity(ph.flatten(), ch.flatten(), dim=0).item()
            best = max(best, cos, len(pt & ct) / len(ct))
        out.append(s * best)
    return torch.tensor(out)


def reference_dm(world, erasers, coeffs):
    """W + sum_i m_i delta_i added by hand to a copy of the LDM UNet (module names from ComfyUI's own
    unet_to_diffusers map, not from the glue)."""
    from conceptgate.nodes import comfy_glue

    key = tuple(round(float(c), 6) for c in coeffs)
    if key not in world["cache"]:
        stack = EraserStack()
        for e in erasers:
            stack = stack.with_eraser(e)
        names = comfy_glue.module_names(world["model"])
        dm = copy.deepcopy(world["model"].model.diffusion_model)
        with torch.no_grad():
            for name, d in dense_deltas(stack, torch.tensor(key)).items():
                dm.get_submodule(names[name][len("diffusion_model."):]).weight += d
        world["cache"][key] = dm
    return world["cache"][key]


def split_steps(calls):
    steps, cur = [], None
    for c in calls:
        if c == "step":
            cur = []
            steps.append(cur)
        else:
            cur.append(c)
    return steps


@torch.no_grad()
def check_rows(world, host, p, erasers, strengths, cond_only=False):
    """Every row of every UNet call equals the hand-merged model at that row's coefficients."""
    from conceptgate.extension.text import subprompts

    def layout(texts):
        rows, per_image = [], []
        for text in texts:
            subs = [expected_coeffs(world, s, erasers, strengths) for s in subprompts(text)]
            rows += subs
            best = torch.zeros(len(erasers))
            for c in subs:
                best = torch.where(c.abs() > best.abs(), c, best)
            per_image.append(torch.zeros_like(best) if cond_only else best)
        return rows, per_image

    from modules.extra_networks import parse_prompts

    checked = 0
    passes = 2 if p.enable_hr else 1
    for n, denoiser in enumerate(p.denoisers):
        batch, hr = divmod(n, passes)
        source = p.all_hr_prompts if hr else p.all_prompts
        texts = parse_prompts(source[batch * p.batch_size:(batch + 1) * p.batch_size])[0]
        cond_rows, uncond_rows = layout(texts)
        for calls in split_steps(denoiser.inner_model.calls):
            xs = torch.cat([c[0] for c in calls])
            total = xs.shape[0]
            expected = cond_rows + (uncond_rows if total > len(cond_rows) else [])
            assert total == len(expected), (total, len(expected))
            i = 0
            for x, t, ctx, out in calls:
                for r in range(x.shape[0]):
                    ref = reference_dm(world, erasers, expected[i])(x[r:r + 1], timesteps=t[r:r + 1], context=ctx[r:r + 1])
                    assert (out[r:r + 1] - ref).abs().max() < TOL, (n, i, expected[i])
                    i += 1
                    checked += 1
    return checked


def marker(params):
    params.denoiser.inner_model.calls.append("step")


def loaded(world, *names):
    from conceptgate.adapters.files import load_eraser

    return [load_eraser(os.path.join(world["folder"], f"{n}.safetensors")) for n in names]


# ------------------------------------------------------------------ tests
def test_entry_module_registers_one_script_and_callbacks(host):
    import modules.scripts as scripts
    from conceptgate.extension import host as ext_host

    assert ext_host.HOST == "a1111"
    classes = [v for v in vars(host.entry).values() if isinstance(v, type) and issubclass(v, scripts.Script)]
    assert classes == [host.entry.ConceptGateScript]  # the webui registers every Script subclass it finds
    assert host.script.title() == "ConceptGate" and host.script.show(False) is scripts.AlwaysVisible
    cb = host.callbacks.callback_map
    assert len(cb["before_ui"]) == 1 and len(cb["cfg_denoiser"]) == 1 and len(cb["ui_settings"]) == 1
    assert "erase" in host.extra_networks.extra_network_registry  # registered after initialize() cleared it
    assert "conceptgate_dir" in host.shared.opts.data_labels
    import conceptgate

    assert os.path.dirname(conceptgate.__file__) == os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


SCENARIOS = {
    "batched": dict(prompt=["a red triangle", "a green square"], batch_size=2),
    "chunked": dict(prompt=["a red triangle", "a green square"], batch_size=2, opts={"batch_cond_uncond": False}),
    "and-prompts-chunked": dict(prompt=["a red triangle AND a blue circle", "a green square"], batch_size=2,
                                opts={"batch_cond_uncond": False}),
    "and-prompts-batched": dict(prompt=["a green square AND a blue circle :0.5", "a red triangle"], batch_size=2),
    "skipped-uncond": dict(prompt=["a red triangle", "a green square"], batch_size=2, s_min_uncond=100.0, steps=3),
    "break-longer-cond": dict(prompt="a green square BREAK a red triangle", batch_size=1),
    "cond-only": dict(prompt=["a red triangle", "a blue circle"], batch_size=2, cond_only=True),
    "sdxl-dict": dict(prompt=["a red triangle", "a green square"], batch_size=2, sdxl=True),
    "hires-other-prompt": dict(prompt=["a red triangle"], batch_size=1, enable_hr=True, hr_prompt=["a blue circle"]),
    "two-batches": dict(prompt=["a red triangle", "a blue circle"], batch_size=1, n_iter=2),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_row_equals_a_hand_merge_at_its_gate(world, name):
    sc = dict(SCENARIOS[name])
    with a1111_stub.installed("a1111") as processing:
        h = Host(world, processing, sdxl=sc.pop("sdxl", False))
        for k, v in sc.pop("opts", {}).items():
            setattr(h.shared.opts, k, v)
        h.callbacks.on_cfg_denoiser(marker)
        cond_only = sc.pop("cond_only", False)
        args = [True, "tri:1, circ:0.6", "None", "additive", "ft", cond_only]
        p, processed = h.run(sc.pop("prompt"), args, **sc)
        erasers = loaded(world, "tri", "circ")
        assert check_rows(world, h, p, erasers, [1.0, 0.6], cond_only=cond_only) > 0
        assert "ConceptGate" in p.extra_generation_params
        # the layout this scenario is about really occurred
        steps = [[c[0].shape[0] for c in calls] for d in p.denoisers for calls in split_steps(d.inner_model.calls)]
        ctx_len = {c[2].shape[1] for d in p.denoisers for c in d.inner_model.calls if c != "step"}
        want = {"batched": lambda: all(len(s) == 1 for s in steps),
                "chunked": lambda: all(s == [2, 2] for s in steps),
                "and-prompts-chunked": lambda: all(s == [2, 2, 1] for s in steps),
                "and-prompts-batched": lambda: all(s == [5] for s in steps),
                "skipped-uncond": lambda: [sum(s) for s in steps] == [4, 2, 4],
                "break-longer-cond": lambda: steps[0] == [1, 1] and ctx_len == {77, 154},
                "hires-other-prompt": lambda: len(p.denoisers) == 2,
                "two-batches": lambda: len(p.denoisers) == 2}
        assert want.get(name, lambda: True)(), steps


def test_gate_rule_makes_a_difference_and_zero_gate_is_exact(world):
    """'a green square' shares no token with either concept: the rows carry the cosine gate only;
    with strength 0 the output is bit-identical to the model without erasers."""
    with a1111_stub.installed("a1111") as processing:
        h = Host(world, processing)
        h.callbacks.on_cfg_denoiser(marker)
        p, _ = h.run(["a green square"], [True, "tri:0", "None", "additive", "ft", False])
        for calls in split_steps(p.denoisers[0].inner_model.calls):
            for x, t, ctx, out in calls:
                assert torch.equal(out, world["model"].model.diffusion_model(x, timesteps=t, context=ctx))


def test_weights_untouched_and_hooks_removed_after_postprocess(host, world):
    before = {k: v.clone() for k, v in host.dm.state_dict().items()}
    seen = {}

    def spy(params):
        seen["hooks"] = sum(len(m._forward_hooks) for m in host.dm.modules())
        seen["pre"] = len(host.dm._forward_pre_hooks)

    host.callbacks.on_cfg_denoiser(spy)
    host.run("a red triangle", [True, "tri:1", "None", "additive", "ft", False])
    assert seen["hooks"] > 0 and seen["pre"] == 1  # attached during sampling
    assert all(torch.equal(before[k], v) for k, v in host.dm.state_dict().items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in host.dm.modules())
    from conceptgate.extension import callbacks

    assert callbacks.ACTIVE["state"] is None


def test_stale_hooks_of_an_interrupted_generation_are_removed(host):
    from modules.scripts import ScriptRunnerStub

    p = host.processing.StableDiffusionProcessing("a red triangle", sd_model=host.sd_model,
                                                  scripts=ScriptRunnerStub([host.script]),
                                                  script_args=[True, "tri:1", "None", "additive", "ft", False])
    p.scripts.process(p)
    p.batch_number, p.prompts, p.negative_prompts = 0, p.all_prompts[:1], p.all_negative_prompts[:1]
    p.parse_extra_network_prompts()
    host.extra_networks.activate(p, p.extra_network_data)
    p.scripts.process_batch(p, batch_number=0, prompts=p.prompts)
    assert any(m._forward_hooks for m in host.dm.modules())
    # the generation dies here (no postprocess); the next one starts with a clean model
    host.run("a green square", [False, "", "None", "additive", "ft", False])
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in host.dm.modules())


def test_erase_tag_coexists_with_lora(host, world):
    received = []

    class FakeLora(host.extra_networks.ExtraNetwork):
        def __init__(self):
            super().__init__("lora")

        def activate(self, p, params_list):
            received.append([x.items for x in params_list])

        def deactivate(self, p):
            pass

    host.extra_networks.register_extra_network(FakeLora())
    host.callbacks.on_cfg_denoiser(marker)
    prompt = "a red triangle <lora:style:0.7> <erase:circ:0.5>"
    p, processed = host.run(prompt, [False, "", "None", "additive", "ft", False])
    assert received == [[["style", "0.7"]]]  # the user's LoRA is activated with its own params, once
    assert p.conceptgate_tags == [("circ", 0.5)]
    assert "a red triangle" in host.sd_model.encoded  # the prompt reaches the text encoder without its tags
    assert not any("<" in t for t in host.sd_model.encoded)
    assert [e.eraser.name for e in p.conceptgate.stack.entries] == ["circ"]
    assert check_rows(world, host, p, loaded(world, "circ"), [0.5]) > 0
    assert "circ:0.5:" in p.extra_generation_params["ConceptGate"]


def test_tag_overrides_the_accordion_strength(host):
    p, _ = host.run("a red triangle <erase:tri:0.25>", [True, "tri:1, circ:0.6", "None", "additive", "ft", False])
    entries = {e.eraser.name: e.strength for e in p.conceptgate.stack.entries}
    assert entries == {"tri": 0.25, "circ": 0.6}


def test_infotext_round_trip(host, world):
    import gradio
    from modules import infotext_utils

    host.script.ui(False)  # builds the accordion (stand-in gradio) and sets infotext_fields
    args = [True, "tri:0.8", "None", "official", "ft", True]
    p, processed = host.run("a red triangle <erase:circ:0.5>", args)
    text = processed.infotexts[0]
    assert "ConceptGate: " in text and "ConceptGate hashes: " in text
    params = infotext_utils.parse_generation_parameters(text)
    gates = {n: g for n, _, g in __import__("conceptgate.extension.params", fromlist=["x"]).parse_used(params["ConceptGate"])}
    report = {r["eraser"]: r["gate"] for r in p.conceptgate.report.rows}
    assert gates == {n: f"{g:.3f}" for n, g in report.items()}
    restored = [fn(params) for _, fn in host.script.infotext_fields]
    # the tag-given eraser comes back with the prompt, not in the accordion
    assert restored == [True, "tri:0.8", "None", "official", "ft", True]
    assert params["Prompt"].endswith("<erase:circ:0.5>")
    # the accordion's controls follow the restored text box
    erasers_box = host.script.infotext_fields[1][0]
    (event, fn, inputs, outputs), = [l for l in erasers_box.listeners if l[0] == "change"]
    updates = fn("tri:0.8")
    names = [o.kwargs["label"] for o in outputs[:len(outputs) // 2]]
    assert updates[names.index("tri")]["value"] is True and updates[len(names) + names.index("tri")]["value"] == 0.8
    assert gradio.created  # the stand-in gradio was used, the real one is not needed


def test_renamed_file_is_found_by_hash(host, world, tmp_path):
    from conceptgate.extension import library as lib

    l = lib.Library(world["folder"])
    sha = loaded(world, "tri")[0].sha256
    assert l.name_for_hash("old_name", sha[:12]) == "tri"
    assert l.name_for_hash("old_name", "0" * 12) is None


def test_same_gate_and_delta_as_the_comfyui_path(host, world):
    """Same eraser, same prompt: the A1111 glue's gate equals the ComfyUI nodes' gate, and the delta its
    hooks add equals the weight change ComfyUI's own patching produces at that gate."""
    import comfy.lora
    from conceptgate.nodes import comfy_glue
    from conceptgate.nodes.nodes_conceptgate import TextEncode

    tri = loaded(world, "tri")[0]
    for prompt in ("a red triangle", "a painting of a triangle", "a green square"):
        p, _ = host.run(prompt, [True, "tri:0.9", "None", "additive", "ft", False])
        ours = p.conceptgate.report.rows[0]["gate"]
        stack = EraserStack().with_eraser(tri, strength=0.9, gate=GateSettings(rule="ft"))  # as the webui run
        (cond,) = TextEncode.execute(text=prompt, clip=world["clip"]).result
        coeffs, report = comfy_glue.gates_for_conditioning(stack, world["clip"], cond)
        assert abs(ours - report.rows[0]["gate"]) < 1e-5, prompt
        # delta: hooks at coefficient m vs ComfyUI's patched weight at m
        from conceptgate.adapters.hooks import RowGatedDeltas
        from conceptgate.extension import ldm

        m = float(coeffs[0])
        patched = comfy_glue.weight_patched(world["model"], stack, coeffs)
        _, names = ldm.module_map(host.dm)
        hooks = RowGatedDeltas(stack, lambda n: host.dm.get_submodule(names[n])).attach()
        try:
            for canon in ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
                          "up_blocks.1.attentions.1.proj_in", "mid_block.attentions.0.transformer_blocks.0.ff.net.2"):
                module = host.dm.get_submodule(names[canon])
                key = f"diffusion_model.{names[canon]}.weight"
                w = module.weight.detach().clone().float()
                merged = comfy.lora.calculate_weight(patched.patches[key], w.clone(), key)
                x = torch.randn(2, *([module.in_features] if isinstance(module, torch.nn.Linear) else [module.in_channels, 3, 3]))
                with torch.no_grad():
                    base = module(x)
                    with hooks.coefficients(torch.tensor([m])):
                        hooked = module(x)
                    fn = torch.nn.functional.linear if x.dim() == 2 else torch.nn.functional.conv2d
                    want = fn(x, merged - w)
                assert (hooked - base - want).abs().max() < 1e-5
        finally:
            hooks.detach()


def test_incompatible_and_malformed_erasers_are_refused_by_name(world, tmp_path):
    from conceptgate.adapters import EraserFileError, IncompatibleModelError, reference_layout
    from conceptgate.adapters.eraser import Eraser

    with a1111_stub.installed("a1111") as processing:
        h = Host(world, processing)
        xl = random_eraser(reference_layout("sdxl"), concepts=["x"], name="xl", which="attn2_kv")
        save_eraser(xl, os.path.join(world["folder"], "xl.safetensors"))
        geom = Eraser(name="geom", kind="conditioning", concepts=["logo"], method="geom", tensors={"tok": torch.zeros(2, 64)})
        save_eraser(geom, os.path.join(world["folder"], "geom.safetensors"))
        try:
            from conceptgate.extension import callbacks

            usable, other = callbacks.library().listing()
            assert {"tri", "circ", "xl", "geom"} <= set(usable) and not other  # every kind is reachable now
            with pytest.raises(IncompatibleModelError, match="xl.safetensors"):
                h.run("a red triangle <erase:xl:1>", [False, "", "None", "additive", "ft", False])
            with pytest.raises(EraserFileError, match="geom.safetensors.*locations"):  # a Geom file without its tokens
                h.run("a logo <erase:geom:1>", [False, "", "None", "additive", "ft", False])
            with pytest.raises(EraserFileError, match="no eraser named 'nope'"):
                h.run("a logo <erase:nope:1>", [False, "", "None", "additive", "ft", False])
        finally:
            os.remove(os.path.join(world["folder"], "xl.safetensors"))
            os.remove(os.path.join(world["folder"], "geom.safetensors"))


def test_preset_manifest(host, world):
    tri, circ = loaded(world, "tri", "circ")
    stack = EraserStack().with_eraser(tri, strength=0.7, gate=GateSettings(rule="ft")).with_eraser(
        circ, enabled=False, gate=GateSettings(rule="always"))
    path = os.path.join(world["folder"], "both.json")
    stack.to_manifest(path)
    try:
        p, _ = host.run("a red triangle", [True, "", "both.json", "additive", "ft", False])
        entries = [(e.eraser.name, e.enabled, e.strength, e.gate.rule) for e in p.conceptgate.stack.entries]
        assert entries == [("tri", True, 0.7, "ft"), ("circ", False, 1.0, "always")]
        assert p.extra_generation_params["ConceptGate preset"] == "both.json"
        assert p.extra_generation_params["ConceptGate"].endswith("circ:1:off")
    finally:
        os.remove(path)

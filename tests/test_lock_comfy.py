"""The operator lock inside ComfyUI's real executor (issue 13, item 1): with a policy in force, every graph
gives the erased image or an error, never the unerased one. The same graphs go through a real server
over HTTP in ``test_lock_server.py``.

Reference images are made with no policy: the eraser applied by our own nodes (per-row, the lock's
path) with ``CLIP Text Encode (ConceptGate)``. Under the policy the stock graph must give exactly that.
"""

import json
import os

import pytest
import torch

from conceptgate.adapters import layout_from_diffusers_config, save_eraser
from conceptgate.adapters.files import sha256_file
from conceptgate.adapters.synthetic import random_eraser
from tiny_models import tiny_unet
from test_comfy_executor import graph, run

ERASERS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "toyworld", "erasers")


@pytest.fixture(scope="module")
def lock_dir(executor, tmp_path_factory):
    import folder_paths

    folder = tmp_path_factory.mktemp("lock_models")
    layout = layout_from_diffusers_config(tiny_unet().config)
    save_eraser(random_eraser(layout, concepts=["red triangle"], seed=21, scale=0.3, name="tri"), folder / "tri.safetensors")
    save_eraser(random_eraser(layout, concepts=["blue circle"], seed=5, scale=0.3, name="circ"), folder / "circ.safetensors")
    folder_paths.add_model_folder_path("conceptgate", str(folder), is_default=True)
    from safetensors.torch import save_file

    from conceptgate.adapters.files import kohya_tensors

    loras = folder / "loras"
    loras.mkdir()
    lora = random_eraser(layout, concepts=["anything"], seed=9, scale=0.3, name="style")
    save_file({k: v.contiguous() for k, v in kohya_tensors(lora.modules).items()}, str(loras / "style_lora.safetensors"))
    folder_paths.add_model_folder_path("loras", str(loras), is_default=True)
    return folder


def write_policy(folder, entries, name="policy.json"):
    path = folder / name
    path.write_text(json.dumps({"conceptgate_policy": 1, "locked": entries}))
    return path


def locked(folder, file="tri.safetensors", strength=1.0, rule="tokens", **extra):
    return dict({"file": file, "sha256": sha256_file(folder / file), "strength": strength, "gate": {"rule": rule}}, **extra)


@pytest.fixture
def no_policy(monkeypatch):
    monkeypatch.setenv("CONCEPTGATE_POLICY", "")


@pytest.fixture
def policy(monkeypatch, lock_dir):
    path = write_policy(lock_dir, [locked(lock_dir)])
    monkeypatch.setenv("CONCEPTGATE_POLICY", str(path))
    return path


def our_graph(prompt="a red triangle", strength=1.0, enabled=True, key="out"):
    g = graph(prompt=prompt, gate="tokens", key=key)
    g["stack"]["inputs"].update(strength=strength, enabled=enabled)
    return g


def stock_graph(prompt="a red triangle", key="out"):
    return graph(prompt=prompt, erase=False, encoder="CLIPTextEncode", key=key)


def _weights_fingerprint():
    """The tiny checkpoint's weights as the user loaded them: ComfyUI patches a loaded model's weights in
    place (LoRAs, batch-mode erasers of earlier tests) and restores its backup on unload, so unload first."""
    import sys

    import comfy.model_management
    import nodes
    from conceptgate.adapters.fingerprint import weights_fingerprint

    comfy.model_management.unload_all_models()

    pack = sys.modules[nodes.NODE_CLASS_MAPPINGS["CGTest_TinyCheckpoint"].__module__]
    return weights_fingerprint(pack.tiny_checkpoint(0)[0].model.diffusion_model.state_dict())


@pytest.fixture(scope="module")
def base_weights(executor):
    return _weights_fingerprint()


@pytest.fixture(scope="module")
def references(executor, lock_dir, base_weights):
    old = os.environ.get("CONCEPTGATE_POLICY")
    os.environ["CONCEPTGATE_POLICY"] = ""
    try:
        refs = {
            "unerased": run(executor, stock_graph())[0],
            "erased": run(executor, our_graph())[0],
            "unrelated": run(executor, stock_graph("a green square"))[0],
        }
    finally:
        if old is None:
            del os.environ["CONCEPTGATE_POLICY"]
        else:
            os.environ["CONCEPTGATE_POLICY"] = old
    assert (refs["erased"] - refs["unerased"]).abs().max() > 1e-2
    return refs


def _is_erased(x, refs):
    return torch.allclose(x, refs["erased"], atol=1e-5, rtol=0) and (x - refs["unerased"]).abs().max() > 1e-2


def test_stock_graph_is_erased(executor, references, policy):
    out, _ = run(executor, stock_graph())
    assert _is_erased(out, references)


def test_our_nodes_at_strength_zero_or_disabled_cannot_lift_it(executor, references, policy):
    for g in (our_graph(strength=0.0), our_graph(enabled=False), our_graph(strength=1.0)):
        out, outputs = run(executor, g)
        assert _is_erased(out, references)  # strength 1 is not applied twice either
        assert "locked by the operator" in outputs["apply"]["text"][0]


def test_second_loader_and_lora_after_ours(executor, references, policy, lock_dir):
    g = our_graph(strength=0.0)
    g["ckpt2"] = {"class_type": "CGTest_TinyCheckpoint", "inputs": {"seed": 0}}
    g["sampler"]["inputs"]["model"] = ["ckpt2", 0]  # our nodes bypassed entirely
    out, _ = run(executor, g)
    assert _is_erased(out, references)
    g = stock_graph()
    g["msd"] = {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["ckpt", 0], "sampling": "eps", "zsnr": False}}
    g["sampler"]["inputs"]["model"] = ["msd", 0]  # a model-patching node between the loader and the sampler
    out, _ = run(executor, g)
    assert _is_erased(out, references)


def _with_lora(g, model_from):
    g["lora"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": model_from, "lora_name": "style_lora.safetensors",
                                                                 "strength_model": 0.7}}
    return g


def test_lora_loaded_after_our_nodes(executor, references, lock_dir, monkeypatch):
    """Reference: the LoRA, then our nodes applying the eraser (no policy). Locked: the LoRA after our nodes
    at strength 0, and a stock graph with the LoRA: both equal the reference."""
    monkeypatch.setenv("CONCEPTGATE_POLICY", "")
    ref_g = _with_lora(our_graph(), ["ckpt", 0])
    ref_g["apply"]["inputs"]["model"] = ["lora", 0]
    reference, _ = run(executor, ref_g)
    plain_g = _with_lora(stock_graph(), ["ckpt", 0])
    plain_g["sampler"]["inputs"]["model"] = ["lora", 0]
    plain, _ = run(executor, plain_g)
    assert (reference - plain).abs().max() > 1e-2
    path = write_policy(lock_dir, [locked(lock_dir)], name="policy_lora.json")
    monkeypatch.setenv("CONCEPTGATE_POLICY", str(path))
    g = _with_lora(our_graph(strength=0.0), ["apply", 0])
    g["sampler"]["inputs"]["model"] = ["lora", 0]
    for graph_ in (g, plain_g):
        out, _ = run(executor, graph_)
        assert torch.allclose(out, reference, atol=1e-5, rtol=0)


def sampler_custom_advanced_graph():
    """The stock graph sampled by SamplerCustomAdvanced with a CFGGuider (also posted over HTTP)."""
    g = stock_graph()
    del g["sampler"]
    g.update({
        "guider": {"class_type": "CFGGuider", "inputs": {"model": ["ckpt", 0], "positive": ["pos", 0],
                                                          "negative": ["neg", 0], "cfg": 4.0}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": 7}},
        "ksel": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "sig": {"class_type": "BasicScheduler", "inputs": {"model": ["ckpt", 0], "scheduler": "normal", "steps": 3, "denoise": 1.0}},
        "sampler": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["noise", 0], "guider": ["guider", 0],
                    "sampler": ["ksel", 0], "sigmas": ["sig", 0], "latent_image": ["latent", 0]}},
    })
    return g


def test_sampler_custom_advanced_is_erased(executor, references, policy):
    g = sampler_custom_advanced_graph()
    out, _ = run(executor, g)
    assert _is_erased(out, references)


def test_unrelated_prompt_is_untouched_under_the_lock(executor, references, policy):
    out, _ = run(executor, stock_graph("a green square"))
    assert torch.equal(out, references["unrelated"])


def test_edited_conditioning_gets_the_eraser_at_full_strength(executor, references, policy):
    """Averaging, concatenating or zeroing a conditioning makes its recorded tokens meaningless: the lock
    then acts, whatever the prompt (here an unrelated prompt concatenated with the target)."""
    g = stock_graph("a green square")
    g["pos2"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a red triangle"}}
    g["cat"] = {"class_type": "ConditioningConcat", "inputs": {"conditioning_to": ["pos", 0], "conditioning_from": ["pos2", 0]}}
    g["sampler"]["inputs"]["positive"] = ["cat", 0]
    out, _ = run(executor, g)
    os.environ["CONCEPTGATE_POLICY"] = ""
    try:
        plain, _ = run(executor, g)
    finally:
        os.environ["CONCEPTGATE_POLICY"] = str(policy)
    assert (out - plain).abs().max() > 1e-2


def test_concept_in_a_later_window_is_seen(executor, references, policy):
    """A prompt longer than 77 tokens with the concept after token 75: every window is gated."""
    filler = ", ".join(["a calm quiet afternoon"] * 20)
    prompt = filler + ", a red triangle"
    out, _ = run(executor, stock_graph(prompt))
    os.environ["CONCEPTGATE_POLICY"] = ""
    try:
        plain, _ = run(executor, stock_graph(prompt))
    finally:
        os.environ["CONCEPTGATE_POLICY"] = str(policy)
    assert (out - plain).abs().max() > 1e-2


@pytest.mark.parametrize("fault", ["sha256", "missing", "malformed", "misfit"])
def test_broken_policy_stops_every_generation(executor, references, monkeypatch, lock_dir, tmp_path, fault):
    entry = locked(lock_dir)
    if fault == "sha256":
        entry["sha256"] = "0" * 64
    if fault == "missing":
        entry["file"] = "gone.safetensors"
    text = {"conceptgate_policy": 1, "locked": [entry]}
    if fault == "malformed":
        text["locked"] = [dict(entry, enabled=False)]
    if fault == "misfit":
        name = "spm_triangle.safetensors"
        text = {"conceptgate_policy": 1, "search_dirs": [str(ERASERS_DIR)],
                "locked": [{"file": name, "sha256": sha256_file(os.path.join(ERASERS_DIR, name))}]}
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(text))
    monkeypatch.setenv("CONCEPTGATE_POLICY", str(path))
    expected = {"sha256": "sha256 differs", "missing": "not found", "malformed": "enabled: not allowed",
                "misfit": "module"}[fault]
    with pytest.raises(AssertionError, match=expected):
        run(executor, stock_graph())


def test_policy_file_removed_while_configured_stops(executor, monkeypatch, tmp_path):
    monkeypatch.setenv("CONCEPTGATE_POLICY", str(tmp_path / "deleted.json"))
    with pytest.raises(AssertionError, match="policy file not found"):
        run(executor, stock_graph())


def test_locked_file_replaced_on_disk_stops(executor, references, monkeypatch, lock_dir, tmp_path):
    import shutil

    shutil.copy(lock_dir / "tri.safetensors", tmp_path / "tri.safetensors")
    path = write_policy(tmp_path, [locked(tmp_path)])
    monkeypatch.setenv("CONCEPTGATE_POLICY", str(path))
    out, _ = run(executor, stock_graph())
    assert _is_erased(out, references)
    shutil.copy(lock_dir / "circ.safetensors", tmp_path / "tri.safetensors")
    g = stock_graph()
    g["sampler"]["inputs"]["seed"] = 8  # a new image (the cached one was made with the pinned file)
    with pytest.raises(AssertionError, match="changed on disk"):
        run(executor, g)


def test_model_called_outside_a_sampler_is_refused(executor, policy):
    import sys

    import nodes

    pack = sys.modules[nodes.NODE_CLASS_MAPPINGS["CGTest_TinyCheckpoint"].__module__]
    model = pack.tiny_checkpoint(0)[0].model
    with pytest.raises(Exception, match="outside ComfyUI's samplers"):
        model.apply_model(torch.zeros(1, 4, 8, 8), torch.tensor([1.0]), c_crossattn=torch.zeros(1, 77, 32))


def test_no_policy_changes_nothing(executor, references, no_policy):
    out, _ = run(executor, stock_graph())
    assert torch.equal(out, references["unerased"])


def test_best_effort_entry_that_does_not_fit_is_skipped_and_said(executor, lock_dir, no_policy):
    import shutil

    shutil.copy(os.path.join(ERASERS_DIR, "spm_triangle.safetensors"), lock_dir / "toy_spm.safetensors")
    g = our_graph()
    g["load2"] = {"class_type": "ConceptGateLoadEraser", "inputs": {"eraser_name": "toy_spm.safetensors", "concepts": ""}}
    g["stack2"] = {"class_type": "ConceptGateAddToStack", "inputs": {
        "eraser": ["load2", 0], "enabled": True, "strength": 1.0, "gate": "tokens", "cond_only": False,
        "stack": ["stack", 0]}}
    g["apply"]["inputs"]["stack"] = ["stack2", 0]
    with pytest.raises(AssertionError, match="toy_spm.safetensors.*module"):  # fail closed by default
        run(executor, g)
    g["stack2"]["inputs"]["best_effort"] = True
    out, outputs = run(executor, g)
    assert "skipped (best effort): triangle" in outputs["apply"]["text"][0]


def test_the_users_model_is_unchanged_after_every_run_and_fault(executor, references, base_weights):
    """Runs last in this file: every graph and fault above left the loaded model's weights as they were."""
    assert _weights_fingerprint() == base_weights


def test_locked_geom_and_guidance_erasers_act_on_a_stock_graph(executor, monkeypatch, tmp_path):
    """Every kind is lockable: a policy locking the toy world's Geom tokens and All-but-One guidance eraser
    gives a stock graph (CLIPTextEncode, KSampler) exactly the result of our own node applying the same two
    (no policy); an unrelated prompt gets the Geom tokens (rule always) but no guidance rows."""
    from test_one_stack import ERASERS, _add, _base

    def stock(prompt, key):
        g = _base(prompt, key)
        g["pos"]["class_type"] = "CLIPTextEncode"
        return g

    def ours(prompt, key):
        g = _base(prompt, key)
        g["l1"] = {"class_type": "ConceptGateLoadEraser", "inputs": {"eraser_name": "geom_watermark.safetensors", "concepts": ""}}
        g["l2"] = {"class_type": "ConceptGateLoadEraser", "inputs": {"eraser_name": "abo_circle_to_square.safetensors", "concepts": ""}}
        g["s1"] = _add(["l1", 0], "always")
        g["s2"] = _add(["l2", 0], "tokens", ["s1", 0])
        g["apply"] = {"class_type": "ConceptGateApplyStack", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "stack": ["s2", 0], "positive": ["pos", 0], "negative": ["neg", 0],
            "mode": "per-row", "combine": "additive"}}
        g["sampler"]["inputs"]["model"] = ["apply", 0]
        g["sampler"]["inputs"]["negative"] = ["apply", 2]
        return g

    monkeypatch.setenv("CONCEPTGATE_POLICY", "")
    prompt = "a blue circle in outlined style"
    reference, _ = run(executor, ours(prompt, "lock_kinds_ref"))
    plain, _ = run(executor, stock(prompt, "lock_kinds_plain"))
    assert (reference - plain).abs().max() > 1e-2
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"conceptgate_policy": 1, "search_dirs": [ERASERS], "locked": [
        {"file": "geom_watermark.safetensors", "sha256": sha256_file(os.path.join(ERASERS, "geom_watermark.safetensors")),
         "gate": {"rule": "always"}},
        {"file": "abo_circle_to_square.safetensors",
         "sha256": sha256_file(os.path.join(ERASERS, "abo_circle_to_square.safetensors")), "gate": {"rule": "tokens"}}]}))
    monkeypatch.setenv("CONCEPTGATE_POLICY", str(policy))
    locked_out, _ = run(executor, stock(prompt, "lock_kinds"))
    assert torch.allclose(locked_out, reference, atol=1e-4, rtol=1e-4), (locked_out - reference).abs().max()

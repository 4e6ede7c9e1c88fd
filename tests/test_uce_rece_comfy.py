"""UCE / RECE on a ComfyUI MODEL + CLIP (tiny SD1.x-family model), through ComfyUI's own patcher,
text encoder, sampler, stock LoRA loader and PromptExecutor."""

import glob
import json
import os

import pytest
import torch

from conceptgate.adapters import EraserStack, GateSettings, layout_from_diffusers_config, load_eraser
from conceptgate.adapters.rece import closed_form as cf
from conceptgate.adapters.synthetic import random_eraser
from conceptgate.adapters.rece import EditCache, compute_edit, save_edit
from comfy_sampling import close, encode, merged_model, sample
from tiny_models import tiny_text_encoder, tiny_unet

F64 = torch.float64
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.fixture(scope="module")
def world(comfy):
    from conceptgate.nodes import comfy_models

    unet = tiny_unet(seed=6)
    return {"unet": unet, "model": comfy_models.unet_to_comfy(unet),
            "clip": comfy_models.text_encoder_to_comfy(tiny_text_encoder(seed=6))}


def host_of(model, clip):
    from conceptgate.nodes.nodes_uce import ComfyEditHost

    return ComfyEditHost(model, clip)


def test_comfy_host_reads_weights_and_text_as_the_sampler(world):
    from conceptgate.nodes import comfy_glue

    host = host_of(world["model"], world["clip"])
    w = host.cross_attention_weights()
    ref = cf.collect_cross_attention_weights(world["unet"])
    assert set(w) == set(ref) and all(torch.equal(w[n], ref[n]) for n in ref)
    # text: the CONDITIONING tensor CLIPTextEncode hands the sampler, with CLIP skip
    for clip in (world["clip"], _skip(world["clip"])):
        hidden, ids = host_of(world["model"], clip).encode(["a red triangle", ""])
        assert torch.equal(hidden[:1], encode(clip, "a red triangle")[0][0].float())
        assert torch.equal(hidden, comfy_glue.ComfyTextEncoder(clip)(["a red triangle", ""]).hidden)
        assert cf.last_word_index(ids).tolist() == [3, 0]
    assert not torch.equal(host.encode(["x"])[0], host_of(world["model"], _skip(world["clip"])).encode(["x"])[0])

    # a LoRA already on the MODEL is part of the weights the edit starts from
    layout = layout_from_diffusers_config(world["unet"].config)
    lora = random_eraser(layout, which="attn2_kv", rank=2, scale=0.3, seed=4)
    patched = comfy_glue.weight_patched(world["model"], EraserStack().with_eraser(lora), torch.tensor([0.5]))
    pw = host_of(patched, world["clip"]).cross_attention_weights()
    for n, d in lora.modules.items():
        assert torch.allclose(pw[n], ref[n] + 0.5 * d.full(), atol=1e-6)
    # ...also while ComfyUI holds the patched clone loaded (weights patched in place, backup kept)
    sample(patched, encode(world["clip"], "x"), encode(world["clip"], ""), steps=1)
    assert all(torch.equal(v, ref[n]) for n, v in host.cross_attention_weights().items())
    assert host.unet_fingerprint() != host_of(patched, world["clip"]).unet_fingerprint()


def _skip(clip):
    c = clip.clone()
    c.clip_layer(-2)
    return c


def test_comfy_edit_through_patches_maps_erased_to_guide(world):
    from conceptgate.nodes.nodes_uce import edited_model

    host = host_of(world["model"], world["clip"])
    out = compute_edit(host, method="uce", concepts=("red triangle",), guide="a dog", preserve=("blue circle",),
                       convention="last_token", erase_scale=1e4, preserve_scale=1e4, cache=None)
    patched = edited_model(world["model"], out.eraser, 1.0)
    w0, w1 = host.cross_attention_weights(), host_of(patched, world["clip"]).cross_attention_weights()

    def vec(text):
        hidden, ids = host.encode([text])
        return hidden[0, int(cf.last_word_index(ids)[0])].to(F64)

    def outs(w, v):
        return torch.cat([m.to(F64) @ v for m in w.values()])

    e, g, p = vec("red triangle"), vec("a dog"), vec("blue circle")
    assert rel(outs(w0, e), outs(w0, g)) > 0.1
    assert rel(outs(w1, e), outs(w0, g)) < 1e-3
    assert rel(outs(w1, p), outs(w0, p)) < 1e-3
    assert world["model"].patches == {}          # the user's MODEL got nothing


def test_cache_on_comfy_host(world):
    cache = EditCache()
    a = compute_edit(host_of(world["model"], world["clip"]), method="rece", concepts=("red triangle",), epochs=1,
                     cache=cache)
    b = compute_edit(host_of(world["model"].clone(), world["clip"].clone()), method="rece", concepts=("red triangle",),
                     epochs=1, cache=cache)
    c = compute_edit(host_of(world["model"], _skip(world["clip"])), method="rece", concepts=("red triangle",), epochs=1,
                     cache=cache)
    assert b.cached and b.eraser is a.eraser and not c.cached and cache.hits == 1


def test_file_in_stock_lora_loader_and_as_gated_eraser(world, tmp_path, comfy):
    """The exported file: stock LoraLoaderModelOnly == our patch == per-row gated eraser == hand merge."""
    import folder_paths
    import nodes
    from conceptgate.nodes import comfy_glue
    from conceptgate.nodes.nodes_uce import edited_model

    host = host_of(world["model"], world["clip"])
    for method in ("uce", "rece"):
        out = compute_edit(host, method=method, concepts=("red triangle",), epochs=1, erase_scale=3.0, cache=None)
        path = save_edit(out, tmp_path / f"tri_{method}.safetensors")
        folder_paths.add_model_folder_path("loras", str(tmp_path), is_default=True)
        pos, neg = encode(world["clip"], "red triangle"), encode(world["clip"], "")
        base = sample(world["model"], pos, neg)
        reference = sample(merged_model(world["unet"], out.result), pos, neg)
        assert (reference - base).abs().max() > 1e-2
        (stock,) = nodes.LoraLoaderModelOnly().load_lora_model_only(world["model"], os.path.basename(path), 1.0)
        eraser = load_eraser(path)
        gated = comfy_glue.row_gated(world["model"], EraserStack().with_eraser(eraser, gate=GateSettings(rule="cos")),
                                     world["clip"])
        for m in (edited_model(world["model"], out.eraser, 1.0), stock, gated):
            assert close(sample(m, pos, neg), reference)


# ------------------------------------------------------------------ the node in ComfyUI's executor

@pytest.fixture(scope="module")
def model_dir(executor, tmp_path_factory):
    import folder_paths

    folder = tmp_path_factory.mktemp("conceptgate_uce")
    folder_paths.add_model_folder_path("conceptgate", str(folder), is_default=True)
    folder_paths.add_model_folder_path("loras", str(folder), is_default=True)
    return folder


def erase_graph(prompt="a red triangle", method="UCE", save_name="", model_from="erase", gate_prompt=None, key="out",
                epochs=0):
    g = {
        "ckpt": {"class_type": "CGTest_TinyCheckpoint", "inputs": {"seed": 0}},
        "erase": {"class_type": "ConceptGateEraseConcepts", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "method": method, "concepts": "red triangle",
            "concept_type": "object", "guide": "", "preserve": "blue circle", "epochs": epochs, "lam": 0.5,
            "strength": 1.0, "erase_scale": 3.0, "save_name": save_name}},
        "pos": {"class_type": "ConceptGateTextEncode", "inputs": {"clip": ["ckpt", 1], "text": prompt}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": ""}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": ["ckpt", 0], "seed": 7, "steps": 3, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0}},
        "capture": {"class_type": "CGTest_CaptureLatent", "inputs": {"samples": ["sampler", 0], "key": key}},
    }
    if model_from == "erase":
        g["sampler"]["inputs"]["model"] = ["erase", 0]
    elif model_from == "stock":
        g["lora"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": ["ckpt", 0], "lora_name": save_name + ".safetensors", "strength_model": 1.0}}
        g["sampler"]["inputs"]["model"] = ["lora", 0]
    elif model_from == "stack":
        g["stack"] = {"class_type": "ConceptGateAddToStack", "inputs": {
            "eraser": ["erase", 1], "enabled": True, "strength": 1.0, "gate": "tokens", "cond_only": False}}
        g["apply"] = {"class_type": "ConceptGateApplyStack", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "stack": ["stack", 0], "positive": ["pos", 0],
            "mode": "per-row", "combine": "additive"}}
        g["sampler"]["inputs"]["model"] = ["apply", 0]
    return g


def run(executor, g):
    import sys

    import nodes

    outputs = executor.run(g)
    pack = sys.modules[nodes.NODE_CLASS_MAPPINGS["CGTest_CaptureLatent"].__module__]
    return pack.CAPTURED.pop(g["capture"]["inputs"]["key"]), outputs


def test_node_registered_with_tooltips(executor):
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS["ConceptGateEraseConcepts"]
    assert cls.CATEGORY == "ConceptGate" and tuple(cls.RETURN_TYPES) == ("MODEL", "CONCEPTGATE_ERASER", "STRING")
    for section, args in cls.INPUT_TYPES().items():
        if section == "hidden":
            continue
        for arg, (_, *opts) in args.items():
            assert opts and opts[0].get("tooltip"), f"{arg} has no tooltip"
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["ConceptGateEraseConcepts"] == "Erase Concepts (UCE / RECE)"
    assert "ConceptGateApplyStack" in nodes.NODE_CLASS_MAPPINGS      # the existing nodes are still there


def test_node_in_executor_saves_a_file_the_stock_loader_matches(executor, model_dir):
    base, _ = run(executor, erase_graph(model_from="ckpt"))
    erased, outputs = run(executor, erase_graph(save_name="tri_uce"))
    assert (erased - base).abs().max() > 1e-2
    assert "reconstruction error" in outputs["erase"]["text"][0]
    assert os.path.isfile(model_dir / "tri_uce.safetensors")
    assert load_eraser(model_dir / "tri_uce.safetensors").method == "uce"
    stock, _ = run(executor, erase_graph(save_name="tri_uce", model_from="stock"))
    assert close(stock, erased)
    # the ERASER output, stacked and gated per prompt: acts on its concept, leaves the others alone
    gated, outputs = run(executor, erase_graph(model_from="stack"))
    assert "gate 1.000" in outputs["apply"]["text"][0] and close(gated, erased)
    other_base, _ = run(executor, erase_graph(prompt="a green square", model_from="ckpt"))
    other, outputs = run(executor, erase_graph(prompt="a green square", model_from="stack"))
    assert "gate 0.000" in outputs["apply"]["text"][0] and torch.equal(other, other_base)


def test_node_never_saves_into_the_shipped_folder(executor, model_dir, monkeypatch):
    """The shipped erasers' folder is registered read-only: with it first in the list, the file still goes to
    the user's models/conceptgate folder (a run once left a file inside the package)."""
    import folder_paths

    from conceptgate.nodes.nodes_conceptgate import SHIPPED

    paths, exts = folder_paths.folder_names_and_paths["conceptgate"]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "conceptgate",
                        ([SHIPPED] + [p for p in paths if p != SHIPPED], exts))
    run(executor, erase_graph(save_name="not_in_the_package"))
    assert os.path.isfile(model_dir / "not_in_the_package.safetensors")
    assert not os.path.exists(os.path.join(SHIPPED, "not_in_the_package.safetensors"))


def test_rece_node_reports_progress(executor, model_dir):
    import comfy.utils

    seen = []
    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total, node_id)))
    try:
        _, outputs = run(executor, erase_graph(method="RECE", epochs=2))
    finally:
        comfy.utils.set_progress_bar_global_hook(old)
    assert "RECE" in outputs["erase"]["text"][0] and "2 RECE epochs" in outputs["erase"]["text"][0]
    mine = [(v, t) for v, t, n in seen if n == "erase"]
    assert mine[:3] == [(1, 3), (2, 3), (3, 3)]


def test_example_workflows_use_the_node_with_all_widgets(comfy):
    import nodes  # noqa: F401  (ComfyUI, booted by the executor fixture in this module)

    files = sorted(glob.glob(os.path.join(REPO, "example_workflows", "uce_*.json")))
    assert files
    from conceptgate.nodes.nodes_uce import EraseConcepts

    spec = EraseConcepts.INPUT_TYPES()
    widgets = [a for s in ("required", "optional") for a, (t, *_) in spec[s].items()
               if isinstance(t, list) or t in ("STRING", "INT", "FLOAT", "BOOLEAN", "COMBO")]
    for f in files:
        wf = json.load(open(f))
        ours = [n for n in wf["nodes"] if n["type"] == "ConceptGateEraseConcepts"]
        assert ours, f
        for n in ours:
            assert len(n["widgets_values"]) == len(widgets), (f, n["widgets_values"], widgets)
        ids = {n["id"] for n in wf["nodes"]}
        for link in wf["links"]:
            assert link[1] in ids and link[3] in ids


def test_node_in_context_edit_reaches_the_eraser(executor, model_dir):
    """synonyms + context (ConceptGate's in-context edit, as `edit --synonym --context` in the CLI): the saved
    eraser records them, names the synonym to its gate, and erases more vectors than the bare edit."""
    g = erase_graph(save_name="tri_ctx")
    g["erase"]["inputs"].update(synonyms="scarlet trigon", context="generic")
    _, outputs = run(executor, g)
    e = load_eraser(model_dir / "tri_ctx.safetensors")
    assert e.settings["synonyms"] == ["scarlet trigon"] and e.settings["context"] == "generic"
    assert "scarlet trigon" in e.concepts
    run(executor, erase_graph(save_name="tri_bare"))
    assert e.rank > load_eraser(model_dir / "tri_bare.safetensors").rank


def test_node_refuses_an_unknown_context(executor):
    g = erase_graph()
    g["erase"]["inputs"]["context"] = "poetry"
    with pytest.raises(AssertionError, match="context: 'poetry' not in"):
        executor.run(g)

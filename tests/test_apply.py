"""Weight erasers on a diffusers UNet: per-row hooks equal a hand-made W + delta merge."""

import pytest
import torch

from conceptgate.adapters import EraserStack, GateSettings, RowGatedDeltas, dense_deltas, layout_from_diffusers_config
from conceptgate.adapters.diffusers_host import DiffusersTextEncoder, attach, cfg_rows
from conceptgate.adapters.synthetic import random_eraser
from tiny_models import tiny_text_encoder, tiny_unet

TOL = 1e-4  # fp32: the hook path adds U(Dx) instead of (W + UD)x


def inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.full((batch,), 400), torch.randn(batch, 77, 64, generator=g)


def merged_output(unet, deltas, x, t, ctx):
    """Reference: copy the weights, add delta by hand, run, restore."""
    backup = {k: v.clone() for k, v in unet.state_dict().items()}
    with torch.no_grad():
        for name, d in deltas.items():
            unet.get_submodule(name).weight += d
        out = unet(x, t, ctx).sample
    unet.load_state_dict(backup)
    return out


@pytest.fixture(params=[False, True], ids=["conv-proj", "linear-proj"])
def unet(request):
    return tiny_unet(linear_proj=request.param)


@pytest.mark.parametrize("combine", ["additive", "official"])
@pytest.mark.parametrize("rank", [1, 3])
def test_hooks_equal_hand_merge(unet, combine, rank):
    layout = layout_from_diffusers_config(unet.config)
    stack = EraserStack(combine=combine)
    for seed in (1, 2):
        stack = stack.with_eraser(random_eraser(layout, rank=rank, seed=seed, scale=0.3, name=f"e{seed}"))
    coeffs = torch.tensor([0.8, 0.35])
    x, t, ctx = inputs()
    with torch.no_grad():
        base = unet(x, t, ctx).sample
        with RowGatedDeltas(stack, unet.get_submodule) as hooks, hooks.coefficients(coeffs):
            hooked = unet(x, t, ctx).sample
    ref = merged_output(unet, dense_deltas(stack, coeffs), x, t, ctx)
    assert (ref - base).abs().max() > 1e-2  # the eraser does something
    assert (hooked - ref).abs().max() < TOL


def test_official_is_gate_squared_and_has_cross_terms():
    layout = layout_from_diffusers_config(tiny_unet().config)
    a, b = random_eraser(layout, seed=1, name="a"), random_eraser(layout, seed=2, name="b")
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    one = EraserStack(combine="official").with_eraser(a)
    assert torch.allclose(dense_deltas(one, torch.tensor([0.5]))[name], 0.25 * a.modules[name].full(), atol=1e-7)
    two = EraserStack(combine="official").with_eraser(a).with_eraser(b)
    ua, da = a.modules[name].up, a.modules[name].down
    ub, db = b.modules[name].up, b.modules[name].down
    g = torch.tensor([0.5, 0.9])
    expected = (0.5 * ua + 0.9 * ub) @ (0.5 * da + 0.9 * db)
    assert torch.allclose(dense_deltas(two, g)[name], expected, atol=1e-7)
    additive = dense_deltas(two.with_combine("additive"), g)[name]
    assert torch.allclose(additive, 0.5 * ua @ da + 0.9 * ub @ db, atol=1e-7)


def test_each_row_gets_its_own_gate():
    unet = tiny_unet()
    layout = layout_from_diffusers_config(unet.config)
    stack = EraserStack().with_eraser(random_eraser(layout, seed=4, scale=0.3))
    x, t, ctx = inputs(batch=3)
    rows = torch.tensor([[0.0], [1.0], [0.4]])
    with torch.no_grad(), RowGatedDeltas(stack, unet.get_submodule) as hooks:
        with hooks.coefficients(rows):
            mixed = unet(x, t, ctx).sample
        base = unet(x, t, ctx).sample  # no coefficients set: hooks are inert
    for i, g in enumerate([0.0, 1.0, 0.4]):
        ref = merged_output(unet, dense_deltas(stack, torch.tensor([g])), x[i:i + 1], t[i:i + 1], ctx[i:i + 1])
        assert (mixed[i:i + 1] - ref).abs().max() < TOL
    assert torch.equal(mixed[0], base[0])  # gate 0 is bit-identical to no eraser


def test_hooks_leave_weights_untouched_and_detach():
    unet = tiny_unet()
    layout = layout_from_diffusers_config(unet.config)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    hooks = attach(unet, EraserStack().with_eraser(random_eraser(layout)))
    x, t, ctx = inputs()
    with torch.no_grad(), hooks.coefficients(torch.tensor([1.0])):
        unet(x, t, ctx)
    hooks.detach()
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    assert all(not m._forward_hooks for m in unet.modules())


def test_cfg_rows_layout_and_cond_only():
    layout = layout_from_diffusers_config(tiny_unet().config)
    e = random_eraser(layout)
    stack = EraserStack().with_eraser(e).with_eraser(e, gate=GateSettings(cond_only=True))
    coeffs = torch.tensor([[0.3, 0.7], [0.1, 0.2]])
    rows = cfg_rows(stack, coeffs, with_uncond=True)
    assert torch.equal(rows, torch.tensor([[0.3, 0.0], [0.1, 0.0], [0.3, 0.7], [0.1, 0.2]]))


# ------------------------------------------------------------------ Facilitated Transport
@pytest.fixture(scope="module")
def encoder(comfy):
    import os
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(os.path.join(comfy, "comfy", "sd1_tokenizer"))
    return DiffusersTextEncoder(tok, tiny_text_encoder())


def test_facilitated_transport_formula(encoder):
    from conceptgate.adapters.gate import ConceptBank, facilitated_transport

    bank = ConceptBank.encode(["van gogh", "starry night"], encoder)
    prompts = encoder(["a painting by van gogh", "a photo of a van", "a cat"])
    gamma, scores = facilitated_transport(prompts, bank)
    # by hand: max over concepts of max(cosine of flattened 77xD, token share)
    p = prompts.hidden.flatten(1)
    c = bank.hidden.flatten(1)
    cos = torch.nn.functional.cosine_similarity(p[:, None], c[None], dim=-1)
    tok = torch.tensor([[len(pt & ct) / len(ct) for ct in bank.tokens] for pt in prompts.tokens])
    assert torch.allclose(scores, torch.maximum(cos, tok), atol=1e-5)
    assert torch.allclose(gamma, torch.maximum(cos, tok).max(1).values, atol=1e-5)
    assert gamma[0] == 1.0  # all of "van gogh"'s tokens present
    assert 0.5 <= float(gamma[1]) < 1.0  # the official rule fires on half the tokens ("van")
    # the non-official calibration turns the partial token match off
    calibrated, _ = facilitated_transport(prompts, bank, GateSettings(rule="tokens", threshold=0.9, temperature=0.0))
    assert calibrated.tolist() == [1.0, 0.0, 0.0]
    soft = GateSettings(threshold=0.5, temperature=0.1)
    assert soft.calibrate(0.5) == pytest.approx(0.5) and soft.calibrate(0.9) > 0.98


def test_clip_skip_changes_the_embedding(encoder):
    from conceptgate.adapters.diffusers_host import DiffusersTextEncoder

    skip = DiffusersTextEncoder(encoder.tokenizer, encoder.text_encoder, clip_skip=1)
    a, b = encoder(["a red square"]), skip(["a red square"])
    assert a.tokens == b.tokens and not torch.allclose(a.hidden, b.hidden)


def test_a_failed_attach_leaves_no_hook():
    """If a module cannot be resolved half-way through attaching, the hooks already added are removed."""
    from conceptgate.adapters import EraserStack, RowGatedDeltas, layout_from_diffusers_config
    from conceptgate.adapters.synthetic import random_eraser
    from tiny_models import tiny_unet

    unet = tiny_unet()
    e = random_eraser(layout_from_diffusers_config(unet.config), which="attn2_kv", name="e")
    names = list(e.modules)

    def resolve(name):
        if name == names[-1]:
            raise KeyError(name)
        return unet.get_submodule(name)

    hooks = RowGatedDeltas(EraserStack().with_eraser(e), resolve)
    with pytest.raises(KeyError):
        hooks.attach()
    assert not any(m._forward_hooks for m in unet.modules()) and not hooks.attached

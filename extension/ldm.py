"""Canonical (diffusers) module names -> the LDM-layout UNet the webui loaded.

A1111 keeps the UNet at ``sd_model.model.diffusion_model`` (``ldm`` for SD1/2, ``sgm`` for SDXL),
Forge at ``forge_objects.unet.model.diffusion_model``; both use the LDM names
``input_blocks.N.1.transformer_blocks.J.attn2.to_k``. Neither stores the full config the name map
needs (``transformer_depth`` per block), so it is read from the module tree itself: the input
blocks between ``Downsample`` blocks form the levels, each block's transformer depth is the length
of its ``transformer_blocks``. Every mapped module is then checked to exist with the right shape.
"""

from __future__ import annotations

from torch import nn

from ..adapters.errors import IncompatibleModelError
from ..adapters.fingerprint import EDIT_METHODS, edit_base_mismatch
from ..adapters.naming import UNetLayout, guess_family
from ..adapters.stack import EraserStack


def _depth(block) -> int:
    for child in block.children():
        tb = getattr(child, "transformer_blocks", None)
        if tb is not None:
            return len(tb)
    return 0


def _transformer(block):
    return next((c for c in block.children() if hasattr(c, "transformer_blocks")), None)


def _is_downsample(block) -> bool:
    children = list(block.children())
    return len(children) == 1 and type(children[0]).__name__ == "Downsample"


def layout_of(dm: nn.Module) -> UNetLayout:
    """The :class:`UNetLayout` of an LDM ``UNetModel`` (A1111, Forge or ComfyUI)."""
    inputs = list(dm.input_blocks)
    model_channels = int(inputs[0][0].out_channels)
    levels: list[list[int]] = [[]]
    level_channels: list[int] = []
    for block in inputs[1:]:
        if _is_downsample(block):
            levels.append([])
            continue
        levels[-1].append(_depth(block))
        if len(levels[-1]) == 1:
            first = next(iter(block.children()))
            level_channels.append(int(getattr(first, "out_channels", model_channels)))
    mid = _depth(dm.middle_block) if hasattr(dm, "middle_block") else 0
    outputs = [_depth(b) for b in dm.output_blocks]
    context_dim = None
    linear = False
    for block in list(inputs) + [dm.middle_block] + list(dm.output_blocks):
        t = _transformer(block)
        if t is not None:
            context_dim = int(t.transformer_blocks[0].attn2.to_k.in_features)
            linear = isinstance(t.proj_in, nn.Linear)
            break
    if context_dim is None:
        raise IncompatibleModelError("UNet", "no cross-attention transformer found in this UNet")
    config = {
        "model_channels": model_channels,
        "channel_mult": [c // model_channels for c in level_channels],
        "num_res_blocks": [len(lv) for lv in levels],
        "transformer_depth": [d for lv in levels for d in lv],
        "transformer_depth_output": list(reversed(outputs)),
        "transformer_depth_middle": mid if mid > 0 else None,
        "context_dim": context_dim,
        "use_linear_in_transformer": linear,
    }
    return UNetLayout(config, family=guess_family(config))


def module_map(dm: nn.Module) -> tuple[UNetLayout, dict[str, str]]:
    """(layout, {canonical name: LDM module path}) with every path checked against ``dm``."""
    layout = layout_of(dm)
    mapping = {}
    for spec in layout.modules("spm"):
        try:
            module = dm.get_submodule(spec.ldm_name)
        except AttributeError:
            raise IncompatibleModelError("UNet", f"module {spec.ldm_name} expected from the UNet layout is missing") from None
        if tuple(module.weight.shape[:2]) != spec.weight_shape[:2]:
            raise IncompatibleModelError("UNet", f"{spec.ldm_name} has shape {tuple(module.weight.shape)}, "
                                                 f"the layout expects {spec.weight_shape}")
        mapping[spec.name] = spec.ldm_name
    return layout, mapping


def check_fits(stack: EraserStack, layout: UNetLayout, mapping: dict[str, str], diffusion_model=None) -> None:
    """Raise :class:`IncompatibleModelError` naming the file when a weight eraser does not fit (layout, and
    a closed-form edit's base fingerprint when ``diffusion_model`` is given and held in float32; the
    webui setting ``conceptgate_allow_other_base`` lifts that check)."""
    attn = None
    for _, entry in stack.weight_entries:
        e = entry.eraser
        missing = [n for n in e.modules if n not in mapping]
        problems = [f"{len(missing)} module(s) not in this model, e.g. {missing[0]}"] if missing else []
        problems += [p for p in e.check_against(layout) if "not in this UNet" not in p]
        if not problems and diffusion_model is not None and e.method in EDIT_METHODS:
            if attn is None:
                attn = {n: diffusion_model.get_submodule(ldm).weight.detach() for n, ldm in mapping.items()
                        if "attn2" in n and n.endswith((".to_k", ".to_v"))}
            why = edit_base_mismatch(e, attn, _allow_other_base())
            problems += [why.replace("ComfyUI: 'allow_other_base' on Apply Eraser Stack",
                                     "webui: setting 'conceptgate_allow_other_base'")] if why else []
        if problems:
            raise IncompatibleModelError(e.source or e.name, "; ".join(problems))


def _allow_other_base() -> bool:
    try:
        from modules import shared

        return bool(getattr(shared.opts, "conceptgate_allow_other_base", False))
    except (ImportError, AttributeError):
        return False
"""peft's LoRA layers on a user's UNet without touching the user's UNet (the trainers' ``lora_backend="peft"``).

``peft.inject_adapter_in_model`` swaps each target Linear/Conv2d for a ``lora.Linear``/``lora.Conv2d``
that wraps it, by assignment into the parent module. Done on the user's UNet that would rewrite the
user's model; here it is done on a *view*: a copy of the UNet's module tree in which only the target
modules' ancestors are new objects (shallow copies with their own child tables) and every other module,
every parameter and every buffer is the user's own object. The view therefore costs no weight memory,
computes exactly what the UNet computes, and after injection holds peft's layers while the user's UNet
still holds its plain modules.

The LoRA factors stay :class:`~conceptgate.adapters.spm.Membranes`' parameters: peft's ``lora_A`` /
``lora_B`` weights are replaced by the very same ``nn.Parameter`` objects, so the optimiser state,
resumable checkpoints and the exported eraser do not depend on the backend. Requires peft >= 0.10.
"""

from __future__ import annotations

import copy
import re
from typing import Mapping, Sequence

from torch import nn


def shared_view(root: nn.Module, names: Sequence[str]) -> nn.Module:
    """A copy of ``root`` whose submodules ``names`` can be replaced without changing ``root``: ``root``
    and every ancestor of a name are shallow-copied (own ``_modules`` table), all else is shared."""
    view = copy.copy(root)
    view._modules = dict(root._modules)
    copied = {id(view)}
    for name in names:
        parent = view
        for part in name.split(".")[:-1]:
            child = parent._modules[part]
            if id(child) not in copied:
                child = copy.copy(child)
                child._modules = dict(child._modules)
                parent._modules[part] = child
                copied.add(id(child))
            parent = child
    return view


def inject_lora(view: nn.Module, down: Mapping[str, nn.Parameter], up: Mapping[str, nn.Parameter],
                rank: int, alpha: float) -> list:
    """peft LoRA layers (rank ``rank``, ``lora_alpha`` ``alpha``, no dropout) on the modules named by
    ``down``'s keys inside ``view``, their factors replaced by ``down[name]`` / ``up[name]``. Returns the
    peft layers (``.scaling["default"]`` is what the caller sets to scale them)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer
    except ImportError as e:  # peft is a dependency of the package; a host venv may lack it
        raise ImportError("lora_backend='peft' needs the 'peft' package (pip install peft), "
                          "or train with lora_backend='hooks'") from e
    names = list(down)
    # a Conv2d narrower than the rank gets fewer rows (as Membranes makes them); re.escape: peft reads the
    # pattern keys as regular expressions
    ranks = {re.escape(n): int(down[n].shape[0]) for n in names if int(down[n].shape[0]) != int(rank)}
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=0.0, bias="none",
                        target_modules=names, init_lora_weights=False, rank_pattern=ranks)
    inject_adapter_in_model(config, view)
    layers = []
    for name in names:
        layer = view.get_submodule(name)
        if not isinstance(layer, LoraLayer):
            raise RuntimeError(f"peft did not wrap {name} ({type(layer).__name__})")
        a, b = layer.lora_A["default"], layer.lora_B["default"]
        if a.weight.shape != down[name].shape or b.weight.shape != up[name].shape:
            raise RuntimeError(f"{name}: peft's factors {tuple(a.weight.shape)}/{tuple(b.weight.shape)} differ from "
                               f"ours {tuple(down[name].shape)}/{tuple(up[name].shape)}")
        a.weight, b.weight = down[name], up[name]  # the same Parameter objects: one set of factors
        layers.append(layer)
    return layers

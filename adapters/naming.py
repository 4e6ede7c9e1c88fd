"""One canonical name space for UNet modules, and exact converters to the names hosts use.

The canonical name of a module is its **diffusers module path**
(``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k``): it is what official SPM files
encode, and it is what a diffusers ``UNet2DConditionModel`` answers to ``get_submodule``.

Other spellings of the same module:

* LDM / ComfyUI / A1111 state-dict paths: ``input_blocks.1.1.transformer_blocks.0.attn2.to_k``
  (ComfyUI prefixes ``diffusion_model.`` and suffixes ``.weight``);
* kohya LoRA prefixes: ``lora_unet_`` + either path with ``.`` replaced by ``_``. SD1.x files use
  the diffusers path, SDXL files usually the LDM path; both are read.

The maps are derived from the UNet config (the same compact form ComfyUI uses: ``num_res_blocks``,
``channel_mult``, ``transformer_depth`` ...), never from hand-written tables, and are tested to
agree key for key with ComfyUI's own ``comfy.utils.unet_to_diffusers``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

KOHYA_UNET_PREFIX = "lora_unet_"

# Sub-modules of one transformer block that SPM equips with a membrane (every Linear/Conv2d).
BLOCK_LINEARS = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ff.net.0.proj", "ff.net.2",
)


@dataclass(frozen=True)
class ModuleSpec:
    """A Linear or Conv2d inside the UNet, under both of its names."""

    name: str  # canonical (diffusers) path
    ldm_name: str  # LDM path, without the ``diffusion_model.`` prefix
    in_features: int
    out_features: int
    is_conv: bool = False  # 1x1 Conv2d (SD1.x proj_in / proj_out)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.is_conv:
            return (self.out_features, self.in_features, 1, 1)
        return (self.out_features, self.in_features)


@dataclass
class UNetLayout:
    """The attention-related modules of an SD-family UNet, derived from its config.

    ``config`` uses ComfyUI's unet_config keys. Use :func:`layout_from_diffusers_config` for a
    diffusers ``UNet2DConditionModel.config``.
    """

    config: dict
    family: str = "custom"
    transformers: list[tuple[str, str, int, int]] = field(default_factory=list)  # (diffusers, ldm, channels, depth)

    def __post_init__(self):
        if not self.transformers:
            self.transformers = list(_iter_transformers(self.config))

    @property
    def context_dim(self) -> int:
        return int(self.config["context_dim"])

    @property
    def linear_proj(self) -> bool:
        return bool(self.config.get("use_linear_in_transformer", False))

    def modules(self, which: str = "spm") -> list[ModuleSpec]:
        """Module specs: ``"spm"`` (every Linear/Conv2d in every transformer, SPM's target set),
        ``"attn2_kv"`` (cross-attention key/value projections, what UCE/RECE edit) or
        ``"attn2"`` (all cross-attention projections)."""
        specs = []
        ctx = self.context_dim
        for dname, lname, ch, depth in self.transformers:
            if which == "spm":
                for proj in ("proj_in", "proj_out"):
                    specs.append(ModuleSpec(f"{dname}.{proj}", f"{lname}.{proj}", ch, ch, not self.linear_proj))
            for t in range(depth):
                for sub in BLOCK_LINEARS:
                    if which == "attn2_kv" and sub not in ("attn2.to_k", "attn2.to_v"):
                        continue
                    if which == "attn2" and not sub.startswith("attn2."):
                        continue
                    in_f, out_f = ch, ch
                    if sub in ("attn2.to_k", "attn2.to_v"):
                        in_f = ctx
                    elif sub == "ff.net.0.proj":
                        out_f = ch * 8  # GEGLU: two halves of 4C
                    elif sub == "ff.net.2":
                        in_f = ch * 4
                    suffix = f"transformer_blocks.{t}.{sub}"
                    specs.append(ModuleSpec(f"{dname}.{suffix}", f"{lname}.{suffix}", in_f, out_f))
        if which not in ("spm", "attn2_kv", "attn2"):
            raise ValueError(f"unknown module set {which!r}")
        return specs

    def to_ldm(self) -> dict[str, str]:
        """Canonical (diffusers) module path -> LDM module path, for every module in the SPM set."""
        return {m.name: m.ldm_name for m in self.modules("spm")}



def _iter_transformers(cfg: dict):
    """Yield (diffusers prefix, LDM prefix, channels, depth) for every Transformer2D of the UNet.

    Follows the block numbering of the LDM UNet: input block n = 1 + (res_blocks + 1) * level + i,
    ``transformer_depth_output`` is consumed from its end (ComfyUI's convention).
    """
    num_res = list(cfg["num_res_blocks"])
    mult = list(cfg["channel_mult"])
    base = int(cfg["model_channels"])
    depth_in = list(cfg["transformer_depth"])
    depth_out = list(cfg["transformer_depth_output"])
    depth_mid = cfg.get("transformer_depth_middle")
    levels = len(mult)
    if isinstance(num_res, int):  # pragma: no cover - configs in the wild sometimes use an int
        num_res = [num_res] * levels
    for level in range(levels):
        n = 1 + (num_res[level] + 1) * level
        for i in range(num_res[level]):
            depth = depth_in.pop(0)
            if depth > 0:
                yield f"down_blocks.{level}.attentions.{i}", f"input_blocks.{n}.1", base * mult[level], depth
            n += 1
    if depth_mid is not None and depth_mid > 0:
        yield "mid_block.attentions.0", "middle_block.1", base * mult[-1], depth_mid
    rev = list(reversed(num_res))
    for up in range(levels):
        n = (rev[up] + 1) * up
        for i in range(rev[up] + 1):
            depth = depth_out.pop()
            if depth > 0:
                yield f"up_blocks.{up}.attentions.{i}", f"output_blocks.{n}.1", base * mult[levels - 1 - up], depth
            n += 1


def layout_from_diffusers_config(cfg) -> UNetLayout:
    """Translate a diffusers ``UNet2DConditionModel`` config into a :class:`UNetLayout`."""
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    down_types = list(get("down_block_types"))
    levels = len(down_types)
    block_out = list(get("block_out_channels"))
    base = block_out[0]
    mult = [c // base for c in block_out]
    lpb = get("layers_per_block")
    num_res = list(lpb) if isinstance(lpb, (list, tuple)) else [lpb] * levels
    tlpb = get("transformer_layers_per_block", 1)
    tdepth = list(tlpb) if isinstance(tlpb, (list, tuple)) else [tlpb] * levels
    depth_in, depth_out = [], []
    for level, kind in enumerate(down_types):
        d = tdepth[level] if "CrossAttn" in kind else 0
        depth_in += [d] * num_res[level]
    up_types = list(get("up_block_types"))
    rev_t = list(get("reverse_transformer_layers_per_block") or reversed(tdepth))
    for up, kind in enumerate(up_types):
        level = levels - 1 - up
        d = rev_t[up] if "CrossAttn" in kind else 0
        depth_out += [d] * (num_res[level] + 1)
    mid_type = get("mid_block_type", "UNetMidBlock2DCrossAttn")
    mid = tdepth[-1] if mid_type and "CrossAttn" in mid_type else None
    ctx = get("cross_attention_dim")
    if isinstance(ctx, (list, tuple)):
        ctx = ctx[0]
    config = {
        "model_channels": base,
        "channel_mult": mult,
        "num_res_blocks": num_res,
        "transformer_depth": depth_in,
        # ComfyUI pops transformer_depth_output from its end: store it highest-resolution first.
        "transformer_depth_output": list(reversed(depth_out)),
        "transformer_depth_middle": mid,
        "context_dim": ctx,
        "use_linear_in_transformer": bool(get("use_linear_projection", False)),
    }
    return UNetLayout(config, family=guess_family(config))


def guess_family(cfg: dict) -> str:
    """sd1 / sd2 / sdxl / custom, from the context width and channel layout."""
    ctx = int(cfg.get("context_dim") or 0)
    ch = int(cfg.get("model_channels") or 0)
    if ctx == 768 and ch == 320:
        return "sd1"
    if ctx == 1024 and ch == 320:
        return "sd2"
    if ctx == 2048 and ch == 320:
        return "sdxl"
    return "custom"


# Reference configs in ComfyUI's unet_config form (the public SD architectures).
SD15_CONFIG = {
    "model_channels": 320, "channel_mult": [1, 2, 4, 4], "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "transformer_depth_middle": 1, "context_dim": 768, "use_linear_in_transformer": False,
}
SD21_CONFIG = dict(SD15_CONFIG, context_dim=1024, use_linear_in_transformer=True)
SDXL_CONFIG = {
    "model_channels": 320, "channel_mult": [1, 2, 4], "num_res_blocks": [2, 2, 2],
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "transformer_depth_middle": 10, "context_dim": 2048, "use_linear_in_transformer": True,
}
REFERENCE_LAYOUTS = {"sd1": SD15_CONFIG, "sd2": SD21_CONFIG, "sdxl": SDXL_CONFIG}


def reference_layout(family: str) -> UNetLayout:
    return UNetLayout(dict(REFERENCE_LAYOUTS[family]), family=family)


# ---------------------------------------------------------------- kohya keys

def to_kohya(name: str) -> str:
    """Canonical module path -> kohya LoRA prefix (``lora_unet_down_blocks_0_...``)."""
    return KOHYA_UNET_PREFIX + name.replace(".", "_")


# Tokens of module paths that contain an underscore themselves; everything else splits on "_".
_MULTI_WORD = (
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "input_blocks", "output_blocks",
    "middle_block", "proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out",
)
_KOHYA_TOKEN = re.compile("|".join(sorted(_MULTI_WORD, key=len, reverse=True)) + r"|[a-z]+[0-9]*|[0-9]+")


def from_kohya(prefix: str, known: dict[str, str] | None = None) -> str:
    """kohya prefix -> module path with dots.

    With ``known`` (a map {kohya prefix: canonical name}, e.g. from :func:`kohya_map`) the lookup is
    exact. Without it the prefix is parsed with the UNet's naming grammar; the result is a diffusers
    or an LDM path depending on which the file used.
    """
    if known is not None and prefix in known:
        return known[prefix]
    if not prefix.startswith(KOHYA_UNET_PREFIX):
        raise KeyError(f"not a kohya UNet key: {prefix!r}")
    body = prefix[len(KOHYA_UNET_PREFIX):]
    tokens = []
    pos = 0
    while pos < len(body):
        m = _KOHYA_TOKEN.match(body, pos)
        if m is None:
            raise KeyError(f"cannot parse kohya key {prefix!r} at {body[pos:]!r}")
        tokens.append(m.group(0))
        pos = m.end()
        if pos < len(body):
            if body[pos] != "_":
                raise KeyError(f"cannot parse kohya key {prefix!r} at {body[pos:]!r}")
            pos += 1
    return ".".join(tokens)


def kohya_map(layout: UNetLayout, which: str = "spm") -> dict[str, str]:
    """{kohya prefix: canonical name}, accepting both the diffusers-path and the LDM-path spelling."""
    out = {}
    for m in layout.modules(which):
        out[to_kohya(m.name)] = m.name
        out[KOHYA_UNET_PREFIX + m.ldm_name.replace(".", "_")] = m.name
    return out

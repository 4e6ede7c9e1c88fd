"""SPM membranes trained with Latent Anchoring (Lyu et al., CVPR 2024), host-agnostic (torch + diffusers).

The membranes and the loss terms are in :mod:`.membranes`; this module holds the configuration and the
trainer.

A *membrane* is a rank-1 LoRA (``lora_down`` kaiming-uniform a=sqrt(5), ``lora_up`` zeros, alpha 1) on
every Linear/Conv2d of every transformer of a diffusers ``UNet2DConditionModel``
(``layout.modules("spm")``, 192 modules on SD1.x): ``y = W x + b + multiplier * (alpha/rank) * U(D(x))``.
While training it acts through peft's LoRA layers on a weight-sharing view of the UNet
(``lora_backend="peft"``, default) or through forward hooks (``"hooks"``); the user's UNet is never written.

One iteration of Latent Anchoring (reference notes, section 1.4)::

    k ~ U{1..ddim_steps-1};  x_T ~ N(0, I)
    x_t  = k DDIM steps (of ddim_steps) of the membrane-equipped model, CFG cfg, prompt = target
    t    = timesteps_1000[int(k * 1000 / ddim_steps)]
    L_erase = MSE(eps_SPM(x_t, e_tgt), eps_orig(x_t, e_neu) - eta * (eps_orig(x_t, e_pos) - eps_orig(x_t, e_neu)))
    anchors a_k = u_k * ||e_tgt||_F * z_k / ||z_k||_F,   z_k ~ N(0, I) accepted with prob 1 - cos(e_tgt, z_k),
                  u_k ~ U[0.8, 1.2]
    L_LA    = MSE(eps_SPM(x_t, a_k), eps_orig(x_t, a_k))
    L       = L_erase + la_strength * L_LA

with e_pos = e_tgt, e_neu = E(surrogate) (default ""), eta = 1, la_strength = 1000, 4 anchors,
AdamW lr 1e-4, cosine-with-hard-restarts (3 cycles, warmup 500 of 3000 iterations, scaled with the
iteration count), 3000 iterations, DDIM 30 steps at CFG 3.

``anchor_mode``:

* ``"fixed"`` (default): all sampled anchors contribute to L_LA (what the paper describes).
* ``"official_quirk"``: the reference code's batch layout, for parity. It builds the anchor batch
  ``[u, a1, u, a2, ..., u, aK]`` (u = E("")), runs it against the latents duplicated for CFG and keeps
  the second half of the output (guidance 1), so L_LA is computed on ``[u, a_{K/2+1}, u, ..., u, a_K]``:
  the unconditional prediction is anchored K/2 times and the first K/2 anchors get no gradient.

Deviations from the reference: plain ``torch.optim.AdamW`` instead of bitsandbytes' AdamW8bit (not
available on CPU; same update rule up to 8-bit state quantisation); no ``dynamic_resolution`` (one
latent size, ``resolution`` pixels, default the UNet's ``sample_size * 8``); the anchor-batch quirk fixed
by default; the trajectory's random numbers come from one seeded generator so checkpoints resume exactly.

Beyond the reference (opt-in, non-official): ``templates`` put the concept in context. Each iteration
draws a template; e_pos / the trajectory prompt become the template filled with the target, e_neu the
same template filled with the surrogate (``train spm --templates toy`` uses the toy world's caption
templates). The anchors and the Facilitated-Transport concept stay the bare target.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..eraser import Eraser
from ..training import CheckpointedTrainer, TrainResult  # noqa: F401  (TrainResult: re-exported)
from .membranes import LORA_BACKENDS, Membranes, fill_template, latent_anchor_loss, sample_anchors, spm_module_names

ANCHOR_MODES = ("fixed", "official_quirk")
REFERENCE_ITERATIONS = 3000
REFERENCE_WARMUP = 500


# ----------------------------------------------------------------------------- configuration
@dataclass
class SPMConfig:
    """Latent Anchoring hyperparameters (defaults = the reference's shipped configs)."""

    concept: str
    surrogate: str = ""
    iterations: int = REFERENCE_ITERATIONS
    lr: float = 1e-4
    la_strength: float = 1000.0
    anchors: int = 4  # the reference's sampling_batch_size
    anchor_mode: str = "fixed"
    eta: float = 1.0  # erase strength ("guidance_scale" in the prompt YAML)
    rank: int = 1
    alpha: float = 1.0
    warmup: int | None = None  # None: 500 scaled by iterations / 3000
    cycles: int = 3
    ddim_steps: int = 30
    cfg: float = 3.0
    resolution: int | None = None  # pixels; None: unet.config.sample_size * 8
    weight_decay: float = 0.01  # torch AdamW's default (bitsandbytes AdamW8bit uses the same)
    seed: int = 0
    # how the trainable factors meet the frozen UNet (Membranes.bind): "peft" (peft's LoRA layers on a
    # weight-sharing view, the user's UNet untouched) or "hooks" (forward hooks); same function, same file
    lora_backend: str = "peft"
    save_every: int = 500
    # Beyond the reference (non-official): prompts with "{}" where the concept goes. Each iteration
    # picks one; the target prompt is the template with the concept, the surrogate prompt the same
    # template with the surrogate, so the membrane learns the concept inside full prompts and keeps
    # the rest of the prompt. Empty = the reference (bare concept and surrogate).
    templates: tuple = ()
    # Beyond the reference (non-official, needs templates): other names of the concept (synonyms,
    # paraphrases) filled into the same templates as extra target prompts, each paired with the template's
    # surrogate prompt, so the membrane maps them fully (a partly erased synonym leaves a blob).
    synonyms: tuple = ()

    def __post_init__(self):
        self.synonyms = tuple(s.strip() for s in self.synonyms if s and s.strip())
        if self.synonyms and not self.templates:
            raise ValueError("synonyms are trained inside templates: give templates too")
        if self.lora_backend not in LORA_BACKENDS:
            raise ValueError(f"unknown LoRA backend {self.lora_backend!r} ({', '.join(LORA_BACKENDS)})")
        self.templates = tuple(self.templates)
        for t in self.templates:
            if t.count("{}") != 1:
                raise ValueError(f"template {t!r} must contain exactly one '{{}}' (where the concept goes)")
        if self.anchor_mode not in ANCHOR_MODES:
            raise ValueError(f"unknown anchor mode {self.anchor_mode!r} ({', '.join(ANCHOR_MODES)})")
        if self.anchor_mode == "official_quirk" and self.anchors % 2:
            raise ValueError("official_quirk needs an even number of anchors (the reference splits the batch in halves)")
        if self.iterations < 1 or self.rank < 1 or self.anchors < 1:
            raise ValueError("iterations, rank and anchors must be positive")
        if self.ddim_steps < 2:
            raise ValueError("ddim_steps must be at least 2")

    @property
    def warmup_steps(self) -> int:
        if self.warmup is not None:
            return int(self.warmup)
        return int(round(REFERENCE_WARMUP * self.iterations / REFERENCE_ITERATIONS))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["templates"] = list(self.templates)
        d["synonyms"] = list(self.synonyms)
        d["warmup_steps"] = self.warmup_steps
        return d

    # what must agree between a checkpoint and a resumed run
    def trajectory_key(self) -> dict:
        d = self.to_dict()
        d.pop("save_every")
        if not d["synonyms"]:
            d.pop("synonyms")  # checkpoints written before the option resume as before
        return d


# ----------------------------------------------------------------------------- the trainer
class LatentAnchoringTrainer(CheckpointedTrainer):
    """Latent Anchoring on a diffusers UNet + CLIP text encoder (+ tokenizer). Float32, any device.

    ``train()`` runs to ``config.iterations`` (resuming from ``checkpoint_dir/state.pt`` when asked),
    writing ``<name>_<i>steps.safetensors`` and the resumable state every ``save_every`` iterations.
    """

    def __init__(self, unet, text_encoder, tokenizer, scheduler_config: dict, config: SPMConfig,
                 device: str | torch.device = "cpu", clip_skip: int | None = None):
        self.setup_frozen_models(config, unet, text_encoder, tokenizer, scheduler_config, device, clip_skip)
        self.membranes = Membranes(self.unet, spm_module_names(self.unet), config.rank, config.alpha,
                                   self.generator).to(self.device)
        self.net = self.membranes.bind(self.unet, config.lora_backend)  # the UNet as the loss calls it
        self.optimizer = torch.optim.AdamW(self.membranes.parameters(), lr=config.lr,
                                           weight_decay=config.weight_decay)
        from diffusers.optimization import get_cosine_with_hard_restarts_schedule_with_warmup

        self.lr_schedule = get_cosine_with_hard_restarts_schedule_with_warmup(
            self.optimizer, config.warmup_steps, config.iterations, num_cycles=config.cycles)
        with torch.no_grad():
            enc = self.encoder([config.concept, config.surrogate, ""])
        self.e_tgt, self.e_neu, self.e_unc = (h[None].to(self.device) for h in enc.hidden)
        self.e_pos = self.e_tgt
        # templated prompts: (target, surrogate) embeddings per template, encoded once
        self.template_pos = self.template_neu = None
        if config.templates:
            names = (config.concept,) + config.synonyms
            pairs = [(fill_template(t, n), fill_template(t, config.surrogate)) for t in config.templates for n in names]
            pos, neu = [p for p, _ in pairs], [q for _, q in pairs]
            with torch.no_grad():
                self.template_pos = self.encoder(pos).hidden.to(self.device)
                self.template_neu = self.encoder(neu).hidden.to(self.device)
        px = config.resolution or int(unet.config.sample_size) * 8
        self.latent_size = px // 8
        self.iteration = 0
        self.losses: list = []

    # ---------------------------------------------------------------- pieces
    def predict(self, latents: torch.Tensor, context: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t, device=self.device).reshape(-1).expand(latents.shape[0])
        return self.net(latents, t, encoder_hidden_states=context).sample

    @torch.no_grad()
    def trajectory(self, k: int, noise: torch.Tensor, prompt: torch.Tensor | None = None) -> torch.Tensor:
        """x_t after ``k`` DDIM steps (of ``ddim_steps``) of the membrane-equipped model at CFG ``cfg``."""
        cfg = self.config
        self.sampler.set_timesteps(cfg.ddim_steps, device=self.device)
        x = noise.to(self.device) * self.sampler.init_noise_sigma
        ctx = torch.cat([self.e_unc, self.e_tgt if prompt is None else prompt])
        with self.membranes.on(1.0):
            for t in self.sampler.timesteps[:k]:
                inp = self.sampler.scale_model_input(torch.cat([x, x]), t)
                unc, txt = self.predict(inp, ctx, t).chunk(2)
                eps = unc + cfg.cfg * (txt - unc)
                x = self.sampler.step(eps, t, x).prev_sample
        return x

    def timestep_1000(self, k: int) -> int:
        """The reference's ``set_timesteps(1000)`` then ``timesteps[int(k * 1000 / ddim_steps)]``."""
        timesteps = list(range(self.num_train_timesteps - 1, -1, -1))
        return timesteps[int(k * self.num_train_timesteps / self.config.ddim_steps)]

    def step(self) -> dict:
        """One Latent Anchoring iteration; returns the losses."""
        cfg, g = self.config, self.generator
        k = int(torch.randint(1, cfg.ddim_steps, (1,), generator=g))
        noise = torch.randn(1, self.unet.config.in_channels, self.latent_size, self.latent_size, generator=g)
        anchors = sample_anchors(self.e_tgt, cfg.anchors, g).to(self.device)
        e_pos, e_neu = self.e_pos, self.e_neu
        if self.template_pos is not None:
            j = int(torch.randint(0, self.template_pos.shape[0], (1,), generator=g))  # templates x names
            e_pos, e_neu = self.template_pos[j: j + 1], self.template_neu[j: j + 1]
        x_t = self.trajectory(k, noise, e_pos)
        t = self.timestep_1000(k)
        pred = lambda lat, ctx: self.predict(lat, ctx, t)  # noqa: E731
        with torch.no_grad(), self.membranes.on(0.0):
            eps = pred(torch.cat([x_t, x_t]), torch.cat([e_pos, e_neu]))
            eps_pos, eps_neu = eps.chunk(2)
            target = eps_neu - cfg.eta * (eps_pos - eps_neu)
        self.optimizer.zero_grad(set_to_none=True)
        with self.membranes.on(1.0):
            erase = F.mse_loss(pred(x_t, e_pos), target)
        anchor = latent_anchor_loss(pred, self.membranes, x_t, anchors, self.e_unc, cfg.anchor_mode)
        loss = erase + cfg.la_strength * anchor
        loss.backward()
        self.optimizer.step()
        self.lr_schedule.step()
        self.iteration += 1
        rec = {"iteration": self.iteration, "loss": loss.item(), "erase": erase.item(), "anchor": anchor.item(),
               "k": k, "t": t, "lr": self.lr_schedule.get_last_lr()[0]}
        self.losses.append((self.iteration, rec["loss"], rec["erase"], rec["anchor"]))
        return rec

    # ---------------------------------------------------------------- state
    trained_key = "membranes"

    def trained_module(self):
        return self.membranes

    # ---------------------------------------------------------------- output
    def hyperparameters(self) -> dict:
        cfg = self.config
        return {**cfg.to_dict(), "method": "latent_anchoring", "optimizer": "torch.optim.AdamW",
                "reference_optimizer": "AdamW8bit", "lr_scheduler": "cosine_with_restarts",
                "latent_size": self.latent_size, "iterations_run": self.iteration,
                "modules": len(self.membranes.names), "e_pos": "target",
                "neutral": cfg.surrogate, "base_fingerprint": self.base_fingerprint()}

    def eraser(self, name: str | None = None) -> Eraser:
        cfg = self.config
        settings = {"surrogate": cfg.surrogate, "anchor_mode": cfg.anchor_mode, "trainer": "latent_anchoring"}
        return self.membranes.to_eraser(cfg.concept, name=name, settings=settings, base_family=self.layout.family,
                                        base_fingerprint=self.base_fingerprint(), text_fingerprint=self.text_fingerprint())

    # ---------------------------------------------------------------- loop (CheckpointedTrainer.train)
    postfix_fields = (("loss", "loss", ".4g"), ("erase", "erase", ".4g"), ("la", "anchor", ".3g"))

    @property
    def progress_desc(self) -> str:
        return f"spm {self.config.concept!r}"


def load_diffusers_parts(path: str, device="cpu"):
    """(unet, text_encoder, tokenizer, scheduler_config) from a diffusers folder."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if not os.path.isfile(os.path.join(path, "model_index.json")) and not os.path.isdir(os.path.join(path, "unet")):
        raise FileNotFoundError(f"{path} is not a diffusers model folder (no model_index.json / unet/)")
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=torch.float32)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=torch.float32)
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    with open(os.path.join(path, "scheduler", "scheduler_config.json")) as f:
        scheduler_config = json.load(f)
    return unet, text_encoder, tokenizer, scheduler_config

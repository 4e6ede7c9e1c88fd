"""All-but-One as a fine-tuned low-rank adapter (Hong, Lee, Woo, AAAI 2024): **a reconstruction**.

Only the paper's abstract is public. What it states: a "surgical update on the classifier guidance
term while constraining the drift of the unconditional score term", with a user-chosen alternative
concept. The objective below is our reading of that sentence (reference notes, section 2.2), not
the paper's equation; its weighting, data, tuned parameters and schedule are not published::

    g(x_t, c) = eps(x_t, c) - eps(x_t, "")                        (the classifier-guidance term of CFG)
    L = || g_theta(x_t, c_e) - g_0(x_t, c_a) ||^2  +  lambda * || eps_theta(x_t, "") - eps_0(x_t, "") ||^2

``eps_0`` is the frozen original UNet, ``eps_theta`` the UNet with the adapter, ``c_e`` a prompt naming
the erased concept and ``c_a`` the same prompt with the alternative swapped in (``c_a = ""`` when
the alternative is empty: the erased concept's guidance is then trained to zero). At the optimum
``eps_theta(x_t, "") = eps_0(x_t, "")`` and ``eps_theta(x_t, c_e) = eps_0(x_t, c_a)``: the
unconditional score (layout, DDIM inversion) is unchanged and the concept's guidance is the
alternative's.

Choices beyond the abstract (each an option; defaults measured on the toy world, see
``toyworld/erasers/README.md`` and the ``quality-abo-adapter`` section of BENCHMARKS.md):

* **the adapter**: a rank-``r`` LoRA (``lora_down`` kaiming-uniform a=sqrt(5), ``lora_up`` zeros, so
  it starts as the identity) on a module set: ``attn2_kv`` (cross-attention key/value projections:
  acts on the text tokens only), ``attn2`` (all cross-attention projections) or ``spm`` (every
  Linear/Conv2d of every transformer, SPM's set). The factors are
  :class:`~conceptgate.adapters.spm.Membranes`; ``lora_backend`` says how they meet the frozen UNet:
  ``"peft"`` (default) puts peft's LoRA layers into a weight-sharing view of the UNet
  (:mod:`~conceptgate.adapters.peft_view`: peft's ``inject_adapter_in_model`` replaces modules by
  assignment, so it is given a copy of the module tree, never the user's), ``"hooks"`` uses forward
  hooks. Same function, same factors (``tests/test_lora_backend.py``); the file is kohya keys either way.
* **prompts in context**: ``c_e`` are caption templates with the concept filled in (for the toy
  world its own training templates with random colour and style, keyword and synonym names; for
  other models a small set of generic templates), ``c_a`` the *same* template with the alternative
  swapped in, so that the erasure generalises from the bare word to full prompts and keeps the
  other attributes (colour, style) of the prompt.
* **x_t (training-free samples)**: a pool of clean latents generated once by the *original* model
  (DDIM ``pool_steps`` at CFG ``pool_cfg``) from the ``c_e`` prompts and, by default, as many from the
  matching ``c_a`` prompts (the fixed point's trajectory runs through alternative-looking latents),
  then noised with the forward process at ``t ~ U{0..T-1}`` each iteration. Each pool latent keeps
  its prompt pair, so ``x_t`` matches the prompt's colour and style. Cheaper than SPM-like
  trajectories of the model being trained (no sampling inside the loop).
* plain AdamW with a cosine schedule and a short warmup; float32.

The model output is used as it is (epsilon, or v for v-prediction models: ``g`` is then the same
difference of v's, the objective is linear in the output either way).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..eraser import Eraser
from ..naming import layout_from_diffusers_config
from ..prompts import GENERIC_TEMPLATES, prompt_pairs  # noqa: F401  (re-exported)
from ..spm import Membranes
from ..spm.membranes import LORA_BACKENDS
from ..training import CheckpointedTrainer, TrainResult  # noqa: F401  (TrainResult: re-exported)

MODULE_SETS = ("attn2_kv", "attn2", "spm")
CONTEXTS = ("toy", "generic", "bare")
POOL_SOURCES = ("both", "erase")

# ----------------------------------------------------------------------------- configuration
@dataclass
class ABOConfig:
    """Hyperparameters of the reconstructed All-but-One adapter training."""

    concept: str
    alternative: str = ""
    lam: float = 1.0  # weight of the unconditional-preservation term
    iterations: int = 600
    lr: float = 1e-3
    batch: int = 4
    rank: int = 4
    alpha: float | None = None  # None: alpha = rank (scale 1)
    modules: str = "attn2_kv"
    context: str = "toy"
    pool_size: int = 64  # clean latents from each source
    pool_from: str = "both"
    pool_steps: int = 25
    pool_cfg: float = 5.0
    warmup: int | None = None  # None: 5% of the iterations
    weight_decay: float = 0.0
    resolution: int | None = None  # pixels; None: unet.config.sample_size * 8
    seed: int = 0
    # how the trainable factors meet the frozen UNet (Membranes.bind): "peft" (peft's LoRA layers on a
    # weight-sharing view, the user's UNet untouched) or "hooks" (forward hooks); same function, same file
    lora_backend: str = "peft"
    save_every: int = 100

    def __post_init__(self):
        if self.lora_backend not in LORA_BACKENDS:
            raise ValueError(f"unknown LoRA backend {self.lora_backend!r} ({', '.join(LORA_BACKENDS)})")
        if not str(self.concept).strip():
            raise ValueError("the concept to erase is empty")
        if self.alternative.strip().lower() == self.concept.strip().lower():
            raise ValueError(f"the alternative {self.alternative!r} is the erased concept itself")
        if self.modules not in MODULE_SETS:
            raise ValueError(f"unknown module set {self.modules!r} ({', '.join(MODULE_SETS)})")
        if self.context not in CONTEXTS:
            raise ValueError(f"unknown prompt context {self.context!r} ({', '.join(CONTEXTS)})")
        if self.pool_from not in POOL_SOURCES:
            raise ValueError(f"unknown pool source {self.pool_from!r} ({', '.join(POOL_SOURCES)})")
        for name in ("iterations", "batch", "rank", "pool_size", "pool_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be positive (got {getattr(self, name)})")
        if not (self.lam >= 0 and math.isfinite(self.lam)):
            raise ValueError(f"lambda must be a finite number >= 0 (got {self.lam})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"the learning rate must be positive (got {self.lr})")

    @property
    def warmup_steps(self) -> int:
        return int(self.warmup) if self.warmup is not None else int(round(0.05 * self.iterations))

    @property
    def scale_alpha(self) -> float:
        return float(self.alpha) if self.alpha else float(self.rank)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["warmup_steps"] = self.warmup_steps
        d["lambda"] = d.pop("lam")
        return d

    def trajectory_key(self) -> dict:
        d = self.to_dict()
        d.pop("save_every")
        return d


# ----------------------------------------------------------------------------- the objective
def abo_loss(eps_theta_e: torch.Tensor, eps_theta_u: torch.Tensor, eps0_a: torch.Tensor, eps0_u: torch.Tensor,
             lam: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L, L_guid, L_unc) of the reconstructed objective, mean squared errors over all elements.

    ``L_guid = MSE(eps_theta(c_e) - eps_theta(""), eps_0(c_a) - eps_0(""))``,
    ``L_unc = MSE(eps_theta(""), eps_0(""))``, ``L = L_guid + lam * L_unc``."""
    guid = F.mse_loss(eps_theta_e - eps_theta_u, eps0_a - eps0_u)
    unc = F.mse_loss(eps_theta_u, eps0_u)
    return guid + lam * unc, guid, unc


def module_names(unet, which: str) -> list[str]:
    return [m.name for m in layout_from_diffusers_config(unet.config).modules(which)]


# ----------------------------------------------------------------------------- the trainer
class ABOTrainer(CheckpointedTrainer):
    """Trains the reconstructed All-but-One objective as a low-rank adapter on a diffusers UNet.

    ``train()`` runs to ``config.iterations`` (resuming from ``checkpoint_dir/state.pt`` when asked),
    writing ``<name>_<i>steps.safetensors`` and the resumable state every ``save_every`` iterations.
    The UNet and text encoder are frozen and never written (peft view or forward hooks, ``lora_backend``).
    """

    def __init__(self, unet, text_encoder, tokenizer, scheduler_config: dict, config: ABOConfig,
                 device: str | torch.device = "cpu", clip_skip: int | None = None):
        from diffusers.optimization import get_cosine_schedule_with_warmup

        self.setup_frozen_models(config, unet, text_encoder, tokenizer, scheduler_config, device, clip_skip)
        self.adapter = Membranes(self.unet, module_names(self.unet, config.modules), config.rank,
                                 config.scale_alpha, self.generator).to(self.device)
        self.net = self.adapter.bind(self.unet, config.lora_backend)  # the UNet as the loss calls it
        self.optimizer = torch.optim.AdamW(self.adapter.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.lr_schedule = get_cosine_schedule_with_warmup(self.optimizer, config.warmup_steps, config.iterations)
        self.pairs = prompt_pairs(config.concept, config.alternative, config.context)
        with torch.no_grad():
            e = self.encoder([p for p, _ in self.pairs]).hidden
            a = self.encoder([q for _, q in self.pairs]).hidden
            u = self.encoder([""]).hidden
        self.e_erase, self.e_alt, self.e_unc = e.to(self.device), a.to(self.device), u.to(self.device)
        px = config.resolution or int(unet.config.sample_size) * 8
        self.latent_size = px // 8
        self.pool: torch.Tensor | None = None  # [N, C, h, w] clean latents
        self.pool_pairs: torch.Tensor | None = None  # [N] prompt-pair index of each latent
        self.iteration = 0
        self.losses: list = []

    def close(self):
        """Remove the adapter's hooks from the UNet (it is then exactly the model passed in)."""
        self.adapter.detach()

    # ---------------------------------------------------------------- pieces
    def predict(self, latents: torch.Tensor, context: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(latents, t.to(self.device), encoder_hidden_states=context).sample

    @torch.no_grad()
    def build_pool(self, log: Callable[[str], None] | None = None, batch: int = 32):
        """Clean latents from the *original* model (adapter off): ``pool_size`` from ``c_e`` prompts and,
        with ``pool_from="both"``, as many from the matching ``c_a`` prompts (DDIM, CFG ``pool_cfg``)."""
        from ..progress import bar as progress_bar

        cfg = self.config
        g = torch.Generator().manual_seed(cfg.seed + 7919)  # independent of the training stream
        n = cfg.pool_size
        idx = torch.randint(0, len(self.pairs), (n,), generator=g)
        sources = [(self.e_erase, idx)]
        if cfg.pool_from == "both":
            sources.append((self.e_alt, idx.clone()))
        shape = (self.unet.config.in_channels, self.latent_size, self.latent_size)
        noise = torch.randn(len(sources) * n, *shape, generator=g)
        lat, which = [], []
        shown = progress_bar(len(sources) * n, "abo pool", unit="latent", leave=False)
        with self.adapter.on(0.0):
            for si, (emb, ids) in enumerate(sources):
                for i in range(0, n, batch):
                    j = ids[i: i + batch]
                    x = self._sample(noise[si * n + i: si * n + i + len(j)], emb[j.to(self.device)])
                    lat.append(x.cpu())
                    which.append(j)
                    shown.update(len(j))
                if log:
                    log(f"pool: {n} latents from the {'erase' if si == 0 else 'alternative'} prompts")
        shown.close()
        self.pool, self.pool_pairs = torch.cat(lat), torch.cat(which)

    def _sample(self, noise: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        self.sampler.set_timesteps(cfg.pool_steps, device=self.device)
        x = noise.to(self.device) * self.sampler.init_noise_sigma
        ctx = torch.cat([self.e_unc.expand(len(x), -1, -1), cond])
        for t in self.sampler.timesteps.tolist():  # python ints: the scheduler's tables stay on the CPU
            inp = self.sampler.scale_model_input(torch.cat([x, x]), t)
            unc, txt = self.predict(inp, ctx, torch.full((2 * len(x),), t, device=self.device)).chunk(2)
            x = self.sampler.step(unc + cfg.pool_cfg * (txt - unc), t, x).prev_sample
        return x

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, t, c_e, c_a) for one iteration: pool latents noised at uniform timesteps."""
        cfg, g = self.config, self.generator
        pick = torch.randint(0, len(self.pool), (cfg.batch,), generator=g)
        t = torch.randint(0, self.num_train_timesteps, (cfg.batch,), generator=g)
        noise = torch.randn(cfg.batch, *self.pool.shape[1:], generator=g)
        x0 = self.pool[pick]
        x_t = self.sampler.add_noise(x0, noise, t)
        j = self.pool_pairs[pick].to(self.device)
        return x_t.to(self.device), t.to(self.device), self.e_erase[j], self.e_alt[j]

    def losses_at(self, x_t, t, c_e, c_a, grad: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The objective on one batch: teacher (adapter off) and student (adapter on) each one UNet call."""
        b = x_t.shape[0]
        unc = self.e_unc.expand(b, -1, -1)
        lat, tt = torch.cat([x_t, x_t]), torch.cat([t, t])
        with torch.no_grad(), self.adapter.on(0.0):
            eps0_a, eps0_u = self.predict(lat, torch.cat([c_a, unc]), tt).chunk(2)
        with torch.set_grad_enabled(grad), self.adapter.on(1.0):
            eps_e, eps_u = self.predict(lat, torch.cat([c_e, unc]), tt).chunk(2)
        return abo_loss(eps_e, eps_u, eps0_a, eps0_u, self.config.lam)

    def step(self) -> dict:
        if self.pool is None:
            self.build_pool()
        x_t, t, c_e, c_a = self.batch()
        self.optimizer.zero_grad(set_to_none=True)
        loss, guid, unc = self.losses_at(x_t, t, c_e, c_a)
        loss.backward()
        self.optimizer.step()
        self.lr_schedule.step()
        self.iteration += 1
        rec = {"iteration": self.iteration, "loss": loss.item(), "guidance": guid.item(), "uncond": unc.item(),
               "lr": self.lr_schedule.get_last_lr()[0]}
        self.losses.append((self.iteration, rec["loss"], rec["guidance"], rec["uncond"]))
        return rec

    @torch.no_grad()
    def evaluate(self, batches: int = 8, seed: int = 12345) -> dict:
        """Mean loss terms on fixed held batches (own generator: does not disturb training)."""
        if self.pool is None:
            self.build_pool()
        saved = self.generator.get_state()
        self.generator.manual_seed(seed)
        tot = torch.zeros(3)
        try:
            for _ in range(batches):
                tot += torch.stack([v.detach().cpu() for v in self.losses_at(*self.batch(), grad=False)])
        finally:
            self.generator.set_state(saved)
        tot /= batches
        return {"loss": float(tot[0]), "guidance": float(tot[1]), "uncond": float(tot[2])}

    # ---------------------------------------------------------------- state
    trained_key = "adapter"

    def trained_module(self):
        return self.adapter

    def extra_state(self) -> dict:  # the x_t pool, so a resume does not regenerate it
        return {"pool": self.pool if self.pool is not None else torch.zeros(0),
                "pool_pairs": self.pool_pairs if self.pool_pairs is not None else torch.zeros(0, dtype=torch.long)}

    def load_extra_state(self, state: dict) -> None:
        if state["pool"].numel():
            self.pool, self.pool_pairs = state["pool"], state["pool_pairs"]

    # ---------------------------------------------------------------- output
    def settings(self) -> dict:
        cfg = self.config
        return {"alternative": cfg.alternative, "lambda": cfg.lam, "modules": cfg.modules, "rank": cfg.rank,
                "context": cfg.context, "trainer": "abo_reconstruction", "form": "adapter"}

    def hyperparameters(self) -> dict:
        return {**self.config.to_dict(), "method": "all_but_one_reconstruction",
                "objective": "||g_theta(x_t,c_e) - g_0(x_t,c_a)||^2 + lambda ||eps_theta(x_t,'') - eps_0(x_t,'')||^2",
                "optimizer": "torch.optim.AdamW", "lr_scheduler": "cosine_with_warmup",
                "latent_size": self.latent_size, "iterations_run": self.iteration,
                "module_count": len(self.adapter.names), "prompt_pairs": len(self.pairs),
                "clip_skip": self.clip_skip, "base_fingerprint": self.base_fingerprint()}

    def eraser(self, name: str | None = None) -> Eraser:
        cfg = self.config
        fam = self.layout.family
        return Eraser(name=name or f"{cfg.concept} -> {cfg.alternative or 'nothing'}", kind="weight",
                      concepts=[cfg.concept], method="abo", modules=self.adapter.module_deltas(),
                      settings=self.settings(), base_family=fam if fam != "custom" else None,
                      base_fingerprint=self.base_fingerprint(), text_fingerprint=self.text_fingerprint())

    # ---------------------------------------------------------------- loop (CheckpointedTrainer.train)
    postfix_fields = (("loss", "loss", ".4g"), ("guid", "guidance", ".4g"), ("unc", "uncond", ".3g"))

    @property
    def progress_desc(self) -> str:
        return f"abo {self.config.concept!r}->{self.config.alternative!r}"

    def before_loop(self, log) -> None:
        if self.pool is None:
            t0 = time.perf_counter()
            self.build_pool(log)
            if log:
                log(f"pool of {len(self.pool)} latents built in {time.perf_counter() - t0:.1f} s")


def default_context(model: str) -> str:
    return "toy" if model == "toy" else "generic"

"""Peers of ConceptGate in the quality bench (issue 17, item 4): what users would pick instead, run on the
same prompts, seeds, sampler and judges as ConceptGate's erasers, and scored as extra rows of the table.

``python -m conceptgate bench quality --peers`` adds, for every target the run scores (object or style):

* **negative prompt** (``neg-<keyword>``): plain diffusers, the target's keyword as the negative prompt
  (it replaces the empty unconditional text of classifier-free guidance); no eraser.
* **Safe Latent Diffusion** (Schramowski et al., CVPR 2023; ``sld-<preset>-<keyword>``): diffusers' own
  ``StableDiffusionPipelineSafe`` built from the toy pipeline's components (same UNet, VAE, text encoder,
  tokenizer; a copy of the scheduler's configuration), safety concept = the target's keyword, no safety
  checker, at each preset of diffusers' ``SafetyConfig`` (WEAK / MEDIUM / STRONG / MAX, read from the installed
  diffusers, not copied). The presets' warm-up is in sampler steps and was set for 50-step sampling; the
  bench samples with the toy model's 25 DDIM steps and the presets are used unchanged (what a user gets).
* **ESD-x** (Gandikota et al., ICCV 2023, "Erasing Concepts from Diffusion Models", cross-attention variant;
  ``esd-x-<keyword>`` and ``esd-x-templates-<keyword>``): written here from the paper. A *copy* of the toy
  UNet, only its cross-attention (``attn2``) parameters trainable, is fine-tuned so that

      eps_new(x_t, c, t)  ->  eps_frozen(x_t, c0, t) - eta * (eps_frozen(x_t, c, t) - eps_frozen(x_t, c0, t))

  (negative guidance as the teacher; c0 = the empty prompt, eta 1). x_t: fresh noise run ``k`` steps
  (``k ~ U{0..ddim_steps-1}``) through the frozen model's DDIM sampler at CFG ``start_cfg`` on the concept
  prompt c; t is the DDIM timestep x_t has reached. One image per iteration, Adam. Published recipe: the bare
  concept word as the only prompt, lr 1e-5, 1000 iterations, 50 DDIM steps, sampling guidance 3.
  The second variant uses the caption templates ``train spm --templates toy`` uses
  (:func:`conceptgate.toyworld.captions.concept_templates`): each iteration draws a template, c = the template
  with the concept, c0 = the same template without it (the SPM trainer's surrogate construction), so the
  teacher removes the concept and keeps the rest of the caption. Non-published.

  Because x_t comes from the *frozen* model, it does not depend on the weights being trained: the trajectories
  (and the teacher's two predictions) of a chunk of iterations are computed in one batch, which is the same
  computation as drawing them iteration by iteration, only faster on a CPU. The trained ``attn2`` tensors are
  cached (``--peer-cache``, default ``~/.cache/conceptgate/peers``) under a key of the base UNet's and text
  encoder's fingerprints and every hyperparameter; the pipeline's own UNet is never written.

The verdict per target (:func:`peer_verdicts`): is ConceptGate's best row for the target (the eraser config
with the highest mean over the prompt sets of (UA + IRA + CRA) / 3, among the run's ConceptGate erasers that
claim the target) ahead of every peer row on that figure? Computed from the measured figures.

Peers live in ``bench/`` (measurements), never in the core: nothing in ``adapters/`` knows about them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .generation import _latents, generate_with_stack

PEER_KINDS = ("negative", "sld", "esd")
SLD_PRESETS = ("WEAK", "MEDIUM", "STRONG", "MAX")
ESD_VARIANTS = ("published", "templates")
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "conceptgate", "peers")

PAPERS = {
    "negative": "negative prompt (plain diffusers)",
    "sld": "Safe Latent Diffusion, Schramowski et al., CVPR 2023 (diffusers' StableDiffusionPipelineSafe)",
    "esd": "ESD-x, Gandikota et al., ICCV 2023 (written from the paper)",
}


def parse_kinds(spec) -> tuple:
    """``--peers`` value -> peer kinds: "all" (or True / empty) = every kind, else a comma list of
    negative, sld, esd."""
    if spec in (None, False):
        return ()
    if spec is True or str(spec).strip().lower() in ("", "all"):
        return PEER_KINDS
    kinds = tuple(k.strip().lower() for k in str(spec).split(",") if k.strip())
    bad = [k for k in kinds if k not in PEER_KINDS]
    if bad:
        raise ValueError(f"unknown peer kind(s) {', '.join(bad)} (choose from {', '.join(PEER_KINDS)}, or all)")
    return kinds


# ------------------------------------------------------------------------------ negative prompt


def generate_negative(pipe, prompts, seeds, keyword: str, steps: int = 25, cfg: float = 5.0, batch: int = 48,
                      log=None):
    """Plain diffusers with ``keyword`` as every image's negative prompt (no eraser)."""
    imgs, _ = generate_with_stack(pipe, prompts, seeds, None, steps=steps, cfg=cfg, batch=batch,
                                  negative_prompt=keyword, log=log, progress=False)
    return imgs


# ------------------------------------------------------------------------------ Safe Latent Diffusion


def _sld_classes():
    """diffusers' ``StableDiffusionPipelineSafe`` and ``SafetyConfig`` (deprecated pipelines in 0.3x/0.4x)."""
    try:
        from diffusers import StableDiffusionPipelineSafe
    except ImportError:  # pragma: no cover - older / newer layouts
        from diffusers.pipelines.deprecated.stable_diffusion_safe import StableDiffusionPipelineSafe
    try:
        from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig
    except ImportError:  # pragma: no cover
        from diffusers.pipelines.stable_diffusion_safe import SafetyConfig
    return StableDiffusionPipelineSafe, SafetyConfig


def sld_presets() -> dict:
    """``{"WEAK": {...}, ...}``: the presets as the installed diffusers defines them."""
    _, SafetyConfig = _sld_classes()
    return {name: dict(getattr(SafetyConfig, name)) for name in SLD_PRESETS}


def _fresh_scheduler(pipe):
    s = pipe.scheduler
    return type(s).from_config(s.config)


def safe_pipeline(pipe, concept: str):
    """diffusers' SLD pipeline on ``pipe``'s own components (shared, not copied; a fresh scheduler object
    from the same configuration), safety concept ``concept``, no safety checker."""
    Safe, _ = _sld_classes()
    safe = Safe(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
                scheduler=_fresh_scheduler(pipe), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)
    safe.set_progress_bar_config(disable=True)
    safe.safety_concept = concept
    return safe


def generate_sld(safe, prompts, seeds, settings: dict, steps: int = 25, cfg: float = 5.0, batch: int = 48,
                 log=None) -> torch.Tensor:
    """Images (n,3,64,64 in [0,1]) from the SLD pipeline with ``settings`` (a preset's ``sld_*`` keys), the
    bench's latents (one CPU generator per seed, as :func:`~.generation.generate_with_stack`)."""
    prompts, seeds = list(prompts), list(seeds)
    out = []
    for i in range(0, len(prompts), batch):
        ps, ss = prompts[i: i + batch], seeds[i: i + batch]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Safety checker disabled!" when the guidance scale is <= 1
            res = safe(prompt=ps, num_inference_steps=steps, guidance_scale=cfg, latents=_latents(safe, ss),
                       height=64, width=64, output_type="np", **settings)
        out.append(torch.from_numpy(np.asarray(res.images)).permute(0, 3, 1, 2).float().clamp(0, 1))
        if log:
            log(f"  generated {min(i + batch, len(prompts))}/{len(prompts)}")
    return torch.cat(out)


# ------------------------------------------------------------------------------ ESD-x


@dataclass
class ESDConfig:
    """ESD-x hyperparameters; defaults = the published recipe (bare word, lr 1e-5, 1000 iterations, eta 1,
    50 DDIM steps, sampling guidance 3, one image per iteration, Adam)."""

    concept: str
    templates: tuple = ()       # () = the published recipe (the bare word); else "{}" templates
    iterations: int = 1000
    lr: float = 1e-5
    eta: float = 1.0            # negative guidance
    ddim_steps: int = 50        # the sampler's grid; x_t after k ~ U{0..ddim_steps-1} steps
    start_cfg: float = 3.0      # guidance while sampling x_t
    params: str = "attn2"       # ESD-x: cross-attention only
    seed: int = 0
    chunk: int = 50             # iterations whose x_t are sampled in one batch (does not change the result)

    def __post_init__(self):
        self.templates = tuple(self.templates)
        for t in self.templates:
            if t.count("{}") != 1:
                raise ValueError(f"template {t!r} must contain exactly one '{{}}'")
        if self.iterations < 1 or self.ddim_steps < 1 or self.chunk < 1:
            raise ValueError("iterations, ddim_steps and chunk must be positive")

    def key(self) -> dict:
        d = asdict(self)
        d.pop("chunk")
        d["templates"] = list(self.templates)
        return d


def esd_parameter_names(unet, params: str = "attn2") -> list[str]:
    return [n for n, _ in unet.named_parameters() if params in n.split(".")]


class ESDTrainer:
    """ESD on a copy of ``unet`` (the original is only read). ``student``: the copy being trained."""

    def __init__(self, unet, text_encoder, tokenizer, scheduler_config, config: ESDConfig):
        from diffusers import DDIMScheduler

        from ..adapters.spm.membranes import fill_template

        self.config = config
        self.frozen = unet
        self.student = copy.deepcopy(unet)
        self.student.requires_grad_(False)
        self.names = esd_parameter_names(self.student, config.params)
        if not self.names:
            raise ValueError(f"the UNet has no {config.params!r} parameters")
        params = dict(self.student.named_parameters())
        self.trainable = [params[n] for n in self.names]
        for p in self.trainable:
            p.requires_grad_(True)
        self.optimizer = torch.optim.Adam(self.trainable, lr=config.lr)
        self.sampler = DDIMScheduler.from_config(dict(scheduler_config))
        self.sampler.set_timesteps(config.ddim_steps)
        self.device = next(unet.parameters()).device
        if config.templates:
            pos = [fill_template(t, config.concept) for t in config.templates]
            neu = [fill_template(t, "") for t in config.templates]
        else:
            pos, neu = [config.concept], [""]
        self.prompts = list(zip(pos, neu))
        enc = self._encode(tokenizer, text_encoder, pos + neu + [""])
        self.e_pos, self.e_neu, self.e_unc = enc[: len(pos)], enc[len(pos): 2 * len(pos)], enc[-1:]
        self.generator = torch.Generator("cpu").manual_seed(int(config.seed))
        self.iteration = 0
        self.losses: list[float] = []
        c, s = unet.config.in_channels, unet.config.sample_size
        self.latent_shape = (c, s, s)

    @staticmethod
    @torch.no_grad()
    def _encode(tokenizer, text_encoder, texts):
        ids = tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        return text_encoder(ids.to(text_encoder.device))[0].float()

    # ---------------------------------------------------------------- x_t and the teacher
    def draw(self, n: int, generator: torch.Generator):
        """``n`` iterations' random draws: (k, template index, noise), in a fixed order."""
        cfg = self.config
        ks = torch.randint(0, cfg.ddim_steps, (n,), generator=generator)
        js = torch.randint(0, len(self.prompts), (n,), generator=generator)
        noise = torch.randn((n,) + self.latent_shape, generator=generator)
        return ks, js, noise

    @torch.no_grad()
    def samples(self, ks, js, noise):
        """x_t (k DDIM steps of the frozen model at CFG ``start_cfg`` on the concept prompt), t, the
        concept conditioning, and the teacher's target, for a batch of iterations."""
        cfg, sch, unet = self.config, self.sampler, self.frozen
        dev = self.device
        x = noise.to(dev) * sch.init_noise_sigma
        e_pos, e_neu = self.e_pos[js].to(dev), self.e_neu[js].to(dev)
        unc = self.e_unc.to(dev).expand_as(e_pos)
        ks = ks.to(dev)
        for step, t in enumerate(sch.timesteps[: int(ks.max()) + 1]):
            live = ks > step
            if not bool(live.any()):
                break
            xl = x[live]
            inp = sch.scale_model_input(torch.cat([xl, xl]), t)
            eu, ec = unet(inp, t, encoder_hidden_states=torch.cat([unc[live], e_pos[live]])).sample.chunk(2)
            x[live] = sch.step(eu + cfg.start_cfg * (ec - eu), t, xl).prev_sample
        t = sch.timesteps.to(dev)[ks]
        e0, ep = unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([e_neu, e_pos])
                      ).sample.chunk(2)
        target = e0 - cfg.eta * (ep - e0)
        return x, t, e_pos, target

    def loss(self, x, t, e_pos, target) -> torch.Tensor:
        return F.mse_loss(self.student(x, t, encoder_hidden_states=e_pos).sample, target)

    @torch.no_grad()
    def eval_loss(self, n: int = 8, seed: int = 12345) -> float:
        """The ESD loss of the current student on ``n`` fixed draws (independent of the training draws)."""
        return float(self.loss(*self.samples(*self.draw(n, torch.Generator("cpu").manual_seed(seed)))))

    # ---------------------------------------------------------------- the loop
    def train(self, iterations: int | None = None, log=None) -> dict:
        from ..adapters.progress import bar

        cfg = self.config
        total = int(iterations if iterations is not None else cfg.iterations)
        t0 = time.time()
        shown = bar(total, f"esd-x {cfg.concept!r}", unit="it", leave=False)
        try:
            while self.iteration < total:
                n = min(cfg.chunk, total - self.iteration)
                batch = self.samples(*self.draw(n, self.generator))
                for i in range(n):
                    self.optimizer.zero_grad(set_to_none=True)
                    loss = self.loss(*(b[i: i + 1] for b in batch))
                    loss.backward()
                    self.optimizer.step()
                    self.losses.append(loss.item())
                    self.iteration += 1
                    shown.update(1)
                if log and (self.iteration % 200 == 0 or self.iteration == total):
                    log(f"  esd-x {cfg.concept!r}: {self.iteration}/{total}, loss (last 50) "
                        f"{np.mean(self.losses[-50:]):.4g}, {time.time() - t0:.0f} s")
        finally:
            shown.close()
        return {"iterations": self.iteration, "seconds": time.time() - t0}

    def state(self) -> dict:
        return {n: p.detach().clone().contiguous() for n, p in zip(self.names, self.trainable)}


def _cache_key(pipe, config: ESDConfig) -> str:
    from ..adapters.fingerprint import weights_fingerprint

    key = {"unet": weights_fingerprint(pipe.unet.state_dict()),
           "text_encoder": weights_fingerprint(pipe.text_encoder.state_dict()),
           "scheduler": dict(pipe.scheduler.config), "esd": config.key()}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def esd_unet(pipe, config: ESDConfig, cache_dir: str | None = DEFAULT_CACHE, log=None):
    """A trained ESD copy of ``pipe.unet`` and what it cost: ``(unet, info)``. Loads the cached ``attn2``
    tensors when ``cache_dir`` holds them for this model and these hyperparameters, else trains (and
    stores them there). ``pipe.unet`` is never written."""
    from safetensors.torch import load_file, save_file

    say = log or (lambda s: None)
    key = _cache_key(pipe, config)
    path = os.path.join(cache_dir, f"esd-x_{key}.safetensors") if cache_dir else None
    if path and os.path.exists(path):
        with open(path + ".json") as f:
            info = json.load(f)
        unet = copy.deepcopy(pipe.unet)
        own = dict(unet.named_parameters())
        with torch.no_grad():
            for n, v in load_file(path).items():
                own[n].copy_(v)
        say(f"esd-x {config.concept!r} ({'templates' if config.templates else 'published'}): cached {path}")
        return unet.requires_grad_(False).eval(), {**info, "cached": True, "cache": path}
    trainer = ESDTrainer(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler.config, config)
    before = trainer.eval_loss()
    run = trainer.train(log=say)
    after = trainer.eval_loss()
    losses = trainer.losses
    info = {"config": config.key(), "iterations": run["iterations"], "train_seconds": run["seconds"],
            "torch_threads": torch.get_num_threads(), "eval_loss_before": before, "eval_loss_after": after,
            "loss_first_50": float(np.mean(losses[:50])), "loss_last_50": float(np.mean(losses[-50:])),
            "trained_tensors": len(trainer.names),
            "trained_parameters": int(sum(p.numel() for p in trainer.trainable)), "key": key}
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        save_file(trainer.state(), path)
        with open(path + ".json", "w") as f:
            json.dump(info, f, indent=2)
    unet = trainer.student.requires_grad_(False).eval()
    return unet, {**info, "cached": False, "cache": path}


def pipeline_with_unet(pipe, unet):
    """A ``StableDiffusionPipeline`` sharing ``pipe``'s components except the UNet (and a fresh scheduler)."""
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=unet,
                                scheduler=_fresh_scheduler(pipe), safety_checker=None, feature_extractor=None,
                                requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    return p


# ------------------------------------------------------------------------------ the peer rows


@dataclass
class Peer:
    """One peer row: ``generate(prompts, seeds, tier_cfg) -> images`` on the bench's latents."""

    name: str
    method: str                  # negative | sld | esd
    target: object               # prompts.Target
    settings: dict = field(default_factory=dict)
    generate: Callable | None = None
    setup_seconds: float = 0.0   # one-time cost (ESD training; 0 when cached)
    info: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"method": self.method, "paper": PAPERS[self.method], "target": self.target.keyword,
                "kind": self.target.kind, "settings": self.settings, "setup_seconds": self.setup_seconds,
                **({"training": self.info} if self.info else {})}


def esd_configs(keyword: str, iterations: int | None = None, lr: float | None = None,
                variants: Sequence[str] = ESD_VARIANTS, ddim_steps: int | None = None) -> dict:
    """``{variant: ESDConfig}`` for a target keyword: the published recipe and the toy caption templates
    (``None`` overrides keep the published values)."""
    from ..toyworld.captions import concept_templates

    over = {k: v for k, v in (("iterations", iterations), ("lr", lr), ("ddim_steps", ddim_steps)) if v is not None}
    out = {}
    if "published" in variants:
        out["published"] = ESDConfig(concept=keyword, **over)
    if "templates" in variants:
        out["templates"] = ESDConfig(concept=keyword, templates=tuple(concept_templates(keyword)), **over)
    return out


def build_peers(pipe, targets, kinds: Sequence[str] = PEER_KINDS, *, esd_iterations: int | None = None,
                esd_lr: float | None = None, esd_variants: Sequence[str] = ESD_VARIANTS,
                esd_ddim_steps: int | None = None,
                sld_presets_used: Sequence[str] = SLD_PRESETS, cache_dir: str | None = DEFAULT_CACHE,
                log=None) -> list[Peer]:
    """The peer rows for ``targets`` (object / style / colour targets; the watermark gets the negative prompt
    and SLD only). ESD copies are trained (or loaded from ``cache_dir``) here."""
    say = log or (lambda s: None)
    peers: list[Peer] = []
    presets = sld_presets() if "sld" in kinds else {}
    for t in targets:
        kw = t.keyword
        if "negative" in kinds:
            peers.append(Peer(f"neg-{kw}", "negative", t, {"negative_prompt": kw},
                              lambda ps, ss, c, kw=kw: generate_negative(pipe, ps, ss, kw, int(c["steps"]),
                                                                         float(c["cfg"]), int(c["batch"]))))
        if "sld" in kinds:
            safe = safe_pipeline(pipe, kw)
            for name in sld_presets_used:
                s = presets[name]
                peers.append(Peer(f"sld-{name.lower()}-{kw}", "sld", t, {"preset": name, "safety_concept": kw, **s},
                                  lambda ps, ss, c, s=s, safe=safe: generate_sld(
                                      safe, ps, ss, s, int(c["steps"]), float(c["cfg"]), int(c["batch"]))))
        if "esd" in kinds and t.kind in ("object", "style"):
            for variant, ec in esd_configs(kw, esd_iterations, esd_lr, esd_variants, esd_ddim_steps).items():
                t0 = time.time()
                unet, info = esd_unet(pipe, ec, cache_dir, log=say)
                p = pipeline_with_unet(pipe, unet)
                name = f"esd-x-{kw}" if variant == "published" else f"esd-x-templates-{kw}"
                settings = {"variant": variant, "iterations": ec.iterations, "lr": ec.lr, "eta": ec.eta,
                            "ddim_steps": ec.ddim_steps, "start_cfg": ec.start_cfg, "params": ec.params,
                            "templates": len(ec.templates)}
                peers.append(Peer(name, "esd", t, settings,
                                  lambda ps, ss, c, p=p: generate_with_stack(
                                      p, ps, ss, None, steps=int(c["steps"]), cfg=float(c["cfg"]),
                                      batch=int(c["batch"]), progress=False)[0],
                                  setup_seconds=0.0 if info.get("cached") else time.time() - t0, info=info))
    return peers


def evaluate_peers(pipe, judges, peers: Sequence[Peer], targets, tier: dict, evaluate, log=None) -> list[dict]:
    """Each peer through the bench's own ``evaluate`` (:func:`~.quality.evaluate_stack`) with its generator:
    ``[{"name", "result", "peer"}]``, as the quality bench's configs."""
    from ..adapters.progress import iterate

    say = log or (lambda s: None)
    out = []
    for peer in iterate(list(peers), "peers", unit="config"):
        say(f"== {peer.name}")
        r = evaluate(pipe, judges, None, targets=list(targets), tier=tier, log=say,
                     generate_fn=lambda ps, ss, peer=peer: peer.generate(ps, ss, tier))
        out.append({"name": peer.name, "result": r, "peer": peer.describe()})
    return out


# ------------------------------------------------------------------------------ figures and verdicts


def _nan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def target_row(result: dict, keyword: str) -> dict | None:
    return next((t for t in result.get("targets", []) if t["keyword"] == keyword), None)


def mean_score(result: dict, keyword: str) -> tuple[float, dict]:
    """The mean over the prompt sets of (UA + IRA + CRA) / 3 for ``keyword``, and the per-set values."""
    t = target_row(result, keyword)
    per = {}
    for s, m in (t or {}).get("sets", {}).items():
        v = (m.get("mean") or {}).get("value")
        if not _nan(v):
            per[s] = float(v)
    return (float(np.mean(list(per.values()))) if per else float("nan")), per


def seconds_per_image(result: dict) -> float:
    n = sum(m["n_images"] for m in result["sets"].values())
    return sum(m["seconds"] for m in result["sets"].values()) / max(n, 1)


def is_conceptgate(config: dict, index: int) -> bool:
    return index > 0 and "peer" not in config


def claims(config: dict, keyword: str) -> bool:
    if "peer" in config:
        return config["peer"]["target"] == keyword
    t = target_row(config["result"], keyword)
    return bool(t and t["erasers"])


def peer_verdicts(configs: Sequence[dict]) -> list[dict]:
    """Per peer target: ConceptGate's best row vs every peer row, on the mean over the prompt sets of
    (UA + IRA + CRA) / 3 (point estimates of this run). ``ahead``: strictly above every peer; None when the
    run has no ConceptGate eraser for that target."""
    keywords = []
    for c in configs:
        if "peer" in c and c["peer"]["target"] not in keywords:
            keywords.append(c["peer"]["target"])
    out = []
    base = configs[0]["result"] if configs else None
    for kw in keywords:
        cg = [(c["name"],) + mean_score(c["result"], kw) for i, c in enumerate(configs)
              if is_conceptgate(c, i) and claims(c, kw)]
        cg = [r for r in cg if not _nan(r[1])]
        peers = [(c["name"],) + mean_score(c["result"], kw) for c in configs if "peer" in c and claims(c, kw)]
        peers = [r for r in peers if not _nan(r[1])]
        kind = next(c["peer"]["kind"] for c in configs if "peer" in c and c["peer"]["target"] == kw)
        v = {"target": kw, "kind": kind,
             "base": mean_score(base, kw)[0] if base else float("nan"),
             "conceptgate": [{"name": n, "score": s, "per_set": p} for n, s, p in cg],
             "peers": [{"name": n, "score": s, "per_set": p} for n, s, p in peers]}
        if cg and peers:
            best = max(cg, key=lambda r: r[1])
            top = max(peers, key=lambda r: r[1])
            v.update(best={"name": best[0], "score": best[1]}, best_peer={"name": top[0], "score": top[1]},
                     ahead=bool(best[1] > top[1]), margin=best[1] - top[1],
                     peers_not_behind=[n for n, s, _ in peers if s >= best[1]])
        else:
            v.update(best=None, best_peer=None, ahead=None, margin=float("nan"), peers_not_behind=[])
        out.append(v)
    return out


def cost_rows(configs: Sequence[dict]) -> list[dict]:
    """Per config: seconds per image and that relative to the base row (same images, same run)."""
    if not configs:
        return []
    base = seconds_per_image(configs[0]["result"])
    rows = []
    for c in configs:
        spi = seconds_per_image(c["result"])
        rows.append({"name": c["name"], "seconds_per_image": spi, "relative_to_base": spi / base if base else float("nan"),
                     "setup_seconds": (c.get("peer") or {}).get("setup_seconds", 0.0)})
    return rows


def unet_rows(config: dict) -> str:
    """UNet batch rows per image and sampler step, by construction: classifier-free guidance runs 2 (the
    negative prompt and ESD-x too); diffusers' SLD adds the safety concept's row whenever its guidance scale
    is > 1 (every preset); weight erasers act inside those rows (their own extra work is in the wall time)."""
    p = config.get("peer")
    if p and p["method"] == "sld":
        return "3" if float(p["settings"].get("sld_guidance_scale", 0)) > 1 else "2"
    guidance = [e for e in (config["result"].get("stack") or ()) if e.get("kind") == "guidance"]
    return "2" if not guidance else "2 + guidance rows"


def _pct(v) -> str:
    return "–" if _nan(v) else f"{100 * v:.0f}"


def render_peers(result: dict) -> list[str]:
    """The report's peer part: one comparison table (every eraser row and peer row on its target) and one
    verdict line per target."""
    from .report import table

    configs = result["configs"]
    verdicts = result.get("peer_verdicts") or peer_verdicts(configs)
    if not verdicts:
        return []
    costs = {r["name"]: r for r in (result.get("costs") or cost_rows(configs))}
    lines = ["", "**Peers** (issue 17: what users would pick instead, on the same prompts, seeds, sampler and judges; "
             "score = mean over the prompt sets of (UA + IRA + CRA) / 3; UNet rows/step = UNet batch rows per image "
             "and sampler step, by construction (CFG: 2; SLD adds the safety-concept row); wall s/image vs base = "
             "measured generation seconds per image relative to the base row of this run, on a CPU shared with other "
             "jobs, so differences of +-40% are load noise (the negative prompt and ESD-x do the same work as the "
             "base); one-time = ESD-x training):", ""]
    rows = []
    sets = list(configs[0]["result"]["sets"]) if configs else []
    shipped = set((result.get("runtime") or {}).get("shipped_configs") or ())
    edits = {c["name"] for c in configs if any(e.get("method") in ("uce", "rece") for e in (c["result"].get("stack") or ()))}
    for v in verdicts:
        kw = v["target"]
        for ci, c in enumerate(configs):
            if not (ci == 0 or claims(c, kw)):
                continue
            score, per = mean_score(c["result"], kw)
            p = c.get("peer")
            what = "base model" if ci == 0 else (p["method"] if p else "ConceptGate" + (
                " (shipped file)" if c["name"] in shipped else " (computed in the run)" if c["name"] in edits else ""))
            settings = ""
            if p and p["method"] == "sld":
                s = p["settings"]
                settings = (f"{s['preset']}: warm-up {s['sld_warmup_steps']}, scale {s['sld_guidance_scale']}, "
                            f"threshold {s['sld_threshold']}, momentum {s['sld_momentum_scale']}/{s['sld_mom_beta']}")
            elif p and p["method"] == "esd":
                s, tr = p["settings"], p.get("training", {})
                settings = (f"{s['variant']}: {s['iterations']} it, lr {s['lr']:g}, eta {s['eta']:g}, "
                            f"DDIM {s['ddim_steps']} at CFG {s['start_cfg']:g}, "
                            f"{s['templates'] or 'no'} templates; loss {tr.get('loss_first_50', float('nan')):.3g} -> "
                            f"{tr.get('loss_last_50', float('nan')):.3g}; trained {tr.get('train_seconds', float('nan')):.0f} s")
            elif p:
                settings = f"negative prompt {p['settings']['negative_prompt']!r}"
            cost = costs.get(c["name"], {})
            once = "–"
            if p and p["method"] == "esd":
                tr = p.get("training", {})
                once = f"{tr.get('train_seconds', float('nan')):.0f} s training" + (" (cached)" if tr.get("cached") else "")
            elif p:
                once = "none"
            rows.append({"target": kw, "config": c["name"], "what": what, "settings": settings,
                         **{s: _pct(per.get(s)) for s in sets}, "score": _pct(score),
                         "cost": "–" if _nan(cost.get("relative_to_base")) else f"{cost['relative_to_base']:.2f}x",
                         "rows": unet_rows(c), "once": once})
    lines.append(table(rows, [("target", "target"), ("config", "config"), ("what", "what")]
                       + [(s, s) for s in sets] + [("score", "score"), ("rows", "UNet rows/step"),
                                                   ("cost", "wall s/image vs base"), ("once", "one-time"),
                                                   ("settings", "settings")]))
    lines.append("")
    lines.append("**ConceptGate vs the peers** (computed from the figures above, point estimates; the quick tier's "
                 "intervals are tens of points wide, see the erasure table):")
    lines.append("")
    for v in verdicts:
        if v["ahead"] is None:
            lines.append(f"- **{v['target']}**: no ConceptGate eraser for this target in the run; nothing to compare.")
            continue
        b, t = v["best"], v["best_peer"]
        if v["ahead"]:
            lines.append(f"- **{v['target']}**: yes, ConceptGate is ahead of every peer: its best row {b['name']} scores "
                         f"{_pct(b['score'])} against the best peer {t['name']} at {_pct(t['score'])} "
                         f"({100 * v['margin']:+.0f} points; base model {_pct(v['base'])}).")
        else:
            lines.append(f"- **{v['target']}**: no, ConceptGate is not ahead of every peer: its best row {b['name']} "
                         f"scores {_pct(b['score'])}; not behind it: "
                         + ", ".join(f"{p['name']} {_pct(p['score'])}" for p in v["peers"]
                                     if p["name"] in v["peers_not_behind"])
                         + f" (base model {_pct(v['base'])}).")
    return lines


def peer_notes(result: dict) -> list[str]:
    """The report's notes on how the peers were run (read from the run's own settings)."""
    peers = [c["peer"] for c in result.get("configs", ()) if "peer" in c]
    if not peers:
        return []
    esd = [p["settings"] for p in peers if p["method"] == "esd"]
    grid = sorted({int(s["ddim_steps"]) for s in esd})
    its = sorted({int(s["iterations"]) for s in esd})
    notes = [
        "Peers (issue 17, item 4; bench/peers.py): `neg-*` = the keyword as the negative prompt (plain diffusers, no "
        "eraser); `sld-*` = diffusers' own StableDiffusionPipelineSafe on the toy model's components, safety concept = "
        "the keyword, no safety checker, at diffusers' SafetyConfig presets used unchanged (their warm-up counts "
        "sampler steps and was chosen for 50-step sampling; the bench samples 25, so WEAK's 15 warm-up steps leave it "
        "10 guided steps and MEDIUM's 10 leave 15)."]
    if esd:
        notes.append(
            "`esd-x-*` = ESD-x written from the paper: a copy of the toy UNet with only its cross-attention (attn2) "
            "parameters trained, target eps(x,c0) - eta (eps(x,c) - eps(x,c0)), x_t from the frozen model's DDIM "
            "sampler run k ~ U{0..S-1} steps on the concept prompt at guidance 3, t = the timestep x_t has reached; "
            "one image per iteration, Adam. `esd-x-<kw>`: the published recipe (bare word, c0 = \"\", lr 1e-5, eta 1, "
            f"{'/'.join(map(str, its))} iterations) except the sampler grid S = {'/'.join(map(str, grid))} DDIM "
            "steps (the bench's own sampler) instead of the paper's 50, which halves the CPU time of drawing x_t and "
            "leaves the spread of t over the noise range unchanged; `esd-x-templates-<kw>`: the same with the 48 toy "
            "caption templates of `train spm --templates toy`, c = the template with the concept, c0 = the same "
            "template without it (not published). Trained weights are cached (attn2 tensors, keyed by the base "
            "model's fingerprints and every hyperparameter); the training time in the table is the run that filled "
            "the cache, at 1 torch thread on this shared machine.")
    notes.append("ConceptGate's shipped erasers for the peers' targets (toyworld/erasers/) join the run as ConceptGate "
                 "rows with their default gate; the verdict takes ConceptGate's best row per target among every "
                 "ConceptGate eraser in the run (shipped files and the UCE/RECE edits computed in the run).")
    return notes

"""The resumable training loop shared by the trainers (SPM Latent Anchoring, the All-but-One adapter).

A trainer subclasses :class:`CheckpointedTrainer` and provides ``config`` (with ``iterations``,
``save_every``, ``trajectory_key()``), ``iteration``, ``losses``, ``optimizer``, ``lr_schedule``,
``generator``, ``step() -> dict``, ``trained_module()`` (what is trained, saved under ``trained_key``),
optionally ``extra_state()`` / ``load_extra_state(state)``, ``eraser(name)`` and ``hyperparameters()``; it gets
checkpoints (``<stem>_<i>steps.safetensors`` + the resumable ``state.pt``), exact resume, a progress bar
(:mod:`.progress`: stderr, ETA, off without a terminal),
a stop after N iterations of this call and a wall-clock deadline.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .eraser import Eraser
from .files import save_eraser
from .fingerprint import weights_fingerprint


@dataclass
class TrainResult:
    eraser: Eraser
    hyperparameters: dict
    iterations_run: int
    seconds: float
    losses: list = field(default_factory=list)  # (iteration, loss, term 1, term 2)


def check_same_settings(saved_config_json: str, config) -> None:
    """Refuse to resume a checkpoint trained with other settings, naming them."""
    mine = json.loads(json.dumps(config.trajectory_key(), sort_keys=True))
    theirs = json.loads(saved_config_json)
    if theirs != mine:
        diff = sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))
        raise ValueError(f"the checkpoint was trained with other settings ({', '.join(diff)}); cannot resume")


class CheckpointedTrainer:
    progress_desc = "train"
    #: (label, step-record key, format) of what the progress bar shows after a step
    postfix_fields: tuple = (("loss", "loss", ".4g"),)

    def setup_frozen_models(self, config, unet, text_encoder, tokenizer, scheduler_config: dict, device, clip_skip):
        """The frozen float32 base both trainers start from: UNet, text encoder (+ the host-style encoder that
        encodes prompts as the sampler does), a DDIM sampler built from the model's scheduler config, the UNet's
        layout and the seeded generator every random draw of the run comes from."""
        from diffusers import DDIMScheduler

        from .naming import layout_from_diffusers_config

        self.config = config
        self.layout = layout_from_diffusers_config(unet.config)
        self.generator = torch.Generator().manual_seed(config.seed)

        from .diffusers_host import DiffusersTextEncoder

        self.device = torch.device(device)
        self.unet = unet.to(self.device, torch.float32).eval().requires_grad_(False)
        self.text_encoder = text_encoder.to(self.device, torch.float32).eval().requires_grad_(False)
        self.encoder = DiffusersTextEncoder(tokenizer, self.text_encoder, clip_skip)
        self.clip_skip = clip_skip
        sched_cfg = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
        self.sampler = DDIMScheduler.from_config(sched_cfg)
        self.num_train_timesteps = int(self.sampler.config.num_train_timesteps)

    def postfix(self, rec: dict) -> dict:
        return {label: format(rec[key], fmt) for label, key, fmt in self.postfix_fields}

    def before_loop(self, log: Callable[[str], None] | None) -> None:
        """Work done once before the first step of a call (e.g. building a data pool)."""

    # fingerprints of the frozen base (self.unet / self.text_encoder), written into the file
    def base_fingerprint(self) -> str:
        return weights_fingerprint(self.unet.state_dict())

    def text_fingerprint(self) -> str:
        return weights_fingerprint(self.text_encoder.state_dict())

    # resumable state: everything the next iteration depends on
    trained_key = "weights"

    def trained_module(self) -> torch.nn.Module:
        raise NotImplementedError

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def state(self) -> dict:
        return {
            "iteration": self.iteration,
            self.trained_key: {k: v.detach().cpu() for k, v in self.trained_module().state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "generator": self.generator.get_state(),
            "config": json.dumps(self.config.trajectory_key(), sort_keys=True),
            "losses": torch.tensor(self.losses, dtype=torch.float64) if self.losses else torch.zeros(0, 4),
            **self.extra_state(),
        }

    def load_state(self, state: dict):
        check_same_settings(state["config"], self.config)
        self.trained_module().load_state_dict(state[self.trained_key])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.generator.set_state(state["generator"])
        self.iteration = int(state["iteration"])
        self.losses = [tuple(r) for r in state["losses"].tolist()]
        self.load_extra_state(state)

    def save(self, path: str, name: str | None = None) -> str:
        return save_eraser(self.eraser(name), path, hyperparameters=self.hyperparameters())

    def save_state(self, path: str):
        tmp = path + ".tmp"
        torch.save(self.state(), tmp)
        os.replace(tmp, path)  # a crash mid-write never leaves a broken state.pt

    def resume(self, path: str) -> bool:
        if not os.path.exists(path):
            return False
        self.load_state(torch.load(path, map_location="cpu", weights_only=True))
        return True

    def train(self, out: str, checkpoint_dir: str | None = None, resume: bool = False, progress: bool = True,
              log: Callable[[str], None] | None = None, name: str | None = None,
              stop_after: int | None = None, deadline: float | None = None) -> TrainResult:
        """Train to ``config.iterations`` and write the eraser to ``out``. ``stop_after`` ends this call
        after that many iterations (the state is saved; for tests and time budgets). ``deadline`` (a
        ``time.time()`` value) also ends it early, but then still writes ``out`` with the iterations
        actually run recorded in its metadata (``iterations_run``; a resume continues)."""
        from .progress import bar as progress_bar

        cfg = self.config
        stem = os.path.splitext(os.path.basename(out))[0]
        checkpoint_dir = checkpoint_dir or (os.path.splitext(out)[0] + ".checkpoints")
        state_path = os.path.join(checkpoint_dir, "state.pt")
        os.makedirs(checkpoint_dir, exist_ok=True)
        if resume and self.resume(state_path) and log:
            log(f"resumed from {state_path} at iteration {self.iteration}")
        t0 = time.perf_counter()
        self.before_loop(log)
        done_here = 0
        bar = progress_bar(cfg.iterations, self.progress_desc, initial=self.iteration, show=progress)
        try:
            while self.iteration < cfg.iterations:
                if stop_after is not None and done_here >= stop_after:
                    break
                if deadline is not None and time.time() > deadline:
                    if log:
                        log(f"deadline reached at iteration {self.iteration} of {cfg.iterations}")
                    break
                rec = self.step()
                done_here += 1
                bar.update(1)
                bar.set_postfix(**self.postfix(rec))
                if cfg.save_every and self.iteration % cfg.save_every == 0 and self.iteration < cfg.iterations:
                    self.save(os.path.join(checkpoint_dir, f"{stem}_{self.iteration}steps.safetensors"), name)
                    self.save_state(state_path)
                    if log:
                        log(f"checkpoint at iteration {self.iteration} in {checkpoint_dir}")
        finally:
            bar.close()
        self.save_state(state_path)
        seconds = time.perf_counter() - t0
        if self.iteration >= cfg.iterations or (deadline is not None and time.time() > deadline):
            self.save(out, name)
        return TrainResult(self.eraser(name), self.hyperparameters(), self.iteration, seconds, list(self.losses))

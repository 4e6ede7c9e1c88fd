"""Geom-Erasing training: learn the location tokens ``<l{m,n}>`` (and the concept token) with the
spatially re-weighted diffusion loss, UNet and text encoder frozen.

    python -m conceptgate train geom --model toy --concept watermark --detector toy-watermark --out geom.safetensors
    python -m conceptgate train geom --model ./sd15 --concept watermark --detector boxes.json --data ./images --device cuda --out wm.safetensors

Data: by default ("model removal", the paper's setting for concepts the pretrained model already
produces) the model generates ``--generate`` images from ``--prompts`` (toy model: its training
captions), the detector labels them, and they are written as a data folder (images, captions,
COCO boxes) into the checkpoint directory so resumed runs and other variants reuse them. With
``--data FOLDER`` (the "data removal" setting) images + captions are read from a folder
(``name.png`` + ``name.txt``, or ``metadata.jsonl`` with ``file_name``/``text``) and labelled by the
detector (a COCO JSON gives the boxes of the folder's files).

Only images where the detector found the concept train the tokens: an image without it keeps its
caption, which contains no learned token, so it contributes no gradient (it is skipped rather than
computed for nothing).

Training caption: ``caption + " " + <concept> + <l{m,n}> for every bin the box covers`` (all boxes
of the image, bins in row-major order). Loss: ``mean(w * (eps - eps_theta)^2)`` with the
per-latent-cell weights of :func:`~.geom.region_weights`.
"""

from __future__ import annotations

import glob
import json
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .. import geom as G
from ..errors import EraserFileError

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class GeomConfig:
    concept: str = "watermark"
    grid: int = 4
    alpha: float = 0.5
    iterations: int = 1500
    batch: int = 16
    lr: float = 2e-3
    learn_concept: bool = True
    use_locations: bool = True
    # > 0: after each step, learned vectors longer than this are scaled back to it; -1: the longest row of
    # the model's token-embedding table (textual-inversion vectors otherwise drift to several times a word's
    # length, and an out-of-range vector in the negative prompt moves more than the concept); 0: off (paper)
    max_norm: float = 0.0
    seed: int = 0
    save_every: int = 250
    # model-removal data generation
    generate: int = 384
    gen_steps: int = 25
    gen_cfg: float = 5.0
    gen_batch: int = 32


@dataclass
class GeomData:
    files: list
    captions: list
    detections: list  # list[Detection]
    size: tuple  # (W, H) of the images
    images: torch.Tensor | None = None  # (n,3,H,W) in [0,1]

    @property
    def positives(self) -> list[int]:
        return [i for i, d in enumerate(self.detections) if d]


# ------------------------------------------------------------------------------------- data


def load_folder(folder: str) -> tuple[list, list, torch.Tensor]:
    """Images (sorted by name) and their captions from a data folder."""
    from PIL import Image

    if not os.path.isdir(folder):
        raise EraserFileError(folder, "data folder not found")
    files = sorted(f for f in glob.glob(os.path.join(folder, "*")) if f.lower().endswith(IMAGE_EXT))
    if not files:
        raise EraserFileError(folder, f"no images ({', '.join(IMAGE_EXT)}) in the data folder")
    meta = {}
    mpath = os.path.join(folder, "metadata.jsonl")
    if os.path.exists(mpath):
        with open(mpath) as f:
            for n, line in enumerate(f):
                if line.strip():
                    try:
                        d = json.loads(line)
                        meta[os.path.basename(d["file_name"])] = d.get("text", "")
                    except (json.JSONDecodeError, KeyError):
                        raise EraserFileError(mpath, f"line {n + 1}: needs JSON with file_name and text") from None
    caps, ims = [], []
    for f in files:
        base = os.path.basename(f)
        txt = os.path.splitext(f)[0] + ".txt"
        if base in meta:
            caps.append(meta[base])
        elif os.path.exists(txt):
            with open(txt) as fh:
                caps.append(fh.read().strip())
        else:
            raise EraserFileError(f, "no caption (a .txt with the same name, or an entry in metadata.jsonl)")
        ims.append(np.asarray(Image.open(f).convert("RGB")))
    sizes = {im.shape[:2] for im in ims}
    if len(sizes) > 1:
        raise EraserFileError(folder, f"images of different sizes {sorted(sizes)[:3]}: resize them to one size first")
    x = torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).float() / 255.0
    return files, caps, x


def write_folder(folder: str, data: GeomData, category: str) -> None:
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    arr = (data.images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)
    for f, cap, im in zip(data.files, data.captions, arr):
        Image.fromarray(im).save(os.path.join(folder, f))
        with open(os.path.join(folder, os.path.splitext(f)[0] + ".txt"), "w") as fh:
            fh.write(cap)
    G.write_coco(os.path.join(folder, "annotations.json"), data.files, data.detections, data.size, category)


@torch.no_grad()
def generate_data(pipe, prompts: list[str], detector, config: GeomConfig, log=None) -> GeomData:
    """Model removal: generate one image per prompt (seed = index) and label it with the detector."""
    from ..progress import bar

    res = pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    imgs = []
    shown = bar(len(prompts), "geom data", unit="image")
    for i in range(0, len(prompts), config.gen_batch):
        ps = prompts[i: i + config.gen_batch]
        gens = [torch.Generator("cpu").manual_seed(config.seed * 100003 + i + j) for j in range(len(ps))]
        shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
        lat = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(pipe.device, pipe.unet.dtype)
        out = pipe(prompt=ps, num_inference_steps=config.gen_steps, guidance_scale=config.gen_cfg, latents=lat,
                   output_type="pt", height=res, width=res)
        imgs.append(out.images.float().cpu().clamp(0, 1))
        shown.update(len(ps))
        if log:
            log(f"generated {min(i + config.gen_batch, len(prompts))}/{len(prompts)} training images")
    shown.close()
    x = torch.cat(imgs)
    dets = detector(x)
    files = [f"gen_{i:05d}.png" for i in range(len(x))]
    return GeomData(files, list(prompts), dets, (res, res), x)


def label_folder(folder: str, detector) -> GeomData:
    files, caps, x = load_folder(folder)
    if isinstance(detector, G.CocoDetector):
        dets = detector.for_files(files)
    else:
        dets = detector(x)
    return GeomData([os.path.basename(f) for f in files], caps, dets, (x.shape[3], x.shape[2]), x)


def load_pipeline(folder: str, device: str = "cpu"):
    """A diffusers ``StableDiffusionPipeline`` from a local folder (offline, no safety checker)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: not a diffusers model folder")
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


# ---------------------------------------------------------------------------------- trainer


class GeomTrainer:
    """Textual-inversion-style training of the Geom-Erasing tokens on a frozen pipeline.

    The pipeline's modules are only read (``requires_grad`` is switched off for the run and
    restored); learned vectors enter the text encoder through :class:`~.geom.VectorOverride`."""

    def __init__(self, pipe, data: GeomData, config: GeomConfig, device: str = "cpu"):
        from diffusers import DDPMScheduler

        self.pipe, self.data, self.config, self.device = pipe, data, config, torch.device(device)
        if not config.learn_concept and not config.use_locations:
            raise ValueError("nothing to learn: enable the concept token or the location tokens")
        self.tok, self.te, self.unet, self.vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
        self.sched = DDPMScheduler.from_config(pipe.scheduler.config)
        table = G.embedding_table(self.te).weight
        self.dim = table.shape[1]
        self.text_fp = G.text_fingerprint(table)
        g = config.grid
        gen = torch.Generator().manual_seed(config.seed)
        std = float(table.detach().float().std())
        self.locations = torch.nn.Parameter(torch.randn(g * g, self.dim, generator=gen) * std)
        word = self.tok(config.concept, add_special_tokens=False).input_ids
        self.concept = torch.nn.Parameter(table.detach().float()[word].mean(0, keepdim=True).clone().cpu())
        params = ([self.concept] if config.learn_concept else []) + ([self.locations] if config.use_locations else [])
        self.opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
        self.max_norm = float(table.detach().float().norm(dim=-1).max()) if config.max_norm < 0 else config.max_norm
        self.iteration = 0
        self.losses: list = []
        self.pos = data.positives
        if not self.pos:
            raise ValueError(f"the detector found no {config.concept!r} in any of the {len(data.files)} training images")
        # bins covered per positive image, and how often each bin was covered
        W, H = data.size
        self.bins = {i: sorted({b for box in data.detections[i].boxes for b in G.covered_bins(box, g, W, H)}) for i in self.pos}
        self.bin_counts = [0] * (g * g)
        for bl in self.bins.values():
            for b in bl:
                self.bin_counts[b] += 1
        self._encode_latents()

    @torch.no_grad()
    def _encode_latents(self):
        x = self.data.images[self.pos]
        sf = float(self.vae.config.scaling_factor)
        means, stds = [], []
        for i in range(0, len(x), 32):
            d = self.vae.encode((x[i: i + 32].to(self.device, self.vae.dtype) * 2 - 1)).latent_dist
            means.append(d.mean.float().cpu() * sf)
            stds.append(d.std.float().cpu() * sf)
        self.lat_mean, self.lat_std = torch.cat(means), torch.cat(stds)
        h, w = self.lat_mean.shape[-2:]
        self.masks = torch.stack([G.region_mask(self.data.detections[i].boxes, h, w, self.data.size) for i in self.pos])

    def caption_rows(self, idx: list[int]) -> list:
        rows = []
        for k in idx:
            i = self.pos[k]
            row = [self.data.captions[i] + " " if self.data.captions[i] else ""]
            row.append(self.concept if self.config.learn_concept else self.config.concept)
            if self.config.use_locations and self.bins[i]:
                row.append(self.locations[self.bins[i]])
            rows.append(row)
        return rows

    def step(self, gen: torch.Generator) -> float:
        c = self.config
        idx = torch.randint(0, len(self.pos), (c.batch,), generator=gen).tolist()
        z0 = self.lat_mean[idx] + self.lat_std[idx] * torch.randn(self.lat_mean[idx].shape, generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, self.sched.config.num_train_timesteps, (c.batch,), generator=gen)
        zt = self.sched.add_noise(z0, noise, t)
        w = torch.stack([G.region_weights(self.masks[k], c.alpha) for k in idx])  # [B, h, w]
        hidden = G.encode_segments(self.tok, self.te, self.caption_rows(idx))
        dt = self.unet.dtype
        pred = self.unet(zt.to(self.device, dt), t.to(self.device), hidden.to(dt)).sample.float()
        loss = (w.to(self.device)[:, None] * (pred - noise.to(self.device)) ** 2).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.max_norm > 0:
            with torch.no_grad():
                for v in (self.concept, self.locations):
                    n = v.norm(dim=-1, keepdim=True)
                    v.mul_(torch.where(n > self.max_norm, self.max_norm / n.clamp_min(1e-12), torch.ones_like(n)))
        return float(loss.detach())

    def eraser(self, name: str | None = None):
        c = self.config
        settings = {"alpha": c.alpha, "use_locations": c.use_locations, "iterations": self.iteration,
                    **({"max_norm": self.max_norm} if self.max_norm > 0 else {}),
                    "train_images": len(self.data.files), "positives": len(self.pos)}
        e = G.make_eraser(c.concept, self.locations.detach(), self.concept.detach() if c.learn_concept else None,
                          c.grid, self.bin_counts if c.use_locations else [0] * (c.grid ** 2), self.text_fp, settings, name)
        if not c.use_locations:
            e.settings["token_set"] = "topk"
            e.settings["top_k"] = 0
        return e

    def init_from(self, eraser) -> None:
        """Start from a saved Geom eraser's vectors (continued training, e.g. of a shipped file); the
        iteration count continues from the file's. The optimiser starts fresh (files hold no Adam state)."""
        where = eraser.source or eraser.name
        loc, s = eraser.tensors["locations"], eraser.settings
        if s.get("grid") != self.config.grid or tuple(loc.shape) != tuple(self.locations.shape):
            raise ValueError(f"{where}: grid {s.get('grid')} / locations {tuple(loc.shape)} do not match --grid "
                             f"{self.config.grid} ({tuple(self.locations.shape)})")
        if eraser.text_fingerprint and eraser.text_fingerprint != self.text_fp:
            raise ValueError(f"{where}: learned for another text encoder (fingerprint {eraser.text_fingerprint}, "
                             f"this model's {self.text_fp})")
        with torch.no_grad():
            self.locations.copy_(loc)
            if self.config.learn_concept and "concept" in eraser.tensors:
                self.concept.copy_(eraser.tensors["concept"].reshape(self.concept.shape))
        self.iteration = int(s.get("iterations", 0))

    def state(self, gen) -> dict:
        return {"iteration": self.iteration, "locations": self.locations.detach().clone(),
                "concept": self.concept.detach().clone(), "opt": self.opt.state_dict(), "gen": gen.get_state(),
                "losses": self.losses, "config": asdict(self.config)}

    def load_state(self, st: dict, gen):
        if st["config"]["grid"] != self.config.grid:
            raise ValueError(f"checkpoint grid {st['config']['grid']} differs from --grid {self.config.grid}")
        with torch.no_grad():
            self.locations.copy_(st["locations"])
            self.concept.copy_(st["concept"])
        self.opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"])
        self.iteration, self.losses = int(st["iteration"]), list(st["losses"])

    def train(self, out: str, checkpoint_dir: str | None = None, resume: bool = False, progress: bool = True,
              log=None, name: str | None = None, hyper: dict | None = None):
        from ..files import save_eraser

        c = self.config
        log = log or (lambda s: None)
        ckdir = checkpoint_dir or os.path.splitext(out)[0] + ".checkpoints"
        os.makedirs(ckdir, exist_ok=True)
        gen = torch.Generator().manual_seed(c.seed + 1)
        state_path = os.path.join(ckdir, "state.pt")
        if resume and os.path.exists(state_path):
            self.load_state(torch.load(state_path, map_location="cpu", weights_only=True), gen)
            log(f"resumed at iteration {self.iteration}")
        saved = {m: m.requires_grad for m in (self.unet, self.te, self.vae) for m in m.parameters()}
        for p in saved:
            p.requires_grad_(False)
        t0 = time.perf_counter()
        start = self.iteration
        from ..progress import bar as progress_bar

        bar = progress_bar(c.iterations, "geom", initial=self.iteration, show=progress)
        try:
            while self.iteration < c.iterations:
                loss = self.step(gen)
                self.iteration += 1
                self.losses.append((self.iteration, loss))
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if self.iteration % c.save_every == 0 or self.iteration == c.iterations:
                    torch.save(self.state(gen), state_path + ".tmp")
                    os.replace(state_path + ".tmp", state_path)
                    save_eraser(self.eraser(name), os.path.join(ckdir, f"geom_{self.iteration}steps.safetensors"),
                                hyperparameters={**asdict(c), **(hyper or {})})
                    recent = [l for _, l in self.losses[-c.save_every:]]
                    log(f"iteration {self.iteration}: mean loss {np.mean(recent):.4f} (last {len(recent)}), "
                        f"{(time.perf_counter() - t0) / max(self.iteration - start, 1):.3f} s/it")
        finally:
            bar.close()
            for p, r in saved.items():
                p.requires_grad_(r)
        seconds = time.perf_counter() - t0
        eraser = self.eraser(name)
        save_eraser(eraser, out, hyperparameters={**asdict(c), **(hyper or {}), "seconds": seconds,
                                                  "seconds_per_iteration": seconds / max(self.iteration - start, 1)})
        return eraser, seconds, self.iteration - start

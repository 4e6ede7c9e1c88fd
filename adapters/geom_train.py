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
import math
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from . import geom as G
from .errors import EraserFileError

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


def toy_captions(n: int, seed: int) -> list[str]:
    from ..toyworld import captions as C
    from ..toyworld import render as R

    rng = np.random.default_rng(seed)
    labels = R.sample_labels(n, rng)
    return C.training_captions(labels, rng)


@torch.no_grad()
def generate_data(pipe, prompts: list[str], detector, config: GeomConfig, log=None) -> GeomData:
    """Model removal: generate one image per prompt (seed = index) and label it with the detector."""
    res = pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    imgs = []
    for i in range(0, len(prompts), config.gen_batch):
        ps = prompts[i: i + config.gen_batch]
        gens = [torch.Generator("cpu").manual_seed(config.seed * 100003 + i + j) for j in range(len(ps))]
        shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
        lat = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(pipe.device, pipe.unet.dtype)
        out = pipe(prompt=ps, num_inference_steps=config.gen_steps, guidance_scale=config.gen_cfg, latents=lat,
                   output_type="pt", height=res, width=res)
        imgs.append(out.images.float().cpu().clamp(0, 1))
        if log:
            log(f"generated {min(i + config.gen_batch, len(prompts))}/{len(prompts)} training images")
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


def make_detector(spec: str, device: str = "cpu", category: str | None = None):
    """``toy-watermark`` (the toy world's watermark judge + location check), ``toy-watermark-handcrafted``
    (no learned judge), or a COCO JSON path."""
    if spec == "toy-watermark":
        from ..toyworld import load_judges

        return G.ToyWatermarkDetector(judge=load_judges())
    if spec == "toy-watermark-handcrafted":
        return G.ToyWatermarkDetector()
    if spec.lower().endswith(".json"):
        return G.CocoDetector(spec, category)
    raise ValueError(f"unknown detector {spec!r}: toy-watermark, toy-watermark-handcrafted or a COCO .json file")


def load_pipeline(model: str, device: str = "cpu"):
    if model == "toy":
        from ..toyworld import load_pipeline as toy

        return toy(device=device)
    if not os.path.isdir(model):
        raise FileNotFoundError(f"{model}: not a diffusers model folder (or 'toy')")
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False,
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
        return float(loss.detach())

    def eraser(self, name: str | None = None):
        c = self.config
        settings = {"alpha": c.alpha, "use_locations": c.use_locations, "iterations": self.iteration,
                    "train_images": len(self.data.files), "positives": len(self.pos)}
        e = G.make_eraser(c.concept, self.locations.detach(), self.concept.detach() if c.learn_concept else None,
                          c.grid, self.bin_counts if c.use_locations else [0] * (c.grid ** 2), self.text_fp, settings, name)
        if not c.use_locations:
            e.settings["token_set"] = "topk"
            e.settings["top_k"] = 0
        return e

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
        from .files import save_eraser

        c = self.config
        log = log or (lambda s: None)
        ckdir = checkpoint_dir or os.path.splitext(out)[0] + ".checkpoints"
        os.makedirs(ckdir, exist_ok=True)
        gen = torch.Generator().manual_seed(c.seed + 1)
        state_path = os.path.join(ckdir, "state.pt")
        if resume and os.path.exists(state_path):
            self.load_state(torch.load(state_path, weights_only=False), gen)
            log(f"resumed at iteration {self.iteration}")
        saved = {m: m.requires_grad for m in (self.unet, self.te, self.vae) for m in m.parameters()}
        for p in saved:
            p.requires_grad_(False)
        t0 = time.perf_counter()
        start = self.iteration
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=c.iterations, initial=self.iteration, desc="geom", dynamic_ncols=True)
        try:
            while self.iteration < c.iterations:
                loss = self.step(gen)
                self.iteration += 1
                self.losses.append((self.iteration, loss))
                if bar is not None:
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
            if bar is not None:
                bar.close()
            for p, r in saved.items():
                p.requires_grad_(r)
        seconds = time.perf_counter() - t0
        eraser = self.eraser(name)
        save_eraser(eraser, out, hyperparameters={**asdict(c), **(hyper or {}), "seconds": seconds,
                                                  "seconds_per_iteration": seconds / max(self.iteration - start, 1)})
        return eraser, seconds, self.iteration - start


# -------------------------------------------------------------------------------------- CLI


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prepare_data(pipe, args, config: GeomConfig, ckdir: str, log=_log) -> GeomData:
    detector = make_detector(args.detector, args.device, getattr(args, "category", None))
    if args.data:
        data = label_folder(args.data, detector)
        log(f"data folder {args.data}: {len(data.files)} images, {len(data.positives)} with {config.concept!r}")
        return data
    cache = os.path.join(ckdir, "data")
    if os.path.exists(os.path.join(cache, "annotations.json")):
        data = label_folder(cache, G.CocoDetector(os.path.join(cache, "annotations.json")))
        log(f"reusing generated data {cache}: {len(data.files)} images, {len(data.positives)} with {config.concept!r}")
        return data
    if isinstance(detector, G.CocoDetector):
        raise ValueError("a COCO annotation file labels a data folder: pass --data FOLDER (or a detector for generated images)")
    if args.prompts:
        with open(args.prompts) as f:
            lines = [l.strip() for l in f if l.strip()]
        prompts = [lines[i % len(lines)] for i in range(config.generate)]
    elif args.model == "toy":
        prompts = toy_captions(config.generate, config.seed)
    else:
        raise ValueError("--prompts FILE is needed to generate training images from a non-toy model")
    t = time.perf_counter()
    data = generate_data(pipe, prompts, detector, config, log)
    log(f"generated {len(data.files)} images in {time.perf_counter() - t:.1f} s; the detector found "
        f"{config.concept!r} in {len(data.positives)}")
    write_folder(cache, data, config.concept)
    return data


def cmd_train_geom(args) -> int:
    from .files import save_eraser  # noqa: F401  (import errors early)

    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda asked for, but torch sees no CUDA device")
        config = GeomConfig(concept=args.concept, grid=args.grid, alpha=args.alpha, iterations=args.iterations,
                            batch=args.batch, lr=args.lr, learn_concept=not args.fixed_concept,
                            use_locations=not args.no_locations, seed=args.seed, save_every=args.save_every,
                            generate=args.generate, gen_steps=args.gen_steps, gen_cfg=args.gen_cfg)
        ckdir = args.checkpoint_dir or os.path.splitext(args.out)[0] + ".checkpoints"
        os.makedirs(ckdir, exist_ok=True)
        _log(f"loading {args.model}")
        pipe = load_pipeline(args.model, args.device)
        data = prepare_data(pipe, args, config, ckdir)
        if args.data_only:
            print(f"data in {os.path.join(ckdir, 'data')}: {len(data.files)} images, {len(data.positives)} with {config.concept!r}")
            return 0
        trainer = GeomTrainer(pipe, data, config, args.device)
        used = [b for b, n in enumerate(trainer.bin_counts) if n]
        _log(f"grid {config.grid}x{config.grid}, alpha {config.alpha}, {len(trainer.pos)} training images, bins covered: "
             + ", ".join(f"{G.token_name(b, config.grid)} x{trainer.bin_counts[b]}" for b in used))
        eraser, seconds, n = trainer.train(args.out, ckdir, args.resume, not args.no_progress, _log, args.name)
        if args.export:
            paths = G.export_ti(eraser, args.export, name=args.name or eraser.name, per_token=args.per_token)
            _log(f"exported {len(paths)} textual-inversion file(s) to {args.export}")
    except (FileNotFoundError, EraserFileError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    last = np.mean([l for _, l in trainer.losses[-50:]]) if trainer.losses else float("nan")
    print(f"wrote {args.out}: Geom-Erasing tokens for {args.concept!r} (grid {config.grid}, alpha {config.alpha}), "
          f"{n} iterations in {seconds:.1f} s ({seconds / max(n, 1):.3f} s/it), mean loss of the last 50 {last:.4f}")
    return 0


import sys  # noqa: E402


def add_cli(subparsers) -> None:
    from .cli_train import _train_subparsers

    tsub = _train_subparsers(subparsers)
    p = tsub.add_parser("geom", help="learn Geom-Erasing concept + location tokens (Liu et al., ECCV 2024)",
                        description="Textual-inversion-style training of the location tokens <l{m,n}> (and the concept "
                                    "token) with the spatially re-weighted loss; UNet and text encoder frozen.")
    p.add_argument("--model", required=True, help='diffusers model folder, or "toy"')
    p.add_argument("--concept", required=True, help="the implicit concept's name (e.g. watermark)")
    p.add_argument("--detector", default="toy-watermark",
                   help="toy-watermark | toy-watermark-handcrafted | a COCO .json of boxes for the --data folder")
    p.add_argument("--category", default=None, help="COCO category name to use (default: every annotation)")
    p.add_argument("--data", default=None, help="folder of images + captions (data removal); default: generate (model removal)")
    p.add_argument("--data-only", action="store_true", help="generate and label the training data, then stop")
    p.add_argument("--prompts", default=None, help="text file of prompts to generate training images from (non-toy models)")
    p.add_argument("--generate", type=int, default=384, help="images to generate in model-removal mode")
    p.add_argument("--gen-steps", type=int, default=25)
    p.add_argument("--gen-cfg", type=float, default=5.0)
    p.add_argument("--grid", type=int, default=4, help="location grid N (N x N bins)")
    p.add_argument("--alpha", type=float, default=0.5, help="re-weighting: <1 up-weights the concept region, 1 = plain loss")
    p.add_argument("--iterations", type=int, default=1500)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--fixed-concept", action="store_true", help="use the concept's word as is (do not learn a concept token)")
    p.add_argument("--no-locations", action="store_true", help="ablation: learn the concept token only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--checkpoint-dir", default=None, help="default: <out>.checkpoints/ (also caches generated data)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint directory's state.pt")
    p.add_argument("--export", default=None, help="also write textual-inversion embedding(s) into this folder")
    p.add_argument("--per-token", action="store_true", help="with --export: one file per location token too")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--name", default=None, help="eraser / embedding name (default geom_<concept>)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True, help="output .safetensors (ConceptGate conditioning eraser)")
    p.set_defaults(func=cmd_train_geom)

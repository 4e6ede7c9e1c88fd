"""Train the whole toy world from scratch: mini-CLIP (text encoder + image tower), VAE, judges, UNet;
evaluate; export a diffusers folder + judges + MANIFEST.json.

    python -c "from conceptgate.toyworld.train import main; main(['train', '--out', 'runs/tw'])"

or, once registered by the CLI, ``python -m conceptgate toyworld train --out DIR``.

Seeded; every stage checkpoints periodically under ``DIR/ckpt`` and ``--resume`` continues.
The default config is sized from per-step times measured on 2 CPU cores (see ``CPU_STEP_SECONDS``).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from . import captions as C
from . import render as R
from .models import ARCH, HERE, ImageTower, Judge, TextHead, load_tokenizer, make_scheduler, make_text_encoder, make_unet, make_vae
from .judges import NONE, accuracy_on_labels, augment, classify, make_garbage

DEFAULT_WEIGHTS = os.path.join(HERE, "weights")

DEFAULT_CONFIG = {
    "seed": 0,
    "gen_pool": 32000,  # renders (held-out pairs excluded) for mini-CLIP, VAE and UNet
    "judge_pool": 24000,  # renders (all pairs, watermark on half) for the judges
    "judge_watermark_rate": 0.5,
    "clip_steps": 2000, "clip_batch": 64, "clip_lr": 5e-4,
    "vae_steps": 2000, "vae_batch": 32, "vae_crop": 32, "vae_lr": 4e-4, "vae_kl": 1e-6,
    "judge_steps": 1200, "judge_batch": 64, "judge_garbage": 32, "judge_lr": 2e-3,
    "unet_steps": 8000, "unet_batch": 32, "unet_lr": 4e-4, "unet_warmup": 200, "ema": 0.999,
    "caption_dropout": 0.1,
    "eval_steps": 25, "eval_cfg": 5.0, "eval_prompts": 96, "eval_seeds": 1, "eval_renders": 2000,
    "ckpt_every": 500,
}
QUICK_OVERRIDES = {
    "gen_pool": 2000, "judge_pool": 2000, "clip_steps": 20, "vae_steps": 20, "judge_steps": 20,
    "unet_steps": 20, "unet_warmup": 5, "eval_prompts": 8, "eval_steps": 5, "eval_renders": 200, "ckpt_every": 10,
}
# Seconds per step measured on 2 CPU cores (torch 2.14 CPU, this machine), at the default batch sizes.
CPU_STEP_SECONDS = {"clip": 0.16, "vae": 0.24, "judge": 0.50, "unet": 0.55, "vae_encode_per_image": 0.007}

STAGES = ["clip", "vae", "judge", "unet"]


def log(msg: str) -> None:
    from ..adapters.progress import write

    write(f"[{time.strftime('%H:%M:%S')}] {msg}")


# ------------------------------------------------------------------------------------ data pools


def _render_chunk(args):
    seed, n, kw = args
    imgs, lab = R.render_batch(n, seed, **kw)
    return imgs, lab


def render_pool(n: int, seed: int, workers: int = 1, chunk: int = 1000, **kw):
    """Render ``n`` images in fixed chunks seeded (seed, chunk index): the result does not depend on
    the number of workers."""
    jobs = [([seed, i], min(chunk, n - i * chunk), kw) for i in range((n + chunk - 1) // chunk)]
    if workers > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as ex:
            parts = list(ex.map(_render_chunk, jobs))
    else:
        parts = [_render_chunk(j) for j in jobs]
    imgs = np.concatenate([p[0] for p in parts])
    lab = {k: np.concatenate([p[1][k] for p in parts]) for k in parts[0][1]}
    return imgs, lab


def _sub(lab: dict, idx) -> dict:
    return {k: v[idx] for k, v in lab.items()}


class TextCache:
    """Tokenises captions once (CLIP BPE, padded to 77 like the pipelines do)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: dict = {}

    def __call__(self, texts, device) -> torch.Tensor:
        missing = [t for t in set(texts) if t not in self.ids]
        if missing:
            enc = self.tok(missing, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            for t, e in zip(missing, enc):
                self.ids[t] = e
        return torch.stack([self.ids[t] for t in texts]).to(device)


# ------------------------------------------------------------------------------- checkpointing


class Ckpt:
    def __init__(self, out: str):
        self.dir = os.path.join(out, "ckpt")
        os.makedirs(self.dir, exist_ok=True)

    def path(self, name):
        return os.path.join(self.dir, name + ".pt")

    def save(self, name, obj):
        tmp = self.path(name) + ".tmp"
        torch.save(obj, tmp)
        os.replace(tmp, self.path(name))

    def load(self, name):
        p = self.path(name)
        return torch.load(p, map_location="cpu", weights_only=True) if os.path.exists(p) else None


def _adamw(params, **kw):
    params = list(params)
    if params and params[0].is_cuda:
        kw["fused"] = True
    return torch.optim.AdamW(params, **kw)


DEADLINE = {"t": None}  # absolute time after which training loops stop early (``--deadline-min``)


def _lr(step, total, base, warmup):
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def _pbar(total, initial, desc):
    """The common progress bar (stderr, ETA; off without a terminal unless CONCEPTGATE_PROGRESS=1, which
    ``gpu_train.sh`` sets so that its log shows progress every 30 s)."""
    from ..adapters.progress import bar

    return bar(total, desc, initial=initial)


def _run_loop(name, cfg, ck, resume, models, opt, step_fn, total, lr_base, warmup, state_extra=None):
    """Generic resumable training loop.  ``step_fn(step) -> loss``; models: dict name -> module."""
    start = 0
    st = ck.load(name + "_partial") if resume else None
    if st is not None:
        for k, m in models.items():
            m.load_state_dict(st["models"][k])
        opt.load_state_dict(st["opt"])
        if state_extra is not None and "extra" in st:
            state_extra.load_state_dict(st["extra"])
        start = st["step"]
        log(f"{name}: resuming at step {start}")
    t0 = time.time()
    bar = _pbar(total, start, name)
    ema_loss = None
    stopped = None
    for step in range(start, total):
        if DEADLINE["t"] is not None and time.time() > DEADLINE["t"]:
            stopped = step
            log(f"{name}: DEADLINE reached, stopping early at step {step} of {total}")
            break
        for g in opt.param_groups:
            g["lr"] = _lr(step, total, lr_base, warmup)
        loss = step_fn(step)
        ema_loss = loss if ema_loss is None else 0.98 * ema_loss + 0.02 * loss
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{ema_loss:.4f}")
        if (step + 1) % cfg["ckpt_every"] == 0 and step + 1 < total:
            ck.save(name + "_partial", {
                "models": {k: m.state_dict() for k, m in models.items()}, "opt": opt.state_dict(), "step": step + 1,
                **({"extra": state_extra.state_dict()} if state_extra is not None else {}),
            })
    bar.close()
    dt = time.time() - t0
    end = stopped if stopped is not None else total
    n = max(1, end - start)
    log(f"{name}: {end - start} steps in {dt:.1f}s ({dt / n:.3f} s/step), final loss {ema_loss}")
    return {"seconds": dt, "s_per_step": dt / n, "steps_run": end - start, "stopped_early_at": stopped,
            "final_loss": None if ema_loss is None else float(ema_loss)}


# ------------------------------------------------------------------------------------- stages


def train_clip(cfg, dev, ck, resume, pool, amp):
    imgs, lab = pool
    te = make_text_encoder().to(dev)
    tower = ImageTower(ARCH["image_tower_width"], ARCH["text_hidden"]).to(dev)
    head = TextHead(ARCH["text_hidden"], ARCH["text_hidden"]).to(dev)
    tok = load_tokenizer()
    cache = {}
    params = list(te.parameters()) + list(tower.parameters()) + list(head.parameters())
    opt = _adamw(params, lr=cfg["clip_lr"], weight_decay=0.01)
    B = cfg["clip_batch"]

    def step(i):
        rng = np.random.default_rng([cfg["seed"], 1, i])
        idx = rng.integers(0, len(imgs), B)
        lb = _sub(lab, idx)
        caps, fields = C.training_captions(lb, rng, p_drop=0.0, return_fields=True)
        x = torch.from_numpy(imgs[idx]).to(dev).permute(0, 3, 1, 2).float() / 255
        miss = [c for c in set(caps) if c not in cache]
        if miss:
            for c, e in zip(miss, tok(miss).input_ids):
                cache[c] = e
        L = max(len(cache[c]) for c in caps)
        ids = torch.full((B, L), C_PAD, dtype=torch.long)
        for j, c in enumerate(caps):
            ids[j, : len(cache[c])] = torch.tensor(cache[c])
        ids = ids.to(dev)
        # caption j matches image k when every attribute it states is true of image k
        f = torch.from_numpy(fields)
        true = torch.stack([torch.from_numpy(lb["object"]), torch.from_numpy(lb["style"]), torch.from_numpy(lb["colour"])], 1)
        match = ((f[:, None, :] < 0) | (f[:, None, :] == true[None, :, :])).all(-1).float().to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            t = head(te(input_ids=ids).pooler_output.float())
            v = tower(x)
            logits = head.logit_scale.clamp(max=4.6).exp() * t.float() @ v.float().T
        lt = -(match / match.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
        li = -(match.T / match.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
        loss = (lt + li) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    te.train(), tower.train(), head.train()
    stats = _run_loop("clip", cfg, ck, resume, {"te": te, "tower": tower, "head": head}, opt, step,
                      cfg["clip_steps"], cfg["clip_lr"], 100)
    return te.eval(), tower.eval(), head.eval(), stats


C_PAD = 49407


def train_vae(cfg, dev, ck, resume, pool, amp):
    imgs, _ = pool
    vae = make_vae().to(dev)
    opt = _adamw(vae.parameters(), lr=cfg["vae_lr"], weight_decay=0.0)
    B, cs = cfg["vae_batch"], cfg["vae_crop"]

    def step(i):
        rng = np.random.default_rng([cfg["seed"], 2, i])
        idx = rng.integers(0, len(imgs), B)
        ox, oy = rng.integers(0, 64 - cs + 1, 2) if cs < 64 else (0, 0)
        x = torch.from_numpy(imgs[idx, oy : oy + cs, ox : ox + cs]).to(dev).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            post = vae.encode(x).latent_dist
            g = torch.Generator(device=dev).manual_seed(int(rng.integers(1 << 62)))
            z = post.sample(generator=g)
            rec = vae.decode(z).sample.float()
        kl = post.kl().mean() / (z[0].numel())
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + cfg["vae_kl"] * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        return float(loss.detach())

    vae.train()
    stats = _run_loop("vae", cfg, ck, resume, {"vae": vae}, opt, step, cfg["vae_steps"], cfg["vae_lr"], 100)
    vae.eval()
    return vae, stats


def train_judges(cfg, dev, ck, resume, pool, amp):
    imgs, lab = pool
    judge = Judge(ARCH["judge_width"]).to(dev)
    opt = _adamw(judge.parameters(), lr=cfg["judge_lr"], weight_decay=1e-4)
    B, G = cfg["judge_batch"], cfg["judge_garbage"]
    targets_all = {
        "object": torch.from_numpy(lab["object"]),
        "style": torch.from_numpy(lab["style"]),
        "colour": torch.from_numpy(lab["colour"]),
        "watermark": torch.from_numpy((lab["wm_loc"] >= 0).astype(np.int64)),
    }

    def step(i):
        rng = np.random.default_rng([cfg["seed"], 3, i])
        idx = rng.integers(0, len(imgs), B + G)
        g = torch.Generator(device=dev).manual_seed(int(rng.integers(1 << 62)))
        x = torch.from_numpy(imgs[idx]).to(dev).permute(0, 3, 1, 2).float() / 255
        clean = augment(x[:B], g)
        garbage = augment(make_garbage(x[B:], g), g)
        inp = torch.cat([clean, garbage])
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            out = judge(inp)
        loss = 0.0
        for k, logits in out.items():
            t = torch.cat([targets_all[k][idx[:B]], torch.full((G,), NONE[k])]).to(dev)
            loss = loss + F.cross_entropy(logits.float(), t, label_smoothing=0.02)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    judge.train()
    stats = _run_loop("judge", cfg, ck, resume, {"judge": judge}, opt, step, cfg["judge_steps"], cfg["judge_lr"], 50)
    judge.eval()
    return judge, stats


@torch.no_grad()
def encode_pool(vae, imgs, dev, batch=256):
    means, stds = [], []
    for i in range(0, len(imgs), batch):
        x = torch.from_numpy(imgs[i : i + batch]).to(dev).permute(0, 3, 1, 2).float() / 127.5 - 1
        d = vae.encode(x).latent_dist
        means.append(d.mean.half().cpu())
        stds.append(d.std.half().cpu())
    return torch.cat(means), torch.cat(stds)


def train_unet(cfg, dev, ck, resume, pool, te, latents, sf, amp, init_unet=None):
    _, lab = pool
    mean, std = latents
    mean, std = mean.to(dev), std.to(dev)
    unet = (init_unet if init_unet is not None else make_unet()).to(dev).float()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    sched = make_scheduler("ddpm")
    acp = sched.alphas_cumprod.to(dev)
    opt = _adamw(unet.parameters(), lr=cfg["unet_lr"], weight_decay=0.0)
    tc = TextCache(load_tokenizer())
    emb_cache: dict = {}
    B = cfg["unet_batch"]
    te.requires_grad_(False)

    def encode_text(caps):
        miss = sorted(set(c for c in caps if c not in emb_cache))
        if miss:
            with torch.no_grad():
                h = te(input_ids=tc(miss, dev)).last_hidden_state.float()
            for c, e in zip(miss, h):
                emb_cache[c] = e
        return torch.stack([emb_cache[c] for c in caps])

    class EmaState:
        def state_dict(self):
            return ema.state_dict()

        def load_state_dict(self, s):
            ema.load_state_dict(s)

    def step(i):
        rng = np.random.default_rng([cfg["seed"], 4, i])
        idx = rng.integers(0, len(mean), B)
        caps = C.training_captions(_sub(lab, idx), rng, p_drop=cfg["caption_dropout"])
        ctx = encode_text(caps)
        g = torch.Generator(device=dev).manual_seed(int(rng.integers(1 << 62)))
        it = torch.from_numpy(idx).to(dev)
        z0 = (mean[it].float() + std[it].float() * torch.randn(B, 4, 16, 16, generator=g, device=dev)) * sf
        noise = torch.randn(z0.shape, generator=g, device=dev)
        t = torch.randint(0, 1000, (B,), generator=g, device=dev)
        a = acp[t].view(B, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            pred = unet(zt, t, ctx).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        d = min(cfg["ema"], (1 + i) / (10 + i))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, unet_params, 1 - d)
        return float(loss.detach())

    ema_params, unet_params = list(ema.parameters()), list(unet.parameters())
    unet.train()
    stats = _run_loop("unet", cfg, ck, resume, {"unet": unet}, opt, step, cfg["unet_steps"], cfg["unet_lr"],
                      cfg["unet_warmup"], state_extra=EmaState())
    return ema, stats


# ------------------------------------------------------------------------------------- export


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def export(out_dir, te, vae, unet, judge, tower, head):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae).cpu().half(), text_encoder=copy.deepcopy(te).cpu().half(), tokenizer=load_tokenizer(),
        unet=copy.deepcopy(unet).cpu().half(), scheduler=make_scheduler("ddim"), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    # keep the classic BPE files next to tokenizer.json, for hosts/tokenizer versions that need them
    import shutil

    from .models import TOKENIZER_DIR

    for n in ("vocab.json", "merges.txt", "special_tokens_map.json"):
        dst = os.path.join(out_dir, "tokenizer", n)
        if not os.path.exists(dst):
            shutil.copyfile(os.path.join(TOKENIZER_DIR, n), dst)
    shutil.copyfile(os.path.join(os.path.dirname(TOKENIZER_DIR), "ATTRIBUTION.md"), os.path.join(out_dir, "ATTRIBUTION.md"))
    save_file({k: v.detach().cpu().float().contiguous() for k, v in judge.state_dict().items()},
              os.path.join(out_dir, "judges.safetensors"))
    clip_sd = {"tower." + k: v for k, v in tower.state_dict().items()}
    clip_sd.update({"head." + k: v for k, v in head.state_dict().items()})
    save_file({k: v.detach().cpu().float().contiguous() for k, v in clip_sd.items()},
              os.path.join(out_dir, "clip_judge.safetensors"))
    with open(os.path.join(out_dir, "arch.json"), "w") as f:
        json.dump(ARCH, f, indent=2)


def write_manifest(out_dir, info):
    files = {}
    for root, _, names in os.walk(out_dir):
        for n in sorted(names):
            p = os.path.join(root, n)
            rel = os.path.relpath(p, out_dir)
            if rel == "MANIFEST.json":
                continue
            files[rel] = {"sha256": _sha256(p), "bytes": os.path.getsize(p)}
    info = dict(info)
    info["files"] = dict(sorted(files.items()))
    info["total_bytes"] = sum(v["bytes"] for v in files.values())
    with open(os.path.join(out_dir, "MANIFEST.json"), "w") as f:
        json.dump(info, f, indent=2)
    return info


# ------------------------------------------------------------------------------------- evaluate


def eval_prompts(n: int, seed: int = 0, include_heldout: bool = False):
    """Prompts naming object, style and colour (training keyword template), spread over all
    combinations (held-out pairs excluded unless asked)."""
    held = set(C.HELDOUT_PAIRS)
    combos = [(o, s, c) for o in range(len(R.OBJECTS)) for s in range(len(R.STYLES)) for c in range(len(R.COLOURS))
              if include_heldout or (o, s) not in held]
    rng = np.random.default_rng(seed)
    if n < len(combos):
        # a balanced subset: cycle colours so every object x style pair appears
        rng.shuffle(combos)
        combos = sorted(combos[:n])
    return [(C.prompt(o, s, c), (o, s, c)) for o, s, c in combos]


def evaluate(pipe, judge, cfg, dev, log_fn=log):
    from . import generate

    res = {}
    imgs, lab = R.render_batch(cfg["eval_renders"], 987654, watermark_rate=0.5)
    pred = classify(judge, imgs)
    res["judge_accuracy_heldout_renders"] = accuracy_on_labels(pred, lab)
    g = make_garbage(R.to_tensor(imgs[:400]), torch.Generator().manual_seed(1))
    pg = classify(judge, g)
    res["judge_none_rate_on_garbage"] = {k: float((pg[k] == NONE[k]).mean()) for k in NONE}
    log_fn(f"judges on held-out renders: {res['judge_accuracy_heldout_renders']}")
    log_fn(f"judges 'none' rate on garbage: {res['judge_none_rate_on_garbage']}")

    pr = eval_prompts(cfg["eval_prompts"])
    prompts = [p for p, _ in pr for _ in range(cfg["eval_seeds"])]
    labels = np.array([l for _, l in pr for _ in range(cfg["eval_seeds"])])
    seeds = list(range(len(prompts)))
    t0 = time.time()
    out = []
    bs = 64
    for i in range(0, len(prompts), bs):
        out.append(generate(pipe, prompts[i : i + bs], seeds[i : i + bs], steps=cfg["eval_steps"], cfg=cfg["eval_cfg"]))
    gen = torch.cat(out)
    dt = time.time() - t0
    pg = classify(judge, gen)
    acc = {
        "object": float((pg["object"] == labels[:, 0]).mean()),
        "style": float((pg["style"] == labels[:, 1]).mean()),
        "colour": float((pg["colour"] == labels[:, 2]).mean()),
    }
    acc["all_three"] = float(((pg["object"] == labels[:, 0]) & (pg["style"] == labels[:, 1]) & (pg["colour"] == labels[:, 2])).mean())
    res["generation"] = {
        "n_images": len(prompts), "sampler": f"DDIM {cfg['eval_steps']} steps, CFG {cfg['eval_cfg']}",
        "judged_accuracy": acc,
        "watermark_rate": float((pg["watermark"] == 1).mean()),
        "garbage_rate_object": float((pg["object"] == NONE["object"]).mean()),
        "seconds": dt,
    }
    from .judges import frechet_distance, judge_features

    fa = judge_features(judge, gen)
    fb = judge_features(judge, imgs[: len(gen)] if len(gen) <= len(imgs) else imgs)
    res["generation"]["frechet_judge_features"] = frechet_distance(fa, fb)
    log_fn(f"generation ({len(prompts)} images, {dt:.1f}s): judged {acc}, watermark rate "
           f"{res['generation']['watermark_rate']:.3f}, garbage {res['generation']['garbage_rate_object']:.3f}, "
           f"FD {res['generation']['frechet_judge_features']:.2f}")
    return res, gen


# ---------------------------------------------------------------------------------------- main


def run_train(args) -> dict:
    cfg = dict(DEFAULT_CONFIG)
    if args.quick:
        cfg.update(QUICK_OVERRIDES)
    for kv in args.set or []:
        k, v = kv.split("=", 1)
        if k not in cfg:
            raise SystemExit(f"unknown config key {k}")
        cfg[k] = type(cfg[k])(float(v)) if isinstance(cfg[k], (int, float)) else v
    if args.seed is not None:
        cfg["seed"] = args.seed
    dev = torch.device(args.device)
    if dev.type == "cpu":
        torch.set_num_threads(args.threads or min(2, os.cpu_count() or 1))
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    amp = bool(args.bf16) and dev.type == "cuda"
    torch.manual_seed(cfg["seed"])
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    ck = Ckpt(out)
    t_start = time.time()
    if args.deadline_min:
        DEADLINE["t"] = t_start + 60.0 * args.deadline_min
        log(f"deadline: training loops stop at {args.deadline_min} min after start (recorded in the manifest)")
    walls = {}
    log(f"config: {json.dumps(cfg)}")
    log(f"device {dev}, bf16 autocast {amp}, torch {torch.__version__}, out {out}")

    workers = args.workers or (min(16, os.cpu_count() or 1) if dev.type == "cuda" else 1)
    t0 = time.time()
    gen_pool = render_pool(cfg["gen_pool"], cfg["seed"] * 1000 + 1, workers, exclude_pairs=C.HELDOUT_PAIRS)
    judge_pool = render_pool(cfg["judge_pool"], cfg["seed"] * 1000 + 2, workers,
                             watermark_rate=cfg["judge_watermark_rate"])
    walls["render_pools"] = time.time() - t0
    log(f"rendered {len(gen_pool[0])} + {len(judge_pool[0])} images in {walls['render_pools']:.1f}s ({workers} workers)")

    stats = {}
    if getattr(args, "init_from", None):
        init = _load_init(args.init_from, dev)
        te, tower, head, vae, judge = init["te"], init["tower"], init["head"], init["vae"], init["judge"]
        stats.update({k: v for k, v in init["stats"].items() if k in ("clip", "vae", "judge")})
        log(f"init-from {args.init_from}: text encoder, image tower, VAE and judges loaded; UNet warm-started")
    else:
        init = None
        m, stats["clip"] = _stage(ck, args.resume, "clip", lambda: _named(("te", "tower", "head"), train_clip(cfg, dev, ck, args.resume, gen_pool, amp)),
                                  lambda: {"te": make_text_encoder(), "tower": ImageTower(ARCH["image_tower_width"], ARCH["text_hidden"]),
                                           "head": TextHead(ARCH["text_hidden"], ARCH["text_hidden"])}, dev)
        te, tower, head = m["te"], m["tower"], m["head"]
        m, stats["vae"] = _stage(ck, args.resume, "vae", lambda: _named(("vae",), train_vae(cfg, dev, ck, args.resume, gen_pool, amp)),
                                 lambda: {"vae": make_vae()}, dev)
        vae = m["vae"]
        m, stats["judge"] = _stage(ck, args.resume, "judge", lambda: _named(("judge",), train_judges(cfg, dev, ck, args.resume, judge_pool, amp)),
                                   lambda: {"judge": Judge(ARCH["judge_width"])}, dev)
        judge = m["judge"]

    t0 = time.time()
    latents = encode_pool(vae, gen_pool[0], dev)
    sf = float(1.0 / (latents[0].float().std()))
    vae.register_to_config(scaling_factor=sf)
    walls["encode_latents"] = time.time() - t0
    with torch.no_grad():
        x = torch.from_numpy(judge_pool[0][:256]).to(dev).permute(0, 3, 1, 2).float() / 127.5 - 1
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        vae_mse = float(F.mse_loss(rec, x))
    log(f"encoded {len(latents[0])} latents in {walls['encode_latents']:.1f}s; scaling factor {sf:.4f}; "
        f"VAE reconstruction MSE on [-1,1] (held-out renders) {vae_mse:.4f}")

    done = ck.load("unet_done") if args.resume else None
    if done is None:
        unet, stats["unet"] = train_unet(cfg, dev, ck, args.resume, gen_pool, te, latents, sf, amp,
                                         init_unet=init["unet"] if init is not None else None)
        ck.save("unet_done", {"unet": unet.state_dict(), "stats": stats["unet"]})
    else:
        unet = make_unet().to(dev)
        unet.load_state_dict(done["unet"])
        stats["unet"] = done["stats"]
        log("unet: loaded finished stage")
    unet.eval()

    weights = os.path.abspath(args.weights or os.path.join(out, "weights"))
    export(weights, te, vae, unet, judge, tower, head)
    log(f"exported to {weights}")
    train_wall = time.time() - t_start

    from . import load_judges, load_pipeline

    pipe = load_pipeline(weights, device=str(dev), dtype=torch.float32)
    jd = load_judges(weights, device=str(dev))
    t0 = time.time()
    results, gen = evaluate(pipe, jd, cfg, dev)
    walls["evaluate"] = time.time() - t0
    R.save_grid(
        (gen[:64].clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8),
        os.path.join(out, "samples.png"),
    )
    info = {
        "name": "conceptgate toy world",
        "config": cfg, "arch": ARCH, "seed": cfg["seed"],
        "device": str(dev) if dev.type == "cpu" else f"{dev} ({torch.cuda.get_device_name(dev)})",
        "bf16_autocast": amp,
        "threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                     **_lib_versions()},
        "train_wall_seconds": train_wall, "deadline_min": args.deadline_min, "stage_stats": stats, "walls": walls,
        # a warm start records the run it continued, so the weights' whole history stays in the manifest
        "continued_from": init["manifest"] if init is not None else None,
        "vae_reconstruction_mse": vae_mse, "vae_scaling_factor": sf,
        "evaluation": results,
        "heldout_pairs": [[R.OBJECTS[o], R.STYLES[s]] for o, s in C.HELDOUT_PAIRS],
        "comfy_unet_config": __import__("conceptgate.toyworld.models", fromlist=["x"]).comfy_unet_config(),
        "attribution": "tokenizer/vocab.json and merges.txt: OpenAI CLIP BPE vocabulary (MIT); see toyworld/data/ATTRIBUTION.md",
    }
    write_manifest(weights, info)
    log(f"total wall {time.time() - t_start:.1f}s; manifest written")
    print(json.dumps({"judges_on_renders": results["judge_accuracy_heldout_renders"],
                      "judge_none_on_garbage": results["judge_none_rate_on_garbage"],
                      "generation": results["generation"]}, indent=2), flush=True)
    return info


def _named(names, trained):
    """(model_1, ..., model_n, stats) from a train_* function -> ({name: model}, stats)."""
    return dict(zip(names, trained[:-1])), trained[-1]


def _stage(ck, resume, name, train, build, dev):
    """Run one training stage, or with ``--resume`` load it from its ``<name>_done`` checkpoint."""
    done = ck.load(name + "_done") if resume else None
    if done is None:
        models, stats = train()
        ck.save(name + "_done", {**{k: m.state_dict() for k, m in models.items()}, "stats": stats})
        return models, stats
    models = build()
    for k, m in models.items():
        m.to(dev).load_state_dict(done[k])
        m.eval()
    log(f"{name}: loaded finished stage")
    return models, done["stats"]


def _load_init(path, dev):
    """Finished stages from an exported weights folder (``--init-from``): every model but the UNet is
    reused as is, the UNet is trained further from its (EMA) weights."""
    from . import load_clip_judge, load_judges, load_pipeline

    pipe = load_pipeline(path, device="cpu", dtype=torch.float32)
    tower, head = load_clip_judge(path, device=str(dev))
    manifest = json.load(open(os.path.join(path, "MANIFEST.json")))
    prev = {k: manifest.get(k) for k in ("config", "device", "train_wall_seconds", "deadline_min", "stage_stats",
                                          "evaluation", "continued_from")}
    return {"te": pipe.text_encoder.to(dev).eval(), "vae": pipe.vae.to(dev).eval(), "unet": pipe.unet,
            "judge": load_judges(path, device=str(dev)), "tower": tower, "head": head,
            "stats": manifest.get("stage_stats", {}), "manifest": prev}


def _lib_versions():
    out = {}
    for m in ("diffusers", "transformers", "safetensors"):
        try:
            out[m] = __import__(m).__version__
        except Exception:  # pragma: no cover
            pass
    return out


def run_info(args) -> None:
    from .models import comfy_unet_config

    path = args.weights or DEFAULT_WEIGHTS
    man = os.path.join(path, "MANIFEST.json")
    print(f"weights: {path}")
    if os.path.exists(man):
        with open(man) as f:
            m = json.load(f)
        keys = ("device", "seed", "train_wall_seconds", "total_bytes", "evaluation")
        print(json.dumps({k: m.get(k) for k in keys}, indent=2))
    else:
        print("no MANIFEST.json (weights not trained yet)")
    print("objects:", R.OBJECTS)
    print("styles:", R.STYLES)
    print("colours:", R.COLOURS)
    print("held-out pairs:", C.HELDOUT_PAIRS)
    print("comfy unet_config:", json.dumps(comfy_unet_config()))
    est = estimate_cpu_seconds(DEFAULT_CONFIG)
    print(f"estimated default training time on 2 CPU cores: {est / 60:.0f} min")


def estimate_cpu_seconds(cfg) -> float:
    s = CPU_STEP_SECONDS
    return (cfg["clip_steps"] * s["clip"] + cfg["vae_steps"] * s["vae"] + cfg["judge_steps"] * s["judge"]
            + cfg["unet_steps"] * s["unet"] + cfg["gen_pool"] * s["vae_encode_per_image"]
            + (cfg["gen_pool"] + cfg["judge_pool"]) / 1000.0 + 300)


def _add_train_args(p):
    p.add_argument("--out", default="toyworld-run", help="run folder (checkpoints, samples; weights in OUT/weights)")
    p.add_argument("--weights", default=None, help="where to export the diffusers folder (default OUT/weights)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="tiny step counts: proves the pipeline runs")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt")
    p.add_argument("--init-from", default=None, metavar="WEIGHTS",
                   help="continue from an exported weights folder: reuse its text encoder, VAE and judges, train the UNet further")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (cuda only)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default 2)")
    p.add_argument("--workers", type=int, default=None, help="render processes (default: 1 on cpu, 16 on cuda)")
    p.add_argument("--deadline-min", type=float, default=None,
                   help="safety net: stop training loops early after this many minutes (recorded in the manifest)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")


def main(argv=None):
    """Standalone entry (``main(['train', ...])``, used by ``gpu_train.sh``); ``python -m conceptgate
    toyworld ...`` is the same through :mod:`conceptgate.cli.toyworld`."""
    from ..cli.toyworld import add_cli

    parser = argparse.ArgumentParser(prog="toyworld")
    sub = parser.add_subparsers(dest="cmd", required=True)
    # standalone: `main(['train', ...])` or `main(['toyworld', 'train', ...])`
    add_cli(sub)
    t = sub.add_parser("train")
    _add_train_args(t)
    t.set_defaults(func=run_train)
    i = sub.add_parser("info")
    i.add_argument("--weights", default=None)
    i.set_defaults(func=run_info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    main()

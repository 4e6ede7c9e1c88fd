"""``bench speed lora``: the trainers' two LoRA backends side by side (issue 15) on the toy model: peft's
LoRA layers on a weight-sharing view of the UNet (the default) against ConceptGate's forward hooks.

Two trainers with the same seed and configuration step in alternation, so iteration ``i`` does the same
work on both (same timestep, same noise, same prompt) and each pair of timings is a paired sample on the
same machine state. Reported: the median per-iteration time of each, the median of the paired ratios
peft/hooks with its interquartile range, and how far the two runs' losses and factors drift apart.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from .report import table, write_section

COMMAND = "python -m conceptgate bench speed lora"


def _trainers(kind: str, pipe, iterations: int):
    from ..adapters.abo.adapter import ABOConfig, ABOTrainer
    from ..adapters.spm import LatentAnchoringTrainer, SPMConfig

    sched = dict(pipe.scheduler.config)
    out = {}
    for backend in ("hooks", "peft"):
        # each its own UNet: the hooks trainer's (idle) hooks must not sit inside the peft trainer's calls
        unet = copy.deepcopy(pipe.unet)
        if kind == "spm":
            cfg = SPMConfig(concept="triangle", iterations=iterations, ddim_steps=10, save_every=0, warmup=0,
                            seed=0, lora_backend=backend)
            tr = LatentAnchoringTrainer(unet, pipe.text_encoder, pipe.tokenizer, sched, cfg)
        else:
            cfg = ABOConfig(concept="star", alternative="circle", context="generic", iterations=iterations,
                            pool_size=4, pool_steps=4, save_every=0, seed=0, lora_backend=backend)
            tr = ABOTrainer(unet, pipe.text_encoder, pipe.tokenizer, sched, cfg)
            tr.build_pool()
        out[backend] = tr
    return out


def bench_lora(iterations: int = 40, write: bool = True, json_path=None, log=print):
    from ..adapters.progress import iterate
    from ..toyworld import load_pipeline

    torch.manual_seed(0)
    pipe = load_pipeline()
    rows, result = [], {"iterations": iterations, "trainers": {}}
    t_all = time.time()
    for kind in ("spm", "abo"):
        trainers = _trainers(kind, pipe, iterations)
        times = {"hooks": [], "peft": []}
        losses = {"hooks": [], "peft": []}
        for i in iterate(range(iterations), desc=f"speed lora ({kind})", unit="it"):
            order = ("hooks", "peft") if i % 2 == 0 else ("peft", "hooks")  # alternate who goes first
            for backend in order:
                t0 = time.perf_counter()
                rec = trainers[backend].step()
                times[backend].append(time.perf_counter() - t0)
                losses[backend].append(rec["loss"])
        for tr in trainers.values():
            tr.trained_module().detach()  # the hooks trainer's hooks off its UNet (a no-op for the peft view)
        ratios = sorted(p / h for p, h in zip(times["peft"], times["hooks"]))
        q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
        dh, dp = (trainers[b].trained_module().module_deltas() for b in ("hooks", "peft"))
        factor_diff = max(max((dh[n].up - dp[n].up).abs().max().item(), (dh[n].down - dp[n].down).abs().max().item())
                          for n in dh)
        factor_size = max(dh[n].up.abs().max().item() for n in dh)
        loss_diff = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(losses["hooks"], losses["peft"]))
        entry = {"hooks_s": statistics.median(times["hooks"]), "peft_s": statistics.median(times["peft"]),
                 "ratio_median": statistics.median(ratios), "ratio_q1": q[0], "ratio_q3": q[2],
                 "max_loss_rel_diff": loss_diff, "max_factor_diff": factor_diff, "max_factor": factor_size,
                 "modules": len(dh)}
        result["trainers"][kind] = entry
        log(f"[speed lora] {kind}: hooks {entry['hooks_s'] * 1000:.0f} ms/it, peft {entry['peft_s'] * 1000:.0f} ms/it, "
            f"ratio {entry['ratio_median']:.3f} (IQR {q[0]:.3f}-{q[2]:.3f}), loss rel diff {loss_diff:.1e}, "
            f"factor diff {factor_diff:.1e} (largest factor {factor_size:.1e})")
        rows.append({"trainer": kind.upper(), "modules": entry["modules"], "hooks": f"{entry['hooks_s'] * 1000:.0f}",
                     "peft": f"{entry['peft_s'] * 1000:.0f}",
                     "ratio": f"{entry['ratio_median']:.3f} ({q[0]:.3f}-{q[2]:.3f})", "loss": f"{loss_diff:.1e}",
                     "factor": f"{factor_diff:.1e} / {factor_size:.1e}"})
    result["seconds"] = time.time() - t_all
    body = "\n".join([
        f"Training step time of the two LoRA backends on the toy model (CPU, float32), {iterations} iterations "
        "each, the two trainers (same seed and configuration) stepping in alternation so that iteration i is the "
        "same work for both. SPM: Latent Anchoring on every transformer Linear/Conv2d, rank 1, DDIM 10 for the "
        "trajectory; All-but-One: the adapter on the cross-attention key/value projections, generic prompts, pool of "
        "4 latents. ratio = peft / hooks per paired iteration (median, interquartile range); below 1 peft is faster. "
        "Drift: the largest relative difference between the two runs' losses, and the largest absolute difference "
        "between their factors after the last step against the largest factor.",
        "",
        table(rows, [("trainer", "trainer"), ("modules", "modules"), ("hooks", "hooks ms/it"), ("peft", "peft ms/it"),
                     ("ratio", "ratio peft/hooks (IQR)"), ("loss", "loss drift"), ("factor", "factor drift / largest")]),
        "",
        f"Total {result['seconds']:.0f} s.",
    ])
    if write:
        write_section("speed-lora", "LoRA backends of the trainers (`bench speed lora`)", body, COMMAND, data=result,
                      json_path=json_path)
    return result, body

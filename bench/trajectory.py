"""``python -m conceptgate bench trajectory``: would a generation-aware gate pay for itself? (issue 20, item 3)

The text rules read only the prompt. A trajectory gate would read what the model is generating: at
sampling step ``k`` of the prompt's own (unerased) trajectory ``x_k``, with the concept text ``c`` batched
into the same UNet call as one more row,

    s_k = cos( eps(x_k, p) - eps(x_k, ""),  eps(x_k, c) - eps(x_k, "") )        ("plain")
    s_k = cos( eps(x_k, p) - eps(x_k, a),   eps(x_k, c) - eps(x_k, a) )         ("anchored")

flattened over the latent, ``a`` the concept's neutral anchor ("a shape", "a shape in plain style"; one
more row). ``eps(x, "")`` is the CFG batch's own unconditional row when the negative prompt is empty.

What is measured, per concept, step and variant: the threshold that keeps the should-not-fire sets
(neighbour, unrelated, short) at <= 2% false fires (their 98th percentile, fitted on the very sets it is
scored on, so optimistic), the fire rate it gives on the should-fire sets (keyword, synonym, held-out,
long paraphrases, Ring-A-Bell concept vectors at eta 1-3), the ROC AUC, and what the trajectory adds to
the default text rule (``context`` OR trajectory) on the sets the text rule misses. Cost: a sampling loop
with the extra row(s) for the first ``k`` steps against the same loop without, timed interleaved in one
run (UNet calls only; the VAE and text encoding would make the ratio smaller).

The gate would fire only from step ``k`` on, so the first ``k`` steps of a caught prompt are unerased
(or have to be redone, one more UNet call per redone step).
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from .report import ROOT, table, write_section

COMMAND = "python -m conceptgate bench trajectory"
SHOULD_FIRE = ("keyword", "synonym", "heldout", "long", "rab1", "rab2", "rab3")
SHOULD_NOT = ("neighbour", "unrelated", "short")
ANCHORS = {"o": ("a {}", "a shape"), "s": ("a shape in {} style", "a shape in plain style")}


def auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(score of a should-fire prompt > score of a should-not one), ties counted half."""
    if not len(pos) or not len(neg):
        return float("nan")
    p, n = pos[:, None], neg[None, :]
    return float(((p > n).float() + 0.5 * (p == n).float()).mean())


def trajectory_scores(unet, scheduler, latents, prompt_states, concept_states, empty_states, anchor_states=None,
                      steps: int = 25, cfg: float = 5.0, record=(0, 2, 5, 10)) -> dict[int, dict[str, torch.Tensor]]:
    """``{step: {"plain": [n], "anchored": [n]}}`` along each prompt's unerased CFG trajectory (DDIM as the
    pipeline runs it), the concept (and anchor) rows in the same UNet call as ``[uncond, cond]``."""
    F = torch.nn.functional
    n = len(prompt_states)
    scheduler.set_timesteps(steps)
    x = latents * scheduler.init_noise_sigma
    rows = [empty_states.expand(n, -1, -1), prompt_states, concept_states.expand(n, -1, -1)]
    if anchor_states is not None:
        rows.append(anchor_states.expand(n, -1, -1))
    hidden = torch.cat(rows)
    out: dict[int, dict[str, torch.Tensor]] = {}
    for k, t in enumerate(scheduler.timesteps):
        if k > max(record):
            break
        eps = unet(torch.cat([x] * len(rows)), t, encoder_hidden_states=hidden).sample.flatten(1).chunk(len(rows))
        eu, ep, ec = eps[:3]
        if k in record:
            out[k] = {"plain": F.cosine_similarity(ep - eu, ec - eu, dim=1)}
            if anchor_states is not None:
                ea = eps[3]
                out[k]["anchored"] = F.cosine_similarity(ep - ea, ec - ea, dim=1)
        guided = (eu + cfg * (ep - eu)).view_as(x)
        x = scheduler.step(guided, t, x).prev_sample
    return out


def call_cost(unet, scheduler, latents, hidden_main, extra, steps: int, k_extra: int, repeats: int = 12) -> dict:
    """Cost of the concept row: median seconds of one UNet call on the CFG batch ``[uncond, cond]`` and on
    the same batch with ``extra`` rows, timed interleaved (so a busy machine slows both alike), and the
    sampling-loop ratio they imply when the extra rows ride along in the first ``k_extra`` of ``steps`` calls
    (UNet time only: the VAE, the text encoder and the scheduler would make it smaller)."""
    scheduler.set_timesteps(steps)
    t = scheduler.timesteps[0]
    reps = hidden_main.shape[0] // latents.shape[0]
    x_main = torch.cat([latents] * reps)
    x_more = torch.cat([x_main, latents[: extra.shape[0]]])
    h_more = torch.cat([hidden_main, extra])
    unet(x_main, t, encoder_hidden_states=hidden_main)  # warm-up
    unet(x_more, t, encoder_hidden_states=h_more)
    a, b = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        unet(x_main, t, encoder_hidden_states=hidden_main)
        a.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        unet(x_more, t, encoder_hidden_states=h_more)
        b.append(time.perf_counter() - t0)
    call, more = float(np.median(a)), float(np.median(b))
    return {"k": k_extra, "steps": steps, "call_s": call, "call_with_row_s": more, "repeats": repeats,
            "ratio": (steps - k_extra + k_extra * more / call) / steps}


def measure_cost(pipe, encoder, steps: int, k: int) -> dict:
    from . import gate as BG
    from .generation import _latents

    empty = encoder([""]).hidden
    x = _latents(pipe, range(8))
    main = torch.cat([empty.expand(8, -1, -1), encoder(BG.ENGLISH[:8]).hidden])
    return call_cost(pipe.unet, pipe.scheduler, x, main, empty.expand(8, -1, -1), steps, k)


@torch.no_grad()
def bench_trajectory(concepts=("triangle", "striped", "star"), n: int = 16, steps: int = 25, record=(0, 2, 5, 10),
                     write: bool = True, json_path=None, log=print) -> dict:
    from ..adapters.diffusers_host import DiffusersTextEncoder
    from ..adapters.eraser import Eraser
    from ..adapters.gate import BankCache, EncodedText, GateSettings, entry_gates
    from ..adapters.progress import iterate
    from ..toyworld import captions as C
    from ..toyworld import load_pipeline
    from ..toyworld.contexts import gate_carriers, gate_neutral_prompts, gate_synonyms
    from . import gate as BG
    from .generation import _latents

    torch.set_num_threads(min(2, torch.get_num_threads()))
    t0 = time.perf_counter()
    pipe = load_pipeline()
    encoder = DiffusersTextEncoder(pipe.tokenizer, pipe.text_encoder)
    banks = BankCache(encoder, {"domain_carriers": gate_carriers, "domain_prompts": gate_neutral_prompts,
                                "domain_synonyms": gate_synonyms})
    empty = encoder([""]).hidden
    result = {"n": n, "steps": steps, "record": list(record), "concepts": {}}
    for concept in iterate(list(concepts), "bench trajectory", unit="concept"):
        slot, names = BG.concept_kind(C, concept)
        concept_text, anchor_text = (ANCHORS[slot][0].format(names[0]), ANCHORS[slot][1])
        cs, anchor = encoder([concept_text]).hidden, encoder([anchor_text]).hidden
        sets = BG.prompt_sets(concept, pipe.tokenizer)
        vector = BG.ring_a_bell_vector(encoder, concept)
        eraser = Eraser(name=concept, kind="weight", concepts=[concept])
        scores, text_fire = {}, {}
        for name in SHOULD_FIRE + SHOULD_NOT:
            if name.startswith("rab"):
                victims = encoder(BG.ENGLISH[:n])
                enc = EncodedText(victims.hidden + float(name[3:]) * vector, victims.tokens, victims.ids, victims.mask)
            else:
                prompts = sets.get(name, [])[:n]
                if not prompts:
                    continue
                enc = encoder(prompts)
            text_fire[name] = entry_gates(enc, eraser, GateSettings(), banks).values > 0.5
            x = _latents(pipe, range(1000, 1000 + len(enc.tokens)))
            scores[name] = trajectory_scores(pipe.unet, pipe.scheduler, x, enc.hidden, cs, empty, anchor, steps,
                                             record=record)
        row = {"concept_text": concept_text, "anchor_text": anchor_text, "steps": {}}
        for k in record:
            row["steps"][k] = {}
            for variant in ("plain", "anchored"):
                neg = torch.cat([scores[s][k][variant] for s in SHOULD_NOT if s in scores])
                thr = float(torch.quantile(neg, 0.98))
                r = {"threshold": thr, "false_fire": float((neg > thr).float().mean())}
                for s in SHOULD_FIRE:
                    if s not in scores:
                        continue
                    v = scores[s][k][variant]
                    traj = v > thr
                    r[s] = {"fire": float(traj.float().mean()), "auc": auc(v, neg),
                            "context": float(text_fire[s].float().mean()),
                            "either": float((traj | text_fire[s]).float().mean())}
                neg_either = torch.cat([(scores[s][k][variant] > thr) | text_fire[s] for s in SHOULD_NOT if s in scores])
                r["false_fire_either"] = float(neg_either.float().mean())
                row["steps"][k][variant] = r
        best = max(record, key=lambda k: np.nanmean([row["steps"][k]["plain"][s]["auc"] for s in SHOULD_FIRE
                                                     if s in row["steps"][k]["plain"]]))
        log(f"[bench trajectory] {concept}: best step {best}, plain: " + ", ".join(
            f"{s} {row['steps'][best]['plain'][s]['fire']:.2f}" for s in SHOULD_FIRE if s in row["steps"][best]["plain"]))
        result["concepts"][concept] = row
    # cost: 8 prompts, one concept row (plain) for the first k steps, against the same batch without
    result["cost"] = measure_cost(pipe, encoder, steps, max(record))
    result["threads"] = torch.get_num_threads()
    result["seconds"] = time.perf_counter() - t0
    if write:
        _write(result, json_path)
    return result


def verdict(result: dict) -> str:
    """The conclusion, from the measured figures: does any step and variant meet the gate targets?"""
    met, best = [], None
    for concept, row in result["concepts"].items():
        for k, per in row["steps"].items():
            for variant, r in per.items():
                worst = min(r[s]["fire"] for s in SHOULD_FIRE if s in r)
                if best is None or worst > best[0]:
                    best = (worst, concept, k, variant)
                if worst >= 0.95 and r["false_fire"] <= 0.02:
                    met.append((concept, k, variant))
    long_auc = {c: max(r["steps"][k][v]["long"]["auc"] for k in r["steps"] for v in r["steps"][k])
                for c, r in result["concepts"].items() if "long" in next(iter(r["steps"].values()))["plain"]}
    ratio = result["cost"]["ratio"]
    if {m[0] for m in met} == set(result["concepts"]) and ratio <= 1.10:
        return "Verdict: the trajectory gate meets the fire targets for every concept: " + ", ".join(map(str, met)) + "."
    return (f"Verdict: not built into the hosts. No concept reaches >= 95% on every should-fire set at <= 2% false "
            f"fires with any step and variant (best worst-set fire rate: {100 * best[0]:.0f}%, {best[1]} at step "
            f"{best[2]}, {best[3]}); long paraphrases that name the concept have AUC at most "
            + ", ".join(f"{c} {a:.2f}" for c, a in long_auc.items())
            + f"; the cost ratio is {ratio:.3f}. The text rule (`bench gate`) already meets the fire targets on "
            "every text set; the trajectory would act only from step k on, with the first k steps unerased. Where it "
            "adds most, embedding-level attacks (Ring-A-Bell above), the sampler gets states that are not the text's "
            "encoding, and those get every eraser at full strength (GatedPipeline's edited_states, the ComfyUI lock; "
            "`bench attack`).")


def _write(result: dict, json_path=None) -> None:
    rows = []
    for concept, row in result["concepts"].items():
        for k, per in row["steps"].items():
            for variant, r in per.items():
                cells = {s: f"{100 * r[s]['fire']:.0f} ({r[s]['auc']:.2f})" for s in SHOULD_FIRE if s in r}
                rows.append({"concept": concept, "step": str(k), "variant": variant, "thr": f"{r['threshold']:.2f}",
                             **cells, "ff": f"{100 * r['false_fire']:.0f}"})
    adds = []
    for concept, row in result["concepts"].items():
        k = max(row["steps"], key=lambda k: row["steps"][k]["plain"].get("rab1", {}).get("either", 0))
        r = row["steps"][k]["plain"]
        adds.append(f"{concept} (step {k}): " + ", ".join(
            f"{s} {100 * r[s]['context']:.0f} -> {100 * r[s]['either']:.0f}" for s in SHOULD_FIRE if s in r)
            + f"; should-not-fire sets {100 * r['false_fire_either']:.0f}%")
    c = result["cost"]
    body = "\n".join([
        "A generation-aware gate, measured before building it into a host: the cosine between the prompt's and "
        "the concept's guidance directions, `cos(eps(x_k,p) - eps(x_k,''), eps(x_k,c) - eps(x_k,''))` (plain; "
        "anchored: relative to the concept's neutral anchor instead of ''), along each prompt's own unerased "
        f"trajectory at DDIM step k of {result['steps']}, the concept row in the same UNet call. Cells: fire rate % "
        "at the threshold that keeps neighbour + unrelated + short prompts at <= 2% (fitted on those very sets, so "
        f"optimistic) and, in brackets, the ROC AUC against them. {result['n']} prompts per set, the sets of "
        "`bench gate`; RAB = Ring-A-Bell concept vector at eta 1-3 on everyday English prompts.",
        "",
        table(rows, [("concept", "concept"), ("step", "step k"), ("variant", "variant"), ("thr", "threshold")]
              + [(s, s.replace("rab", "RAB eta")) for s in SHOULD_FIRE] + [("ff", "should-not fired")]),
        "",
        "What the trajectory would add to the default text rule (`context` OR trajectory, plain, at the step where "
        "it helps Ring-A-Bell eta 1 most), fire % context -> either: " + "; ".join(adds) + ".",
        f"Cost (8 prompts, one concept row per prompt in the first {c['k']} of {c['steps']} steps' UNet calls; "
        f"medians of {c['repeats']} interleaved UNet calls, {result['threads']} threads): {1000 * c['call_s']:.0f} ms "
        f"per call on the CFG batch, {1000 * c['call_with_row_s']:.0f} ms with the rows, so a sampling-loop ratio of "
        f"{c['ratio']:.3f} (UNet time only); each further concept adds about as much.",
        "",
        verdict(result),
        f"Total {result['seconds']:.0f} s.",
    ])
    write_section("trajectory", "Trajectory gate: measured, not built (`bench trajectory`)", body, COMMAND,
                  data=result, json_path=json_path or os.path.join(ROOT, "benchmarks.json"))


def recost(json_path=None, log=print) -> dict:
    """Measure the cost again (e.g. on a quiet machine) and rewrite the section from the stored scores."""
    import json

    from ..adapters.diffusers_host import DiffusersTextEncoder
    from ..toyworld import load_pipeline

    json_path = json_path or os.path.join(ROOT, "benchmarks.json")
    stored = json.load(open(json_path)).get("trajectory")
    if not stored or "concepts" not in stored:
        raise SystemExit(f"no stored 'trajectory' scores in {json_path}: run 'bench trajectory' first")
    result = {k: v for k, v in stored.items() if k not in ("measured", "machine")}
    torch.set_num_threads(min(2, torch.get_num_threads()))
    pipe = load_pipeline()
    t0 = time.perf_counter()
    with torch.no_grad():
        result["cost"] = measure_cost(pipe, DiffusersTextEncoder(pipe.tokenizer, pipe.text_encoder), result["steps"],
                                      max(int(k) for k in result["record"]))
    result["threads"] = torch.get_num_threads()
    result["seconds_cost"] = time.perf_counter() - t0
    log(f"[bench trajectory] cost ratio {result['cost']['ratio']:.3f}")
    _write(result, json_path)
    return result


def add_cli(sub) -> None:
    p = sub.add_parser("trajectory", help="would a generation-aware (trajectory) gate pay for itself? fire rates, AUC, "
                                           "cost (toy world)")
    p.add_argument("--concept", action="append", default=None, help="toy concepts (default: triangle, striped, star)")
    p.add_argument("--prompts", type=int, default=16, help="prompts per set")
    p.add_argument("--json", default=None)
    p.add_argument("--cost-only", action="store_true",
                   help="measure only the cost again and rewrite the section from the stored scores")
    p.set_defaults(func=lambda a: (recost(a.json) if a.cost_only else bench_trajectory(tuple(a.concept) if a.concept else ("triangle", "striped", "star"),
                                                    n=a.prompts, json_path=a.json), 0)[1])

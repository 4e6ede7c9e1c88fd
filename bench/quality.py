"""Quality benchmark on the toy world (issue 3): what an eraser stack erases and what it keeps.

``python -m conceptgate bench quality [--full] [--stack MANIFEST ...] [--peers [KINDS]] [--json PATH]`` evaluates
the base model, UCE / RECE erasers computed on the fly (one object, one style) and any stack manifests,
and writes the ``quality`` section of ``BENCHMARKS.md`` (plus JSON). ``--peers`` adds what users would pick
instead (negative prompt, Safe Latent Diffusion presets, ESD-x; :mod:`.peers`) on the same prompts, seeds and
judges, the shipped erasers for the same targets, and a verdict per target.

Metrics (UnlearnCanvas' definitions, adapted to the toy world; the learned judges decide):

* for a target concept ``X`` of kind ``K`` (object or style; colour and the implicit ``watermark``
  are supported too), over generations of prompts of one *prompt set*:

  - **UA** (unlearning accuracy): among images whose prompt names ``X``, the share the ``K`` judge
    assigns to a *real* class other than ``X``. "none" (garbage) is **not** a success;
  - **garbage rate**: among those images, the share the ``K`` judge calls "none";
  - **IRA** (in-domain retain): among images whose prompt names another concept of kind ``K``,
    the share judged as the named concept;
  - **CRA** (cross-domain retain): among images whose prompt does not name ``X``, the accuracy of the
    *other* kinds (e.g. style and colour for an object target), averaged over those kinds;
  - **mean** = (UA + IRA + CRA) / 3 (the "AA" of later papers);
  - **retain on target prompts**: the other kinds' accuracy on the images whose prompt names ``X``
    (erasing "triangle" from "a red triangle in striped style" should keep red and striped);
  - **replacement accuracy**: when the eraser names an alternative of the same kind
    (``settings["alternative"]``, else UCE/RECE's ``settings["guide"]``, resolved through the toy
    vocabulary; the anchor "plain" is the flat style), the share of target images judged as it.

* prompt sets: ``keyword`` (training template, keyword names), ``synonym`` (same template, the
  synonyms seen in training), ``heldout`` (the three paraphrase templates never seen in training);
* per set: judged object/style/colour accuracy, garbage rate, **watermark rate** (no prompt
  mentions it), **Fréchet distance** in judge features vs renders of the same labels (and the
  render-vs-render floor at the same n: the distance is biased upward at small n);
* **gates**: for each eraser, its gate on text-only prompt sets -- target (keyword), synonym,
  neighbour (same kind, other concept) and unrelated (naming nothing of that kind) -- as the mean
  gate and the fire rate ``gate > GATE_THRESHOLD`` (0.5);
* every rate has a 95% percentile bootstrap interval, resampling prompts (all seeds of a prompt
  move together; target and non-target prompts are resampled separately).

Fixed seeds (the same seeds for every prompt and every stack, so stacks are compared on identical
starting noise). Generation goes through :class:`~conceptgate.adapters.diffusers_host.GatedPipeline`
for weight erasers; conditioning and guidance erasers through the handlers their mechanisms register in
:mod:`conceptgate.adapters.registry` (:func:`register_conditioning` / :func:`register_guidance`), or a
whole ``generate_fn``, see :func:`evaluate_stack`. The pieces: :mod:`.prompts` (prompt sets),
:mod:`.generation` (sampling with a stack), :mod:`.metrics`; this module evaluates and reports.
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable

import numpy as np
import torch

# The bench is split by concern; this module runs the evaluation and writes the report, and is the
# namespace the other benches, the demo and the tests use.
from .generation import _latents, _raw_gates, generate_with_stack  # noqa: F401
from .metrics import (GATE_THRESHOLD, _per_prompt, cluster_bootstrap, fire_rates, frechet,  # noqa: F401
                      set_metrics, target_metrics)
from .prompts import (KINDS, Target, add_target, build_prompt_sets, eraser_alternative, eraser_targets,  # noqa: F401
                      gate_prompt_sets, kind_names, resolve_concept)
from ..adapters.errors import UnsupportedEraser  # noqa: F401,E402
from ..adapters.registry import (CONDITIONING_HANDLERS, GUIDANCE_HANDLERS, register_conditioning,  # noqa: F401,E402
                                 register_guidance)

COMMAND = "python -m conceptgate bench quality"

#: Tier settings. ``keyword`` / ``synonym`` / ``heldout``: number of base prompts per set (a balanced
#: spread over object x style pairs); ``per_target``: extra prompts naming each target, per set.
TIERS = {
    "quick": dict(keyword=8, synonym=4, heldout=4, per_target=3, seeds=4, steps=25, cfg=5.0,
                  gate_prompts=24, judge_renders=1000, agreement_renders=300, boot=1000, batch=48),
    # the quick tier's sets with every target named by 4 prompts per set and 8 seeds: >= 32 target images per set,
    # so that 95% and 88% are told apart (issue 17); about 3x the quick tier's images
    "release": dict(keyword=8, synonym=4, heldout=4, per_target=4, seeds=8, steps=25, cfg=5.0,
                    gate_prompts=48, judge_renders=1000, agreement_renders=300, boot=2000, batch=64),
    "full": dict(keyword=96, synonym=48, heldout=48, per_target=12, seeds=4, steps=25, cfg=5.0,
                 gate_prompts=96, judge_renders=2000, agreement_renders=1000, boot=2000, batch=64),
}
SECTIONS = {"quick": "quality", "release": "quality-release", "full": "quality-full"}  # BENCHMARKS.md keys
SEED_BASE = 1000  # prompt p, seed k -> SEED_BASE + k (identical seeds for every prompt and stack)
BARS = {"object": 0.90, "style": 0.90, "colour": 0.90, "watermark_rate": 0.15}


# ---------------------------------------------------------------------------------- evaluations


def evaluate_judges(judges, n_renders: int = 1000, n_agreement: int = 300, generated=None, checker=None) -> dict:
    """The judges' own accuracy on held-out renders (seed 987654, watermark on half), their "none"
    rate on garbage made from renders, and the hand-crafted checks' agreement (renders, and
    ``generated`` images when given)."""
    from ..toyworld import judges as J
    from ..toyworld import render as R

    imgs, lab = R.render_batch(n_renders, 987654, watermark_rate=0.5)
    pred = J.classify(judges, imgs)
    out = {"n_renders": n_renders, "accuracy_heldout_renders": J.accuracy_on_labels(pred, lab)}
    g = J.make_garbage(R.to_tensor(imgs[: min(400, n_renders)]), torch.Generator().manual_seed(1))
    pg = J.classify(judges, g)
    out["none_rate_on_garbage"] = {k: float((pg[k] == J.NONE[k]).mean()) for k in J.NONE}
    checker = checker or J.HandcraftedChecker()
    out["agreement_renders"] = J.agreement(judges, imgs[:n_agreement], checker)
    if generated is not None and len(generated):
        out["agreement_generated"] = J.agreement(judges, generated, checker)
    return out


def _set_renders(labels: np.ndarray, seed: int) -> np.ndarray:
    from ..toyworld import render as R

    lab = R.sample_labels(len(labels), seed, objects=labels[:, 0], styles=labels[:, 1], colours=labels[:, 2])
    return R.render_labels(lab)


def evaluate_stack(pipe, judges, stack=None, targets=None, tier: str | dict = "quick", *, prompt_sets=None,
                   generate_fn: Callable | None = None, gate_threshold: float = GATE_THRESHOLD,
                   alternatives: dict | None = None, seed: int = 0, log: Callable[[str], None] | None = None) -> dict:
    """Evaluate ``stack`` (an :class:`~conceptgate.adapters.stack.EraserStack`, or None for the base
    model) on the toy world and return a JSON-able dict of the metrics described in this module.

    ``targets``: concepts to score (strings such as ``"triangle"``, ``"zebra-lined"``, ``"watermark"``,
    or :class:`Target`); default: every concept of the stack's erasers (none for the base model:
    then only per-set accuracy / watermark / Fréchet). Pass the same targets for the base model to
    get its baseline UA/IRA/CRA. ``tier``: ``"quick"`` / ``"full"`` or a dict overriding
    :data:`TIERS` keys (``keyword``, ``synonym``, ``heldout``, ``per_target``, ``seeds``, ``steps``,
    ``cfg``, ``gate_prompts``, ``boot``, ``batch``). ``prompt_sets``: ``{name: [(prompt, (o,s,c))]}``
    to replace the built sets.

    Eraser kinds: weight erasers run through ``GatedPipeline``; conditioning / guidance erasers
    need :func:`register_conditioning` / :func:`register_guidance`, or pass
    ``generate_fn(prompts, seeds) -> images`` (or ``(images, gates[n, E])``) to replace generation
    entirely (e.g. a mechanism with its own sampler). ``alternatives``: ``{target concept: name}``
    overrides the replacement class read from eraser settings."""
    from ..toyworld.judges import classify, judge_features

    say = log or (lambda s: None)
    cfg = dict(TIERS[tier]) if isinstance(tier, str) else {**TIERS["quick"], **tier}
    t_start = time.time()
    # ---- targets and which eraser claims them
    resolved: list[Target] = []
    owners: dict = {}
    if targets is None and stack is not None:
        for e in stack.entries:
            for t in eraser_targets(e.eraser):
                if t not in resolved:
                    resolved.append(t)
    for t in targets or ():
        t = t if isinstance(t, Target) else resolve_concept(t)
        if t is not None and t not in resolved:
            resolved.append(t)
    alt_of: dict = {}
    if stack is not None:
        for e in stack.entries:
            for t in eraser_targets(e.eraser):
                key = (t.kind, t.index)
                owners.setdefault(key, []).append(e.eraser.name)
                a = eraser_alternative(e.eraser, t)
                if a is not None:
                    alt_of.setdefault(key, a)
    for concept, name in (alternatives or {}).items():
        t, a = resolve_concept(concept), resolve_concept(name)
        if t is not None and a is not None and a.kind == t.kind:
            alt_of[(t.kind, t.index)] = a.index
    sets = prompt_sets or build_prompt_sets(cfg, resolved, seed)
    n_seeds = int(cfg["seeds"])
    seed_base = int(cfg.get("seed_base", SEED_BASE))  # another block (bench quality --seed-base): validation seeds
    seeds = [seed_base + k for k in range(n_seeds)]
    out = {
        "tier": tier if isinstance(tier, str) else "custom",
        "settings": {"sampler": f"DDIM {cfg['steps']} steps, CFG {cfg['cfg']}", "seeds": seeds,
                     "gate_threshold": gate_threshold, "bootstrap": f"{cfg['boot']} prompt-cluster resamples, 95% percentile",
                     "prompts_per_set": {k: len(v) for k, v in sets.items()}},
        "stack": None if stack is None else [
            {"name": e.eraser.name, "kind": e.eraser.kind, "method": e.eraser.method, "concepts": list(e.eraser.concepts),
             "enabled": e.enabled, "strength": e.strength, "gate": e.gate.to_dict()} for e in stack.entries],
        "sets": {}, "targets": [], "gates": {},
    }
    # ---- generation, judged per set
    per_set = {}
    for si, (name, items) in enumerate(sets.items()):
        prompts = [p for p, _ in items for _ in seeds]
        labels = np.array([lab for _, lab in items for _ in seeds], np.int64).reshape(-1, 3)
        pids = np.repeat(np.arange(len(items)), n_seeds)
        img_seeds = [s for _ in items for s in seeds]
        t0 = time.time()
        say(f"{name}: {len(items)} prompts x {n_seeds} seeds")
        if generate_fn is not None:
            res = generate_fn(prompts, img_seeds)
            imgs, gates = res if isinstance(res, tuple) else (res, None)
        else:
            imgs, gates = generate_with_stack(pipe, prompts, img_seeds, stack, steps=int(cfg["steps"]),
                                              cfg=float(cfg["cfg"]), batch=int(cfg["batch"]), log=say)
        dt = time.time() - t0
        pred = classify(judges, imgs)
        m = set_metrics(pred, labels, pids, int(cfg["boot"]), seed)
        fa = judge_features(judges, imgs)
        fr = judge_features(judges, _set_renders(labels, 4242 + si))
        fr2 = judge_features(judges, _set_renders(labels, 5353 + si))
        m["frechet"] = frechet(fa, fr)
        m["frechet_floor_renders"] = frechet(fr2, fr)
        m["seconds"] = dt
        if gates is not None and stack is not None:
            m["mean_gate_per_eraser"] = {e.eraser.name: float(gates[:, j].mean()) for j, e in enumerate(stack.entries)}
        out["sets"][name] = m
        per_set[name] = (pred, labels, pids, imgs)
    # ---- per-target erasure metrics
    for t in resolved:
        key = (t.kind, t.index)
        row = {"concept": t.concept, "keyword": t.keyword, "kind": t.kind, "index": t.index,
               "erasers": owners.get(key, []), "sets": {}}
        alt = alt_of.get(key)
        for name, (pred, labels, pids, _) in per_set.items():
            row["sets"][name] = target_metrics(pred, labels, pids, t, alt, int(cfg["boot"]), seed)
        out["targets"].append(row)
    # ---- gate profiles (text only)
    if stack is not None and len(stack.entries):
        from ..adapters.diffusers_host import DiffusersTextEncoder
        from ..adapters.gate import BankCache

        enc = DiffusersTextEncoder(pipe.tokenizer, pipe.text_encoder)
        banks = BankCache(enc)
        for j, e in enumerate(stack.entries):
            from ..adapters.stack import EraserStack

            one = EraserStack((e,))
            prof = {}
            for t in eraser_targets(e.eraser) or [None]:
                if t is None:
                    continue
                cats = gate_prompt_sets(t, int(cfg["gate_prompts"]), seed)
                for cat, ps in cats.items():
                    g = _raw_gates(one, enc, ps, banks)[:, 0] if ps else torch.zeros(0)
                    prof.setdefault(cat, []).extend(g.tolist())
            out["gates"][e.eraser.name] = {
                "threshold": gate_threshold, "rule": e.gate.rule,
                **{cat: fire_rates(v, gate_threshold) for cat, v in prof.items()}}
    out["seconds"] = time.time() - t_start
    out["_images"] = {name: v[3] for name, v in per_set.items()}  # dropped before JSON
    return out


def base_bars(base: dict) -> dict:
    """The issue's base-model bars, measured on the keyword set (prompts naming object, style and
    colour, never the watermark): ``{kind or "watermark_rate": {value, lo, hi, n, bar, met}}``."""
    kw = base["sets"].get("keyword")
    if kw is None:
        return {}
    res = {}
    for k in KINDS + ("watermark_rate",):
        v = kw[k]
        res[k] = {**v, "bar": BARS[k], "met": v["value"] >= BARS[k]}
    return res


# ---------------------------------------------------------------------------------- UCE / RECE

#: The on-the-fly erasers of the benchmark and the demo: an object with UCE, a style with RECE,
#: each guided to the toy world's neutral anchor and preserving the other names of its kind.
DEFAULT_EDITS = (
    dict(method="uce", concept="triangle", guide="shape", concept_type="object"),
    dict(method="rece", concept="striped", guide="plain", concept_type="style"),
)
# the same edits in ConceptGate's in-context form (EditSpec synonyms / context; not in the papers): the toy
# world's synonyms erased with the keyword, erase and preserve words also inside the toy captions
IN_CONTEXT_EDITS = (
    dict(method="uce", concept="triangle", guide="shape", concept_type="object", synonyms="toy", context="toy",
         name="uce-triangle (in context)"),
    dict(method="rece", concept="striped", guide="plain", concept_type="style", synonyms="toy", context="toy",
         name="rece-striped (in context)"),
)


def make_edit_erasers(pipe, edits=DEFAULT_EDITS, out_dir: str | None = None, log=None) -> list:
    """UCE / RECE edits on ``pipe``'s current weights, as gated ConceptGate erasers (and files in
    ``out_dir`` when given). Preserve set: the other keywords of the same kind."""
    from ..adapters.rece import DiffusersEditHost, compute_edit, save_edit

    from ..adapters.diffusers_host import DiffusersTextEncoder
    from ..adapters.gate.calibrate import Calibrator
    from ..toyworld.contexts import gate_carriers, gate_neutral_prompts, gate_synonyms

    host = DiffusersEditHost.from_pipeline(pipe)
    # as `edit --model toy` does: the new eraser's context gate is calibrated at the end, with the toy vocabulary
    calibrator = Calibrator(DiffusersTextEncoder(pipe.tokenizer, pipe.text_encoder), domain_carriers=gate_carriers,
                            domain_prompts=gate_neutral_prompts, domain_synonyms=gate_synonyms)
    erasers = []
    for ed in edits:
        t = resolve_concept(ed["concept"])
        preserve = tuple(v[0] for i, v in kind_names(t.kind).items() if i != t.index) if t and t.kind in KINDS else ()
        t0 = time.time()
        # synonyms / context: ConceptGate's in-context edit (EditSpec), e.g. synonyms="toy" for the toy names
        synonyms = tuple(kind_names(t.kind)[t.index][1:]) if ed.get("synonyms") == "toy" and t else ed.get("synonyms", ())
        o = compute_edit(host, method=ed["method"], concepts=(ed["concept"],), guide=ed.get("guide"),
                         preserve=preserve, concept_type=ed.get("concept_type", "object"), cache=None,
                         synonyms=tuple(synonyms), context=ed.get("context", ""),
                         name=ed.get("name") or f"{ed['method']}-{ed['concept']}")
        o.eraser.gate = calibrator.calibrate(o.eraser.concepts)
        if out_dir:
            save_edit(o, os.path.join(out_dir, f"{o.eraser.name}.safetensors"))
        if log:
            log(f"{o.eraser.name}: {ed['method'].upper()} {ed['concept']!r} -> {ed.get('guide')!r}, rank {o.report['rank']}, "
                f"{time.time() - t0:.2f} s")
        erasers.append(o.eraser)
    return erasers


SHIPPED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "toyworld", "erasers")


def shipped_configs(pipe, targets, folder: str = SHIPPED_DIR, log=None, only=None) -> list:
    """``[(file stem, one-entry stack)]`` for every shipped eraser file in ``folder`` whose concepts are all
    among ``targets`` and that fits ``pipe``'s UNet (each with its default gate, as a user loads it).
    ``only``: file stems to take (a file added since a part's last run is measured without re-running the
    others: same prompts and seeds give the others' images again)."""
    import glob

    from ..adapters.diffusers_host import check_stack_fits
    from ..adapters.files import load_eraser
    from ..adapters.stack import EraserStack

    paths = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if only is not None:
        stems = {os.path.splitext(os.path.basename(p))[0]: p for p in paths}
        unknown = [n for n in only if n not in stems]
        if unknown:
            raise SystemExit(f"bench quality --shipped: no shipped eraser {', '.join(map(repr, unknown))} in {folder} "
                             f"(there are: {', '.join(sorted(stems))})")
        paths = [stems[n] for n in only]
    out = []
    for path in paths:
        try:
            e = load_eraser(path)
            ts = eraser_targets(e)
            if not ts or any((t.kind, t.index) not in {(x.kind, x.index) for x in targets} for t in ts):
                if only is not None:  # asked for by name: say why it is not measured
                    raise ValueError(f"it erases {', '.join(e.concepts)}, not among the run's targets")
                continue
            st = check_stack_fits(EraserStack().with_eraser(e), pipe.unet)
        except Exception as err:  # a shipped file that does not load or fit is reported, not fatal
            if only is not None:
                raise SystemExit(f"bench quality --shipped: {os.path.basename(path)}: {err}") from err
            if log:
                log(f"skipping {os.path.basename(path)}: {err}")
            continue
        out.append((os.path.splitext(os.path.basename(path))[0], st))
    return out


# ------------------------------------------------------------------------------------ the report


def _f(s, pct=True):
    if s is None:
        return "–"
    v = s["value"] if isinstance(s, dict) else s
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if not pct:
        return f"{v:.1f}"
    if isinstance(s, dict) and "lo" in s and not math.isnan(s["lo"]):
        return f"{100 * v:.0f} [{100 * s['lo']:.0f}, {100 * s['hi']:.0f}]"
    return f"{100 * v:.0f}"


def render_markdown(result: dict) -> str:
    from .report import table

    lines = []
    j = result.get("judges")
    cfg = result["tier_settings"]
    base = result["configs"][0]["result"]
    lines.append(f"Tier **{result['tier']}**: DDIM {cfg['steps']} steps, CFG {cfg['cfg']} (the toy model's default "
                 f"sampler), seeds {cfg.get('seed_base', SEED_BASE)}..{cfg.get('seed_base', SEED_BASE) + cfg['seeds'] - 1}"
                 f" for every prompt, 64x64; "
                 f"prompts per set {base['settings']['prompts_per_set']}; 95% intervals: {base['settings']['bootstrap']}. "
                 f"Total {result['seconds']:.0f} s. Percentages; intervals in brackets.")
    if j:
        a = j["accuracy_heldout_renders"]
        lines.append("")
        lines.append(f"**Judges** on {j['n_renders']} held-out renders: object {100 * a['object']:.1f}%, style "
                     f"{100 * a['style']:.1f}%, colour {100 * a['colour']:.1f}%, watermark {100 * a['watermark']:.1f}%; "
                     f"'none' on garbage: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in j["none_rate_on_garbage"].items())
                     + f". Hand-crafted checks vs learned judges: object {100 * j['agreement_renders']['object_agreement']:.1f}%, "
                     f"watermark {100 * j['agreement_renders']['watermark_agreement']:.1f}% on "
                     f"{j['agreement_renders']['n']} renders" +
                     (f"; object {100 * j['agreement_generated']['object_agreement']:.1f}%, watermark "
                      f"{100 * j['agreement_generated']['watermark_agreement']:.1f}% on {j['agreement_generated']['n']} "
                      "base-model generations (keyword set)." if "agreement_generated" in j else "."))
    bars = result.get("bars") or {}
    if bars:
        lines.append("")
        lines.append("**Base-model bars** (issue 3; base model, keyword prompts naming object, style and colour, "
                     "none mentions the watermark):")
        lines.append("")
        rows = []
        for k in ("object", "style", "colour", "watermark_rate"):
            b = bars[k]
            rows.append({"what": k.replace("_", " ") + (" accuracy" if k in KINDS else ""), "bar": f">= {100 * b['bar']:.0f}%",
                         "measured": _f(b), "n": b["n"], "status": "met" if b["met"] else "**missed**"})
        lines.append(table(rows, [("what", "what"), ("bar", "bar"), ("measured", "measured"), ("n", "images"),
                                  ("status", "status")]))
    # per-set generation table
    lines.append("")
    lines.append("**Generation** (judged accuracy of what each prompt names; garbage = object judge says 'none'; "
                 "FD = Fréchet distance in judge features vs renders of the same labels, with the render-vs-render "
                 "floor at the same n):")
    lines.append("")
    rows = []
    for c in result["configs"]:
        for sname, m in c["result"]["sets"].items():
            rows.append({"config": c["name"], "set": sname, "n": m["n_images"], "object": _f(m["object"]),
                         "style": _f(m["style"]), "colour": _f(m["colour"]), "all": _f(m["all_three"]),
                         "garbage": _f(m["garbage_rate"]), "wm": _f(m["watermark_rate"]),
                         "fd": f"{m['frechet']:.1f} ({m['frechet_floor_renders']:.1f})", "s": f"{m['seconds']:.0f}"})
    lines.append(table(rows, [("config", "config"), ("set", "prompts"), ("n", "images"), ("object", "object"),
                              ("style", "style"), ("colour", "colour"), ("all", "all three"), ("garbage", "garbage"),
                              ("wm", "watermark"), ("fd", "FD (floor)"), ("s", "gen s")]))
    # erasure table
    rows = []
    for ci, c in enumerate(result["configs"]):
        for t in c["result"]["targets"]:
            if ci > 0 and not t["erasers"] and t["keyword"] != (c.get("peer") or {}).get("target"):
                continue  # an eraser or peer config is listed on its own targets (all are in the JSON)
            for sname, m in t["sets"].items():
                rows.append({"config": c["name"], "target": f"{t['keyword']} ({t['kind']})", "set": sname,
                             "ua": _f(m["ua"]), "ira": _f(m.get("ira")), "cra": _f(m.get("cra")), "mean": _f(m.get("mean")),
                             "garbage": _f(m["garbage_rate"]), "keep": _f(m.get("retain_on_target")),
                             "repl": _replacement_cell(m),
                             "n": m["n_target_images"]})
    if rows:
        lines.append("**Erasure** (UnlearnCanvas metrics per target and prompt set. UA: target-prompt images judged as "
                     "another *real* class of the target's kind ('none' is not a success; garbage reported apart); "
                     "IRA: same-kind accuracy on prompts naming other concepts; CRA: the other kinds' accuracy on "
                     "prompts not naming the target; mean = (UA+IRA+CRA)/3; keep: the other kinds' accuracy on the "
                     "target prompts; replacement: target images judged as the eraser's named alternative, then (+attrs) "
                     "those also keeping the prompt's other attributes. The base "
                     "model's rows are the no-erasure baseline; each eraser is listed on its own target, its effect "
                     "on the other target is in the JSON):")
        lines.append("")
        lines.append(table(rows, [("config", "config"), ("target", "target"), ("set", "prompts"), ("n", "target imgs"),
                                  ("ua", "UA"), ("ira", "IRA"), ("cra", "CRA"), ("mean", "mean"),
                                  ("garbage", "garbage"), ("keep", "keep"), ("repl", "replacement")]))
    if any("peer" in c for c in result["configs"]):
        from .peers import render_peers

        lines.extend(render_peers(result))
        lines.append("")
    rows = []
    for c in result["configs"]:
        for name, g in c["result"]["gates"].items():
            r = {"config": c["name"], "eraser": name}
            for cat in ("target", "synonym", "neighbour", "unrelated"):
                v = g.get(cat)
                r[cat] = "–" if not v or not v["n"] else f"{100 * v['fire_rate']:.0f}% ({v['mean_gate']:.2f})"
            rows.append(r)
    if rows:
        th = result["configs"][-1]["result"]["settings"]["gate_threshold"]
        lines.append(f"**Gates** (text only; fire rate = share of prompts with gate > {th}, mean gate in brackets; "
                     "target/synonym should fire, neighbour/unrelated should not):")
        lines.append("")
        lines.append(table(rows, [("config", "config"), ("eraser", "eraser"), ("target", "target"),
                                  ("synonym", "synonym"), ("neighbour", "neighbour"), ("unrelated", "unrelated")]))
    if result.get("notes"):
        lines.append("")
        lines.extend(f"- {n}" for n in result["notes"])
    return "\n".join(lines)


def _replacement_cell(m: dict) -> str:
    if "replacement_accuracy" not in m:
        return "–"
    cell = _f(m["replacement_accuracy"]) + f" ({m['alternative']})"
    if "replacement_with_attributes" in m:  # runs before the column existed lack it
        cell += f"; +attrs {_f(m['replacement_with_attributes'])}"
    return cell


def _strip_images(d):
    if isinstance(d, dict):
        return {k: _strip_images(v) for k, v in d.items() if k != "_images"}
    if isinstance(d, list):
        return [_strip_images(v) for v in d]
    return d


def _manifest_note() -> str:
    """What the committed weights' own evaluation says (toyworld/weights/MANIFEST.json), for the bars note."""
    import json

    from ..toyworld import WEIGHTS_DIR

    try:
        with open(os.path.join(WEIGHTS_DIR, "MANIFEST.json")) as f:
            m = json.load(f)
        acc = m["evaluation"]["generation"]["judged_accuracy"]
        steps, run = [], m
        while run:
            steps.append(run.get("stage_stats", {}).get("unet", {}).get("steps_run"))
            run = run.get("continued_from")
    except (OSError, KeyError, ValueError):
        return "toyworld/weights/MANIFEST.json has no evaluation to compare with."
    return (f"The committed weights' own evaluation (toyworld/weights/MANIFEST.json, all 258 captions x 2 seeds, UNet "
            f"steps per training run {' + '.join(str(s) for s in reversed(steps))}): object {100 * acc['object']:.1f}%, "
            f"style {100 * acc['style']:.1f}%, colour {100 * acc['colour']:.1f}%.")


def _notes(result: dict) -> list[str]:
    bars, notes = result.get("bars") or {}, []
    missed = [k for k, v in bars.items() if not v["met"]]
    if missed:
        notes.append("Base-model bars missed: " + ", ".join(
            f"{k.replace('_', ' ')} {100 * bars[k]['value']:.1f}% (95% interval {100 * bars[k]['lo']:.0f}-"
            f"{100 * bars[k]['hi']:.0f}%) < {100 * bars[k]['bar']:.0f}%" for k in missed)
            + ". " + _manifest_note())
    else:
        notes.append("All base-model bars met on this tier's prompts.")
    j = result.get("judges") or {}
    ag = j.get("agreement_generated")
    if ag:
        notes.append(f"The hand-crafted checks (fitted on clean renders) agree with the learned judges on "
                     f"{100 * j['agreement_renders']['object_agreement']:.0f}% / "
                     f"{100 * j['agreement_renders']['watermark_agreement']:.0f}% (object / watermark) of renders but "
                     f"only {100 * ag['object_agreement']:.0f}% / {100 * ag['watermark_agreement']:.0f}% of base-model "
                     "generations: generated silhouettes and glyphs are softer than renders, so the hand-crafted "
                     "checks are a sanity check on renders, not a second judge of generations.")
    rules = sorted({g.get("rule", "?") for c in result.get("configs", ()) for g in (c["result"].get("gates") or {}).values()})
    notes.append("UCE/RECE erasers are computed on the fly on the committed model (guide = the neutral anchor of their "
                 "kind, preserve = the other keywords of that kind), their context gate calibrated as `edit --model toy` "
                 f"does, and applied through GatedPipeline with each eraser's default gate rule ({', '.join(rules)}). "
                 "Where the gate is 0 the images are bit-identical to the base model's, so equal IRA/CRA rows are "
                 "expected.")
    from .peers import peer_notes

    notes.extend(peer_notes(result))
    if result.get("tier") == "quick":
        notes.append("Quick tier: few prompts per set; intervals are wide. `--tier release` for >= 32 target images "
                     "per set.")
    rt = result.get("runtime")
    if rt:
        notes.append(f"Runtime: {rt['images']} images in {rt['generation_seconds']:.0f} s of generation "
                     f"({rt['seconds_per_image']:.2f} s/image, {rt['torch_threads']} torch thread(s)), "
                     f"{result['seconds']:.0f} s in all; 1-minute load average {rt['load_average_start']:.1f} at the "
                     f"start and {rt['load_average_end']:.1f} at the end (other jobs shared these 2 cores).")
        if rt.get("peer_configs"):
            notes.append(f"What the peers add to the run: {rt['peer_configs']} peer rows, {rt['peer_images']} images, "
                         f"{rt['peer_seconds']:.0f} s of evaluation plus {rt['peer_setup_seconds']:.0f} s of set-up "
                         "(ESD-x training or loading from the cache, the SLD pipelines); the shipped erasers added as "
                         f"ConceptGate rows ({', '.join(rt.get('shipped_configs') or []) or 'none'}) are in the "
                         "generation time above. `--peers` is opt-in; CI's quick tier runs without it.")
    return notes


def run_quality(args) -> int:
    from ..adapters.stack import EraserStack
    from ..toyworld import load_judges, load_pipeline
    from .report import ROOT, write_section

    if getattr(args, "from_json", None):
        return _rewrite_from_json(args.from_json)
    t0 = time.time()
    tier = "full" if args.full else (getattr(args, "tier", None) or "quick")
    cfg = dict(TIERS[tier])
    if getattr(args, "seeds", None):
        cfg["seeds"] = int(args.seeds)
    if getattr(args, "steps", None):
        cfg["steps"] = int(args.steps)
    validation = getattr(args, "seed_base", None) is not None and int(args.seed_base) != SEED_BASE
    if validation:
        # tuning a recipe on other seeds than the reported ones: the figures go to --json (and a .md beside it) only
        if not args.json:
            raise SystemExit("bench quality --seed-base: give --json PATH (a validation run does not write "
                             "benchmarks.json, BENCHMARKS.md or the headline)")
        cfg["seed_base"] = int(args.seed_base)
    if getattr(args, "threads", None):
        torch.set_num_threads(int(args.threads))
    extra_targets, part = parse_targets(getattr(args, "targets", None))
    part_targets = part
    if getattr(args, "part", None):
        if not part:
            raise SystemExit("bench quality --part names a part of --targets: give --targets too")
        part = parse_part(args.part)
    load_start = os.getloadavg()[0]
    torch.manual_seed(0)
    say = print
    pipe, judges = load_pipeline(), load_judges()
    configs = [("base", None)]
    if not args.no_edits:
        edits = DEFAULT_EDITS + (IN_CONTEXT_EDITS if getattr(args, "in_context", False) else ())
        erasers = make_edit_erasers(pipe, edits, log=say)
        for e in erasers:
            configs.append((e.name, EraserStack().with_eraser(e)))
        if args.full and len(erasers) > 1:
            st = EraserStack()
            for e in erasers:
                st = st.with_eraser(e)
            configs.append(("+".join(e.name for e in erasers), st))
    for m in args.stack or []:
        configs.append((os.path.basename(m), EraserStack.from_manifest(m)))
    targets = []
    for _, st in configs:
        for e in (st.entries if st is not None else ()):
            for t in eraser_targets(e.eraser):
                add_target(targets, t)
    for t in extra_targets:
        add_target(targets, t)
    from . import peers as P

    peer_kinds = P.parse_kinds(getattr(args, "peers", None))
    shipped_names = []
    shipped_only = parse_shipped(getattr(args, "shipped", None))
    if peer_kinds or getattr(args, "shipped", None):  # the shipped erasers for these targets join as eraser rows
        shipped = shipped_configs(pipe, targets, log=say, only=shipped_only)
        configs.extend(shipped)
        shipped_names = [n for n, _ in shipped]
    from ..adapters.progress import iterate

    results = []
    for name, st in iterate(configs, "quality", unit="config"):
        say(f"== {name}")
        r = evaluate_stack(pipe, judges, st, targets=targets, tier=cfg, log=say)
        r["tier"] = tier
        results.append({"name": name, "result": r})
    peer_setup = 0.0
    if peer_kinds:
        cache = getattr(args, "peer_cache", None) or P.DEFAULT_CACHE
        peer_targets = [t for t in targets if t.kind in KINDS]
        t_setup = time.time()
        peers = P.build_peers(pipe, peer_targets, peer_kinds, esd_iterations=getattr(args, "esd_iterations", None),
                              esd_ddim_steps=int(cfg["steps"]), cache_dir=cache, log=say)
        peer_setup = time.time() - t_setup
        for c in P.evaluate_peers(pipe, judges, peers, targets, cfg, evaluate_stack, log=say):
            c["result"]["tier"] = tier
            results.append(c)
    base = results[0]["result"]
    say("== judges")
    judges_res = evaluate_judges(judges, cfg["judge_renders"], cfg["agreement_renders"],
                                 generated=base["_images"].get("keyword"))
    bars = base_bars(base)
    n_img = sum(m["n_images"] for r in results for m in r["result"]["sets"].values())
    gen_s = sum(m["seconds"] for r in results for m in r["result"]["sets"].values())
    result = {"tier": tier, "tier_settings": cfg, "judges": judges_res, "bars": bars,
              "configs": _strip_images(results), "seconds": time.time() - t0,
              "runtime": {"images": n_img, "generation_seconds": gen_s, "seconds_per_image": gen_s / max(n_img, 1),
                          "torch_threads": torch.get_num_threads(), "load_average_start": load_start,
                          "load_average_end": os.getloadavg()[0]}}
    if any("peer" in c for c in results):
        result["peer_verdicts"] = P.peer_verdicts(result["configs"])
        result["costs"] = P.cost_rows(result["configs"])
        pr = [r for r in results if "peer" in r]
        result["runtime"].update(
            peer_configs=len(pr), peer_images=sum(m["n_images"] for r in pr for m in r["result"]["sets"].values()),
            peer_seconds=sum(r["result"]["seconds"] for r in pr), peer_setup_seconds=peer_setup,
            shipped_configs=[c["name"] for c in results if "peer" not in c and c["name"] in shipped_names])
    result["notes"] = _notes(result)
    body = render_markdown(result)
    json_path = args.json or os.path.join(ROOT, "benchmarks.json")
    cmd = COMMAND + (" --full" if args.full else "") + (f" --tier {tier}" if tier == "release" else "") \
        + (" --in-context" if getattr(args, "in_context", False) else "") \
        + (" --no-edits" if getattr(args, "no_edits", False) else "") \
        + (f" --shipped {','.join(shipped_only)}" if shipped_only else
           " --shipped" if getattr(args, "shipped", None) and not peer_kinds else "") \
        + "".join(f" --stack {s}" for s in args.stack or [])
    if peer_kinds:
        cmd += " --peers" + ("" if peer_kinds == P.PEER_KINDS else f" {','.join(peer_kinds)}")
    cmd += "".join(f" --{k.replace('_', '-')} {getattr(args, k)}" for k in ("seeds", "steps", "threads", "esd_iterations")
                   if getattr(args, k, None))
    if validation:
        cmd += f" --seed-base {cfg['seed_base']} --json {args.json}"
    result["command"] = cmd
    if part:
        cmd += f" --targets {args.targets}" + (f" --part {part}" if getattr(args, "part", None) else "")
        result["part"] = part
        if part != part_targets:
            result["part_targets"] = part_targets
    md_path = os.path.splitext(json_path)[0] + ".md" if validation else None
    write_section(section_key(tier, part), section_title(tier, part, part_targets), body, cmd, data=result,
                  json_path=json_path, path=md_path)
    if tier == "release" and not validation:
        from .headline import write_headline

        write_headline(json_path)
    print(body)
    print(f"\nquality benchmark: {time.time() - t0:.0f} s")
    return 0


def parse_targets(spec: str | None) -> tuple[list, str | None]:
    """``--targets star,circle``: the toy targets and the part's name (a named part of a tier: its own
    targets and shipped erasers, its own section); ``([], None)`` without it."""
    if not spec:
        return [], None
    names = [n.strip() for n in spec.split(",") if n.strip()]
    targets = []
    for n in names:
        t = resolve_concept(n)
        if t is None:
            raise SystemExit(f"bench quality --targets: {n!r} is not a toy concept (an object, style, colour or "
                             "the watermark)")
        add_target(targets, t)
    return targets, "-".join(names)


def parse_shipped(spec) -> list | None:
    """``--shipped`` alone (``"all"``): every shipped eraser for the targets (None); ``--shipped a,b``: those file
    stems only."""
    if not spec or spec == "all":
        return None
    return [n.strip() for n in str(spec).split(",") if n.strip()] or None


def parse_part(name: str) -> str:
    """``--part``: the name of a part's section (default: its targets joined by '-')."""
    import re

    if not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", name or ""):
        raise SystemExit(f"bench quality --part: {name!r} is not a section name (lower-case letters, digits and '-')")
    return name


def section_key(tier: str, part: str | None = None) -> str:
    """BENCHMARKS.md / JSON key of a tier's run, or of a named part of it (``--targets``)."""
    return SECTIONS[tier] + (f"-{part}" if part else "")


def section_title(tier: str, part: str | None = None, targets: str | None = None) -> str:
    """``targets``: the part's targets joined by '-' when ``part`` is a name given with ``--part``."""
    if not part:
        return f"Quality on the toy world ({tier} tier)"
    named = targets and targets != part
    return (f"Quality on the toy world ({tier} tier, targets {(targets if named else part).replace('-', ', ')}"
            + (f"; part {part})" if named else ")"))


def _rewrite_from_json(path: str) -> int:
    """Re-render the BENCHMARKS.md section from a saved result (no generation)."""
    import json

    from .report import write_section

    with open(path) as f:
        data = json.load(f)
    for key, result in data.items():
        # the tiers' sections and their named parts (--targets)
        if not isinstance(result, dict) or "configs" not in result:
            continue
        if key not in SECTIONS.values() and not (key.startswith("quality-") and result.get("part")):
            continue
        result["bars"] = base_bars(result["configs"][0]["result"])
        result["notes"] = _notes(result) + [f"Re-rendered from the JSON of the run measured {result.get('measured')}."]
        if result.get("runtime"):
            torch.set_num_threads(int(result["runtime"]["torch_threads"]))
        body = render_markdown(result)
        write_section(key, section_title(result["tier"], result.get("part"), result.get("part_targets")), body,
                      result.get("command", COMMAND), data=result, json_path=path)
        print(body)
    return 0


def add_quality_cli(sub):
    s = sub.add_parser("quality", help="erasure quality on the toy world (UA/IRA/CRA, gates, judges) -> BENCHMARKS.md")
    s.add_argument("--tier", choices=["quick", "release"], default="quick",
                   help="quick: few prompts (CI runs it); release: >= 32 target images per prompt set, about 3x the "
                        "images, its own BENCHMARKS.md section")
    s.add_argument("--shipped", nargs="?", const="all", default=None, metavar="FILES",
                   help="also every shipped toy eraser for the run's targets (always on with --peers); a comma list of "
                        "file stems (e.g. uce_triangle) takes only those, with --peers too")
    s.add_argument("--part", default=None, metavar="NAME",
                   help="with --targets: the part's section name (default: the targets joined by '-'), so a run of "
                        "one new file does not replace the part's peer run")
    s.add_argument("--targets", default=None, metavar="NAMES",
                   help="also score these toy concepts (comma list, e.g. star,circle) and, with --shipped, the shipped "
                        "erasers for them; the run is a part of its tier with its own section (quality-release-star-circle)")
    s.add_argument("--full", action="store_true", help="the full tier (96 prompts per set; hours on CPU)")
    s.add_argument("--stack", action="append", help="a stack manifest (.json) to evaluate as well (repeatable)")
    s.add_argument("--no-edits", action="store_true", help="skip the on-the-fly UCE/RECE erasers")
    s.add_argument("--in-context", action="store_true",
                   help="also the UCE/RECE edits in ConceptGate's in-context form (toy synonyms and captions), as rows "
                        "next to the published bare-word edits")
    s.add_argument("--seeds", type=int, default=None, help="override seeds per prompt")
    s.add_argument("--steps", type=int, default=None, help="override DDIM steps (stated in the output)")
    s.add_argument("--seed-base", type=int, default=None,
                   help=f"seeds start here instead of {SEED_BASE}: a validation block for tuning a recipe without "
                        "fitting the reported seeds; needs --json, writes nothing else (a .md beside the JSON)")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    s.add_argument("--peers", nargs="?", const="all", default=None, metavar="KINDS",
                   help="also run the peers (issue 17) on the run's targets: negative prompt, Safe Latent Diffusion "
                        "presets, ESD-x (published recipe and toy caption templates); 'all' (default) or a comma "
                        "list of negative,sld,esd. Adds the shipped erasers for those targets as ConceptGate rows")
    s.add_argument("--peer-cache", default=None, metavar="DIR",
                   help="where trained ESD-x weights are cached (default ~/.cache/conceptgate/peers)")
    s.add_argument("--esd-iterations", type=int, default=None,
                   help="override ESD-x iterations (published: 1000; stated in the output)")
    s.add_argument("--from-json", default=None, help="only re-render the BENCHMARKS.md section from a saved JSON")
    s.add_argument("--json", default=None, help="also write the numbers here (default: benchmarks.json)")
    s.set_defaults(func=run_quality)
    return s

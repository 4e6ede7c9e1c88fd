"""RECE's own attack, measured: do the derived adversarial embeddings regenerate the erased concept?

For one toy-world object, RECE (from its UCE start) derives an adversarial embedding ``c'_k`` per
epoch. Each embedding is fed directly as the conditioning (``prompt_embeds``, empty negative) to the
base model, the UCE start and the model after each RECE epoch; the independent judge says how often
the concept comes back (attack success rate; 'none' counts as not regenerated). RECE must lower it.
"""

from __future__ import annotations

import time

import torch

from .report import table, write_section


def _apply(unet, deltas):
    """Add dense deltas in place and return an undo function (benchmark-only, on the toy UNet)."""
    with torch.no_grad():
        for name, d in deltas.items():
            unet.get_submodule(name).weight += d.to(unet.dtype)

    def undo():
        with torch.no_grad():
            for name, d in deltas.items():
                unet.get_submodule(name).weight -= d.to(unet.dtype)

    return undo


def bench_rece_attack(concept: str = "triangle", epochs: int = 3, seeds: int = 8, steps: int = 25, cfg: float = 5.0,
                      write: bool = True, json_path=None):
    from .. import toyworld
    from ..adapters.rece import DiffusersEditHost, compute_edit
    from ..toyworld import judges as J
    from ..toyworld import render as R

    t0 = time.perf_counter()
    pipe = toyworld.load_pipeline()
    judge = toyworld.load_judges()
    host = DiffusersEditHost.from_pipeline(pipe)
    outcome = compute_edit(host, method="rece", concepts=[concept], epochs=epochs, concept_type="object", cache=None)
    result = outcome.result
    target = R.OBJECTS.index(concept)
    with torch.no_grad():
        ids = pipe.tokenizer([concept, ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
        plain, empty = pipe.text_encoder(ids)[0].float().split(1)

    attacks = {f"concept prompt '{concept}'": plain}
    for k, emb in enumerate(result.embeddings, 1):
        attacks[f"c'_{k} (RECE epoch {k})"] = emb.reshape(1, 77, -1).float()
    models = {"base": None, "UCE (RECE start)": result.deltas_after(0)}
    for k in range(1, len(result.embeddings) + 1):
        models[f"RECE after epoch {k}"] = result.deltas_after(k)

    gens = lambda: [torch.Generator("cpu").manual_seed(1000 + s) for s in range(seeds)]  # noqa: E731
    shape = (seeds, 4, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    from ..adapters.progress import bar

    shown = bar(len(models) * len(attacks), "rece-attack", unit="run")
    rates: dict = {}
    for mname, deltas in models.items():
        undo = _apply(pipe.unet, deltas) if deltas else (lambda: None)
        try:
            for aname, emb in attacks.items():
                latents = torch.stack([torch.randn(shape[1:], generator=g) for g in gens()])
                images = pipe(prompt_embeds=emb.repeat(seeds, 1, 1), negative_prompt_embeds=empty.repeat(seeds, 1, 1),
                              num_inference_steps=steps, guidance_scale=cfg, latents=latents, output_type="pt",
                              height=64, width=64).images.float().clamp(0, 1)
                labels = J.classify(judge, images)["object"]
                rates[(mname, aname)] = float((labels == target).mean())
                shown.update(1)
        finally:
            undo()
    shown.close()
    rows = [{"model": m, **{a: f"{100 * rates[(m, a)]:.0f}%" for a in attacks}} for m in models]
    body = (
        f"Toy world, object '{concept}': RECE ({len(result.embeddings)} epochs from the UCE start, object defaults) "
        f"on the committed toy model. Each adversarial embedding c'_k (derived at epoch k against the model of "
        f"epoch k-1) is the whole conditioning, with an empty negative; {seeds} seeds, DDIM {steps} steps, CFG {cfg}. "
        f"Cells: share of images the judge calls '{concept}' (attack success; 'none' is not success). "
        f"RECE works as published when each c'_k regenerates the concept on the model it was derived against and "
        f"no longer does after the next epoch.\n\n"
        + table(rows, [("model", "model")] + [(a, a) for a in attacks])
        + f"\nTotal {time.perf_counter() - t0:.0f} s.\n"
    )
    data = {"concept": concept, "epochs": len(result.embeddings), "seeds": seeds,
            "rates": {f"{m} | {a}": r for (m, a), r in rates.items()}}
    if write:
        write_section("rece-attack", "RECE adversarial embeddings on the toy world (issue 5)", body,
                      f"python -m conceptgate bench rece-attack --concept {concept}", data=data, json_path=json_path)
    return data, body

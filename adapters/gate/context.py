"""The ``context`` gate rule (ConceptGate's default): does the prompt's *meaning* contain the concept?

Why not the published rule: Facilitated Transport's cosine half compares flattened 77-token windows,
which are dominated by the padding rows, so it follows prompt length instead of meaning; its token
half only sees exact tokens (see :mod:`.ft`). This rule reads the text encoder's states at the
prompt's **content positions only** (no start, end or padding token) and asks a small calibrated
detector per concept whether any position carries it.

Notation: ``h_i`` the hidden state at content position ``i`` (the states the sampler feeds the UNet),
``mu, S`` the mean and covariance of content-token states over a neutral pool of prompts::

    phi(h)   = normalise((h - mu) @ P),      P = (S + alpha tr(S)/D I)^(-1/2)     (ZCA, shrinkage alpha)
    s_c(p)   = max over content positions i of  <w_c, phi(h_i)> + b_c              (a linear probe)
    g(p)     = 1[ sigmoid((max_c s_c(p) - t) / T) >= 0.5  or  every token of a listed name is in p ]

Centring removes the direction every token state shares (it makes raw cosines ~0.8 for anything);
whitening lets token identity dominate position and neighbouring words. The probe ``w_c, b_c`` is
fitted (class-balanced, L2-regularised logistic regression) on states of the concept's names in many
carrier prompts against content-token states of a neutral pool; ``t, T`` are fitted on other carrier
prompts against a second neutral pool, with ``t`` raised until at most ``max_fpr`` of that pool fires.
The max over positions makes the score independent of prompt length (padding never enters); the
name half catches listed names that a long unusual context hides from the probe. A Latent-Guard-like
learned detector, but linear, per eraser and fitted in seconds on the host's own text encoder.

Cost per prompt: one ``[L, D] x [D, D]`` whitening shared by every eraser of the same text encoder,
then one ``[L, D] x [D]`` product per concept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass
class FeatureSpace:
    """Centring and whitening of content-token states (one per text encoder, shared by its erasers)."""

    mu: torch.Tensor  # [D]
    P: torch.Tensor  # [D, D]

    @classmethod
    def fit(cls, states: torch.Tensor, alpha: float = 0.1) -> "FeatureSpace":
        x = states.double()
        mu = x.mean(0)
        d = x.shape[1]
        if math.isinf(alpha):  # centring only
            return cls(mu.float(), torch.eye(d))
        xc = x - mu
        s = xc.T @ xc / max(1, len(x) - 1)
        s = s + alpha * torch.trace(s) / d * torch.eye(d, dtype=s.dtype)
        evals, evecs = torch.linalg.eigh(s)
        p = evecs @ torch.diag(evals.clamp_min(1e-12).rsqrt()) @ evecs.T
        return cls(mu.float(), p.float())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = (x.float() - self.mu.to(x.device)) @ self.P.to(x.device)
        return y / y.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _fitting(fn):
    """Fits run with autograd on, also when a host calls them inside ``no_grad`` / ``inference_mode``
    (ComfyUI executes nodes that way)."""
    def run(*args, **kwargs):
        with torch.inference_mode(False), torch.enable_grad():
            return fn(*args, **kwargs)
    run.__name__, run.__doc__ = fn.__name__, fn.__doc__
    return run


@_fitting
def fit_probe(positives: torch.Tensor, negatives: torch.Tensor, l2: float = 1e-3, steps: int = 200
              ) -> tuple[torch.Tensor, float]:
    """``(w [D], b)`` of ``logit = <w, z> + b`` on whitened unit states: class-balanced logistic regression."""
    x = torch.cat([positives, negatives]).double().clone()  # a normal tensor, also from inference-mode inputs
    y = torch.cat([torch.ones(len(positives)), torch.zeros(len(negatives))]).double()
    weight = torch.where(y > 0, 0.5 / len(positives), 0.5 / len(negatives))
    p = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([p], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logit = x @ p[:-1] + p[-1]
        loss = (weight * torch.nn.functional.binary_cross_entropy_with_logits(logit, y, reduction="none")).sum()
        loss = loss + l2 * (p[:-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    p = p.detach().float()
    return p[:-1].clone(), float(p[-1])


@dataclass
class Calibration:
    """``gate = sigmoid((score - threshold) / temperature)``."""

    threshold: float
    temperature: float

    def __call__(self, s: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((s - self.threshold) / self.temperature)


@_fitting
def fit_calibration(pos: torch.Tensor, neg: torch.Tensor, max_fpr: float | None = None, l2: float = 1e-3,
                    min_temperature: float = 0.01, steps: int = 500) -> Calibration:
    """1-D logistic regression ``sigmoid(a s + c)`` on positive and negative prompt scores (class-balanced;
    ``l2`` keeps ``a`` finite when the classes separate, so the boundary lands in the gap). With
    ``max_fpr`` the threshold is raised to ``quantile(neg, 1 - max_fpr) + temperature``, a margin for
    negatives not seen here."""
    s = torch.cat([pos, neg]).double().clone()
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).double()
    weight = torch.where(y > 0, 0.5 / len(pos), 0.5 / len(neg))
    m, sd = s.mean(), s.std().clamp_min(1e-6)
    x = (s - m) / sd  # standardised for a well-conditioned fit
    params = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([params], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        a, c = params
        loss = (weight * torch.nn.functional.binary_cross_entropy_with_logits(a * x + c, y, reduction="none")).sum()
        loss = loss + l2 * (a / sd) ** 2
        loss.backward()
        return loss

    opt.step(closure)
    a, c = params.detach()
    a_raw, c_raw = float(a / sd), float(c - a * m / sd)
    if a_raw <= 0:
        raise ValueError("gate calibration: the concept's prompts do not score above the neutral prompts")
    temperature = max(min_temperature, 1.0 / a_raw)
    threshold = -c_raw / a_raw
    if max_fpr is not None:
        threshold = max(threshold, float(torch.quantile(neg.double(), 1.0 - max_fpr)) + temperature)
    return Calibration(threshold, temperature)


@dataclass
class ContextDetector:
    """One eraser's calibrated detector: a probe per concept name group, the calibration and the listed
    names' token ids (the exact-name half). ``reference`` identifies the text encoder it was fitted on
    (:func:`~.calibrate.same_encoder`)."""

    space: FeatureSpace
    probes: torch.Tensor  # [C, D]
    biases: torch.Tensor  # [C]
    calibration: Calibration
    names: list[str] = field(default_factory=list)
    name_tokens: list[frozenset] = field(default_factory=list)
    reference: torch.Tensor | None = None  # content states of the check prompts (which encoder this fits)
    rates: dict = field(default_factory=dict)  # measured at calibration (positives / negatives fired)

    def concept_scores_whitened(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[B, C]`` per concept, the max over content positions of the probe logit (``z`` = phi(hidden);
        -1e4 for a prompt without content positions, e.g. the empty prompt)."""
        logits = z @ self.probes.to(z.device).T + self.biases.to(z.device)  # [B, L, C]
        return logits.masked_fill(~mask.to(z.device)[..., None], -1e4).amax(1).cpu()

    def scores(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[B]`` max over content positions and concepts of the probe logit."""
        return self.concept_scores_whitened(self.space(hidden), mask).max(1).values

    def name_match(self, tokens: Sequence[set[int]]) -> torch.Tensor:
        """``[B]`` 1 where every token of one listed name is among the prompt's content tokens."""
        return torch.tensor([float(any(n and n <= set(t) for n in self.name_tokens)) for t in tokens])

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor, tokens: Sequence[set[int]] | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate [B], probe score [B], name match [B]); ``tokens=None``: the name half is unknown (0)."""
        s = self.scores(hidden, mask)
        g = self.calibration(s)
        named = self.name_match(tokens) if tokens is not None else torch.zeros_like(g)
        return torch.maximum(g, named), s, named

    # ------------------------------------------------------------------ in files
    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {"space_mu": self.space.mu, "space_P": self.space.P, "probes": self.probes, "biases": self.biases}
        if self.reference is not None:
            out["reference"] = self.reference
        return out

    def to_metadata(self) -> dict:
        return {"rule": "context", "version": 1, "threshold": self.calibration.threshold,
                "temperature": self.calibration.temperature, "names": self.names,
                "name_tokens": [sorted(n) for n in self.name_tokens], "rates": self.rates}

    @classmethod
    def from_parts(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "ContextDetector":
        """Inverse of :meth:`to_tensors` / :meth:`to_metadata`; raises ``ValueError`` naming what is wrong."""
        missing = {"space_mu", "space_P", "probes", "biases"} - set(tensors)
        if missing:
            raise ValueError(f"gate calibration lacks tensors {sorted(missing)}")
        mu, P, w, b = (tensors[k].float() for k in ("space_mu", "space_P", "probes", "biases"))
        d = mu.shape[-1]
        if mu.shape != (d,) or P.shape != (d, d) or w.dim() != 2 or w.shape[1] != d or b.shape != (w.shape[0],):
            raise ValueError(f"gate calibration tensors have inconsistent shapes: mu {tuple(mu.shape)}, "
                             f"P {tuple(P.shape)}, probes {tuple(w.shape)}, biases {tuple(b.shape)}")
        if not all(torch.isfinite(t).all() for t in (mu, P, w, b)):
            raise ValueError("gate calibration tensors hold NaN or infinite values")
        try:
            t, temp = float(meta["threshold"]), float(meta["temperature"])
        except (KeyError, TypeError, ValueError):
            raise ValueError("gate calibration metadata lacks a numeric threshold / temperature") from None
        if not (math.isfinite(t) and math.isfinite(temp) and temp > 0):
            raise ValueError(f"gate calibration threshold {t} / temperature {temp} are not usable")
        names = [str(n) for n in meta.get("names", [])]
        name_tokens = [frozenset(int(i) for i in n) for n in meta.get("name_tokens", [])]
        ref = tensors.get("reference")
        if ref is not None and (ref.dim() != 2 or ref.shape[1] != d):
            raise ValueError(f"gate calibration reference states have shape {tuple(ref.shape)}, expected [n, {d}]")
        return cls(FeatureSpace(mu, P), w, b, Calibration(t, temp), names, name_tokens,
                   ref.float() if ref is not None else None, dict(meta.get("rates", {})))

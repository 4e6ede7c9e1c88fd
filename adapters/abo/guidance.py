"""All-but-One at sampling time (Hong, Lee, Woo, AAAI 2024): **a reconstruction**, no training.

Only the paper's abstract is public ("a surgical update on the classifier guidance term while
constraining the drift of the unconditional score term", with a user-chosen alternative concept).
The guidance rule below is our derivation from that sentence (reference notes, section 2.4), not an
equation of the paper. For a prompt ``p``, the user's negative (or empty) conditioning ``e_n`` and
CFG scale ``w``::

    eps_hat = eps(x, e_n) + w [eps(x, e_p) - eps(x, e_n)]                    (plain CFG)
              - w * gamma(p) * [eps(x, e_erase) - eps(x, e_alt)]             (the eraser's term)

``e_erase`` / ``e_alt`` encode the erased concept and the alternative with the sampler's own text
encoder; an empty alternative means "erase to nothing" (``e_alt = E("")``). ``gamma(p)`` is the
stack's per-prompt gate for this eraser (:func:`~conceptgate.adapters.gate.entry_gates` with the entry's
:class:`~conceptgate.adapters.gate.GateSettings`: ``context`` by default, or ``ft`` / ``always`` /
``cos`` / ``tokens``, optional threshold) times the entry's strength.

Identity (tested): at ``p = erase``, ``gamma = 1`` and ``e_n = E("")`` the rule is exactly CFG
sampling of the fine-tuned model at the reconstructed objective's optimum
(``eps_theta(x, c_e) = eps_0(x, c_a)``, ``eps_theta(x, "") = eps_0(x, "")``): the unconditional
score is untouched by construction (layout preserved), the concept's guidance becomes the
alternative's.

Stacks of several guidance erasers: their terms **add** (each entry ``j`` with its own gate and
strength: ``- w * sum_j gamma_j(p) [eps(x, e_erase_j) - eps(x, e_alt_j)]``), the way negative prompts
compose in SLD / composable diffusion; nothing is clipped, so two erasers for the same concept erase
twice as hard (give them strength 0.5, or list both concepts in one eraser). An eraser with several
concepts gates on the best-matching one (FT's max) and uses *that* concept as ``e_erase``.

Cost: one UNet call per step, whatever the stack. Rows whose gate is 0 get no extra prediction; a
firing row adds one prediction per distinct conditioning it needs that the batch does not already
hold (``e_erase`` equal to the prompt reuses the conditional row; ``e_alt = ""`` reuses the
unconditional row when the negative prompt is empty and CFG > 1). So: +1 row with an empty
alternative, +2 with a named one, +0 when no row fires (bit-identical to plain CFG).

API (host-agnostic; the diffusers glue :mod:`.pipeline`, the ComfyUI glue ``nodes/nodes_abo.py`` and the
webui glue ``extension/abo.py`` use it):

* :func:`abo_eraser` (constructor), :func:`is_abo`, :func:`check_abo_eraser`; files via
  :func:`~conceptgate.adapters.files.save_eraser` / ``load_eraser(path, kind="guidance")``
  (:func:`save_abo` / :func:`load_abo` are shorthands).
* :func:`abo_rule`: the formula on tensors (reference implementation the hosts are tested against).
* :func:`guidance_terms`: per prompt, the firing terms ``(gamma, erase text, alt text)`` of a stack.
* :class:`AboPlan`: which extra rows a batch needs and how to fold their predictions back
  (:meth:`AboPlan.correction`).
* :func:`eps_from_denoised` / :func:`denoised_from_eps`: hosts that return x0 (ComfyUI, k-diffusion).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..eraser import Eraser
from ..errors import EraserFileError
from ..gate import EncodedText, entry_gates
from ..gate import BankCache
from ..stack import EraserStack, StackEntry

METHOD = "abo"
KIND = "guidance"
RULE = "abo-guidance-v1"


# ---------------------------------------------------------------------------------------- erasers


def abo_eraser(erase: str | Sequence[str], alternative: str = "", name: str | None = None, **settings) -> Eraser:
    """A guidance eraser: erase ``erase`` (one concept or several) toward ``alternative``
    (``""`` = erase to nothing). Extra ``settings`` are stored in the file as they are."""
    concepts = [erase] if isinstance(erase, str) else list(erase)
    concepts = [c.strip() for c in concepts if c and c.strip()]
    if not concepts:
        raise ValueError("an All-but-One eraser needs at least one concept to erase")
    alternative = (alternative or "").strip()
    if alternative and alternative in concepts:
        raise ValueError(f"the alternative {alternative!r} is one of the erased concepts")
    if name is None:
        name = f"abo_{concepts[0]}_to_{alternative or 'nothing'}".replace(" ", "_")
    return Eraser(name=name, kind=KIND, method=METHOD, concepts=concepts,
                  settings={"alternative": alternative, "rule": RULE, **settings})


def is_abo(eraser: Eraser) -> bool:
    return eraser.kind == KIND and eraser.method == METHOD


def check_abo_eraser(eraser: Eraser, path=None) -> None:
    """Raise :class:`EraserFileError` (naming the file) if ``eraser`` is not a usable ABO guidance eraser."""
    where = path or eraser.source or eraser.name
    if eraser.kind != KIND:
        raise EraserFileError(where, f"is a {eraser.kind} eraser ({eraser.method}), not an All-but-One guidance "
                                     "eraser" + (" (an ABO *adapter* is a weight eraser: use it in a stack with "
                                                 "Apply Eraser Stack / GatedPipeline)" if eraser.method == METHOD else ""))
    if eraser.method != METHOD:
        raise EraserFileError(where, f"guidance method {eraser.method!r} is not All-but-One ('abo')")
    if eraser.modules or eraser.tensors:
        raise EraserFileError(where, "a guidance eraser carries no tensors (this file has weights in it)")
    alt = (eraser.settings or {}).get("alternative", "")
    if not isinstance(alt, str):
        raise EraserFileError(where, f"settings 'alternative' must be a string, got {type(alt).__name__}")
    if not eraser.concepts:
        raise EraserFileError(where, "no concept to erase")


def save_abo(eraser: Eraser, path) -> str:
    """Write a guidance eraser (metadata only; a few hundred bytes). Returns its sha256."""
    from ..files import save_eraser

    check_abo_eraser(eraser)
    sha = save_eraser(eraser, path)
    eraser.source, eraser.sha256 = str(path), sha
    return sha


def load_abo(path, concepts: list[str] | None = None) -> Eraser:
    """Load an ABO guidance eraser; a weight / conditioning file is refused naming the file."""
    from ..files import load_eraser

    eraser = load_eraser(path, concepts=concepts, kind=KIND)
    check_abo_eraser(eraser, path)
    return eraser


def alternative_of(eraser: Eraser) -> str:
    return str((eraser.settings or {}).get("alternative", "") or "").strip()


def abo_entries(stack: EraserStack | None) -> list[tuple[int, StackEntry]]:
    """The stack's enabled ABO guidance entries with their column index."""
    if stack is None:
        return []
    return [(i, e) for i, e in enumerate(stack.entries) if e.enabled and is_abo(e.eraser)]


# ---------------------------------------------------------------------------------------- the rule


def abo_rule(eps_neg: torch.Tensor, eps_pos: torch.Tensor, w: float, terms: Sequence[tuple] = ()) -> torch.Tensor:
    """``eps_n + w (eps_p - eps_n) - w * sum gamma (eps_erase - eps_alt)`` for ``terms`` of
    ``(gamma, eps_erase, eps_alt)`` (gamma a float or a tensor broadcasting over the batch)."""
    out = eps_neg + w * (eps_pos - eps_neg)
    for gamma, eps_e, eps_a in terms:
        out = out - w * gamma * (eps_e - eps_a)
    return out


def eps_from_denoised(x: torch.Tensor, denoised: torch.Tensor, sigma) -> torch.Tensor:
    """Hosts on k-diffusion's parametrisation (``x = x0 + sigma * eps``, ComfyUI) return the denoised
    ``x0``: the epsilon it implies is ``(x - x0) / sigma``."""
    return (x - denoised) / _sigma_like(sigma, x)


def denoised_from_eps(x: torch.Tensor, eps: torch.Tensor, sigma) -> torch.Tensor:
    return x - eps * _sigma_like(sigma, x)


def _sigma_like(sigma, x: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if s.dim() == 0:
        return s
    return s.reshape(s.shape[:1] + (1,) * (x.dim() - 1))


# ---------------------------------------------------------------------------------------- gates


#: texts starting with it are private keys of negatives (Geom regional negation's rows): never a prompt's
#: text, and their extra rows take the unconditional rows' weight-eraser coefficients
NEGATIVE_ROW = "\x00"


@dataclass(frozen=True)
class Term:
    """One firing eraser on one prompt: ``gamma`` (gate x strength), what is erased, toward what.

    ``erase`` / ``alternative`` are the texts whose predictions the rule subtracts; ``words`` is set by
    :func:`in_prompt_terms` (the texts are then whole prompts): the concept and alternative it swapped,
    for reports and infotexts. ``region`` (``(grid, bins)``, default None = the whole image) confines the
    term to those cells of a ``grid x grid`` partition of the image (Geom-Erasing's regional negation,
    :mod:`conceptgate.adapters.geom.regional`, reuses these rows and folds)."""

    gamma: float
    erase: str
    alternative: str
    eraser: str = ""
    words: tuple[str, str] | None = field(default=None, compare=False)
    region: tuple[int, tuple[int, ...]] | None = None

    @property
    def label(self) -> tuple[str, str]:
        """(erased concept, alternative) in words, whichever form of the rule the term uses."""
        return self.words if self.words is not None else (self.erase, self.alternative)


def guidance_terms(stack: EraserStack, prompt: EncodedText, banks: BankCache,
                   tokens_known: bool = True) -> list[list[Term]]:
    """For each of the P encoded prompts, the ABO terms whose gate x strength is non-zero.

    Each enabled ABO entry's gate is :func:`~conceptgate.adapters.gate.entry_gates` with the entry's
    settings; the erased conditioning is the entry's best-matching concept for that prompt."""
    n = prompt.hidden.shape[0]
    out: list[list[Term]] = [[] for _ in range(n)]
    for _, entry in abo_entries(stack):
        result = entry_gates(prompt, entry.eraser, entry.gate, banks, tokens_known)
        gamma, scores = result.values, result.scores
        best = scores.argmax(dim=1) if scores.dim() == 2 and scores.shape[1] else torch.zeros(n, dtype=torch.long)
        for i in range(n):
            g = float(gamma[i]) * entry.strength
            if g != 0.0:
                out[i].append(Term(g, entry.eraser.concepts[int(best[i])], alternative_of(entry.eraser),
                                   entry.eraser.name))
    return out


def terms_from_gates(entries: Sequence[StackEntry], gates: torch.Tensor,
                     concept_index: torch.Tensor | None = None) -> list[list[Term]]:
    """Terms from precomputed gates ``[P, len(entries)]`` (before strength), e.g. the quality bench's."""
    out = []
    for i in range(gates.shape[0]):
        row = []
        for j, e in enumerate(entries):
            g = float(gates[i, j]) * e.strength
            if g != 0.0 and e.enabled:
                k = int(concept_index[i, j]) if concept_index is not None else 0
                row.append(Term(g, e.eraser.concepts[k], alternative_of(e.eraser), e.eraser.name))
        out.append(row)
    return out


def uses_prompt(eraser: Eraser) -> bool:
    """Whether the eraser asks for ConceptGate's in-prompt form (``settings["in_prompt"]``, see :func:`in_prompt_terms`)."""
    return bool((eraser.settings or {}).get("in_prompt", False))


def swap_in_prompt(prompt: str, concepts: Sequence[str], alternative: str) -> str | None:
    """``prompt`` with the first written concept (whole words, any case; longer names first) replaced by
    ``alternative`` (removed when it is empty); None when the prompt names none of ``concepts``."""
    found = _find_concept(prompt, concepts)
    return None if found is None else _swap(prompt, found[1], alternative)


def _swap(prompt: str, pattern: re.Pattern, alternative: str) -> str:
    return re.sub(r"\s{2,}", " ", pattern.sub(alternative, prompt)).strip()


def _find_concept(prompt: str, concepts: Sequence[str]):
    """(concept, its whole-word pattern) of the longest of ``concepts`` that ``prompt`` spells, or None."""
    for c in sorted((c for c in concepts if c.strip()), key=len, reverse=True):
        pattern = re.compile(r"(?<![\w])" + re.escape(c.strip()) + r"(?![\w])", re.IGNORECASE)
        if pattern.search(prompt or ""):
            return c.strip(), pattern
    return None


def in_prompt_terms(terms: list[list[Term]], prompts: Sequence[str] | None, stack: EraserStack | Sequence[StackEntry]) -> list[list[Term]]:
    """ConceptGate's **in-prompt** form of the rule (not the reconstruction's default; per eraser,
    ``settings["in_prompt"] = True``): where the prompt text is known and names the erased concept, the
    term uses the prompt itself as ``e_erase`` and the prompt with the concept replaced by the alternative
    as ``e_alt``::

        eps_hat = eps_n + w [eps(x, e_p) - eps(x, e_n)] - w gamma [eps(x, e_p) - eps(x, e_p[erase -> alt])]

    so at ``gamma = 1`` the conditional prediction is the swapped prompt's: the alternative is drawn with
    the prompt's own colour, style and layout cues, where the bare-word difference ``eps("triangle") -
    eps("square")`` carries the bare words' defaults. The erase row is the conditional row itself, so a
    firing prompt costs one extra row, not two. Prompts that do not spell the concept (a synonym the
    eraser does not list, an embedding-level attack) and hosts that do not know the text (ComfyUI's
    conditionings without a recorded text) keep the bare-word term: nothing is left unerased by the swap."""
    if not prompts:
        return terms
    entries = stack.entries if isinstance(stack, EraserStack) else list(stack)
    by_name = {e.eraser.name: e.eraser for e in entries if is_abo(e.eraser)}
    out = []
    for i, row in enumerate(terms):
        new_row = []
        for t in row:
            e = by_name.get(t.eraser)
            found = _find_concept(prompts[i], e.concepts) if e is not None and uses_prompt(e) else None
            swapped = _swap(prompts[i], found[1], t.alternative) if found is not None else None
            if swapped is not None and swapped != prompts[i]:
                new_row.append(Term(t.gamma, prompts[i], swapped, t.eraser, words=(found[0], t.alternative)))
            else:
                new_row.append(t)
        out.append(new_row)
    return out


# ---------------------------------------------------------------------------------------- batch plan


@dataclass
class AboPlan:
    """Which extra UNet rows a CFG batch needs, and how to fold their predictions back.

    Built per sampling call from ``terms`` (one list per prompt) and the text encodings of every
    needed conditioning. ``sources[k]`` is, for extra row ``k``, the prompt whose latent it takes;
    ``hidden`` its conditioning ``[K, L, D]``. For each prompt and text, :attr:`lookup` says where its
    prediction comes from: ``("cond", i)``, ``("uncond", i)`` or ``("extra", k)``.
    """

    terms: list[list[Term]]
    sources: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    lookup: dict = field(default_factory=dict)
    hidden: torch.Tensor | None = None

    @property
    def fires(self) -> bool:
        return any(self.terms)

    @property
    def extra_rows(self) -> int:
        return len(self.sources)

    @classmethod
    def build(cls, terms: list[list[Term]], text_hidden: dict[str, torch.Tensor], cond_hidden: torch.Tensor | None = None,
              uncond_hidden: torch.Tensor | None = None) -> "AboPlan":
        """``text_hidden[text]``: ``[L, D]`` encoding of every erase / alternative text used by ``terms``.
        ``cond_hidden`` / ``uncond_hidden``: the batch's own ``[P, L, D]`` rows (None when absent, e.g.
        the uncond branch at CFG 1), used to reuse a row whose conditioning is identical."""
        plan = cls(terms)
        extra = []
        for i, row in enumerate(terms):
            needed = []
            for t in row:
                for text in (t.erase, t.alternative):
                    if text not in needed:
                        needed.append(text)
            for text in needed:
                h = text_hidden[text]
                if cond_hidden is not None and _same(cond_hidden[i], h):
                    plan.lookup[(i, text)] = ("cond", i)
                elif uncond_hidden is not None and _same(uncond_hidden[i], h):
                    plan.lookup[(i, text)] = ("uncond", i)
                else:
                    plan.lookup[(i, text)] = ("extra", len(plan.sources))
                    plan.sources.append(i)
                    plan.texts.append(text)
                    extra.append(h)
        if extra:
            plan.hidden = torch.stack(extra)
        return plan

    def correction(self, eps_cond: torch.Tensor, eps_uncond: torch.Tensor | None, eps_extra: torch.Tensor | None,
                   rows_per_prompt: int = 1) -> torch.Tensor:
        """``sum_j gamma_j (eps_erase_j - eps_alt_j)`` per conditional row ``[P * rows_per_prompt, ...]``
        (zeros where no term fires). Multiply by ``w`` and subtract from the CFG output.

        Formed in float32 whatever the predictions' dtype (fp16 / bf16 UNets): the differences of
        nearby predictions and their weighted sum are rounded once, by the caller's cast."""
        out = torch.zeros_like(eps_cond, dtype=torch.promote_types(eps_cond.dtype, torch.float32))
        r = rows_per_prompt

        def pick(i, text, j):
            kind, k = self.lookup[(i, text)]
            if kind == "cond":
                return eps_cond[i * r + j].to(out.dtype)
            if kind == "uncond":
                return eps_uncond[i * r + j].to(out.dtype)
            return eps_extra[k * r + j].to(out.dtype)

        for i, row in enumerate(self.terms):
            for t in row:
                weight = t.gamma if t.region is None else t.gamma * region_map(*t.region, out.shape[-2:]).to(out)
                for j in range(r):
                    out[i * r + j] += weight * (pick(i, t.erase, j) - pick(i, t.alternative, j))
        return out


def region_map(grid: int, bins: Sequence[int], size) -> torch.Tensor:
    """``[H, W]`` float map, 1 on the cells ``m * grid + n`` (row ``m``, column ``n``) of a ``grid x grid``
    partition of an ``H x W`` latent (cell edges at ``floor(k * H / grid)``), 0 elsewhere."""
    h, w = int(size[0]), int(size[1])
    rows = torch.div(torch.arange(h) * grid, h, rounding_mode="floor")
    cols = torch.div(torch.arange(w) * grid, w, rounding_mode="floor")
    cell = rows[:, None] * grid + cols[None, :]
    return torch.isin(cell, torch.tensor(sorted(set(int(b) for b in bins)), dtype=torch.long)).float()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.equal(a, b.to(a)))


def encode_texts(encoder, terms: list[list[Term]], cache: dict | None = None) -> dict[str, torch.Tensor]:
    """``{text: [L, D]}`` for every erase / alternative text in ``terms`` (with ``encoder``: a
    :class:`~conceptgate.adapters.gate.TextEncoderLike`)."""
    cache = {} if cache is None else cache
    todo = []
    for row in terms:
        for t in row:
            for text in (t.erase, t.alternative):
                if text not in cache and text not in todo:
                    todo.append(text)
    if todo:
        enc = encoder(todo)
        for text, h in zip(todo, enc.hidden):
            cache[text] = h
    return cache

"""The mechanism registry: how each mechanism's erasers are checked and applied during sampling.

Every mechanism package (``spm``, ``rece``, ``geom``, ``abo``) declares itself here when it is imported
(``conceptgate.adapters`` imports all four), so the core's generic code, the hosts and the benchmark
look a handler up by ``(kind, method)`` instead of importing a mechanism: data flows downward only.

* **checks** ``fn(eraser, path) -> None``: raise :class:`~.errors.EraserFileError` (naming the file)
  when a loaded eraser of that kind and method is not usable. :func:`~.files.load_eraser` runs them.
* **conditioning handlers** ``fn(pipe, entries, prompts, gates, negative=None) -> dict``: extra
  diffusers pipeline keyword arguments for conditioning erasers (e.g. ``negative_prompt_embeds`` with
  Geom-Erasing's learned tokens appended to each row's negative prompt where the gate fires), ``gates``
  being each row's coefficient (gate x strength) per entry, ``negative`` the rows' negative prompts.
* **guidance sessions** ``fn(gated_pipeline) -> session``: how the one diffusers wrapper runs guidance
  erasers around its pipeline call (All-but-One's extra CFG rows).
* **guidance handlers** ``fn(pipe, entries, prompts, seeds, gates, steps, cfg, sample) -> images``:
  replace the sampling call for guidance erasers; ``sample(**extra_pipe_kwargs)`` runs the default
  sampler (weight erasers hooked, conditioning keyword arguments applied) if the handler only wraps it.

* **row terms** ``(uses_rows(eraser) -> bool, fn(gated_pipeline, entries, prompts, gates, negatives,
  guidance_scale) -> (terms, hidden))``: conditioning erasers that act through extra CFG rows instead of
  pipeline arguments (Geom-Erasing's regional negation): per prompt, :class:`~.abo.guidance.Term` s and the
  encodings they name, folded by the **row session** (the guidance session of the method registered with
  :func:`register_row_session`: All-but-One's, which already batches such rows).

Weight erasers need no handler: every host applies them through the one hook mechanism
(:mod:`.hooks`) or its own LoRA patching.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .errors import UnsupportedEraser


@dataclass(frozen=True)
class Mechanism:
    """One published method as ConceptGate ships it: the package that holds it and the eraser
    (kind, method) pairs its files carry."""

    name: str
    title: str
    erasers: tuple[tuple[str, str], ...]


MECHANISMS: dict[str, Mechanism] = {}
CHECKS: dict[tuple[str, str], Callable] = {}
#: ``method -> fn(pipe, entries, prompts, gates) -> dict`` (see the module docstring)
CONDITIONING_HANDLERS: dict[str, Callable] = {}
#: ``method -> fn(pipe, entries, prompts, seeds, gates, steps, cfg, sample) -> images``
GUIDANCE_HANDLERS: dict[str, Callable] = {}
#: ``method -> fn(gated_pipeline) -> session``: how :class:`~.diffusers_host.GatedPipeline` runs guidance
#: erasers (a session has ``attach()``, ``detach()`` and ``active(prompts, encoded, guidance_scale)``, a
#: context manager around one pipeline call)
GUIDANCE_SESSIONS: dict[str, Callable] = {}


#: ``method -> (uses_rows, fn)`` (see the module docstring)
ROW_TERMS: dict[str, tuple[Callable, Callable]] = {}
#: the guidance method whose session folds row terms (``{"method": ...}`` once registered)
ROW_SESSION: dict[str, str] = {}


def register_mechanism(mechanism: Mechanism) -> None:
    MECHANISMS[mechanism.name] = mechanism


def register_check(kind: str, method: str, fn: Callable) -> None:
    """``fn(eraser, path)`` raises when an eraser of ``kind`` / ``method`` is not usable."""
    CHECKS[(kind, method)] = fn


def register_conditioning(method: str, fn: Callable) -> None:
    """Plug in how conditioning erasers of ``method`` enter diffusers generation."""
    CONDITIONING_HANDLERS[method] = fn


def register_guidance(method: str, fn: Callable) -> None:
    """Plug in a guidance eraser's diffusers sampler for ``method``."""
    GUIDANCE_HANDLERS[method] = fn


def register_guidance_session(method: str, fn: Callable) -> None:
    """Plug in how :class:`~.diffusers_host.GatedPipeline` runs guidance erasers of ``method``."""
    GUIDANCE_SESSIONS[method] = fn


def register_row_terms(method: str, uses_rows: Callable, fn: Callable) -> None:
    """Conditioning erasers of ``method`` for which ``uses_rows(eraser)`` act through extra CFG rows."""
    ROW_TERMS[method] = (uses_rows, fn)


def register_row_session(method: str) -> None:
    """The guidance session of ``method`` folds the row terms of every mechanism."""
    ROW_SESSION["method"] = method


def row_terms(eraser) -> Callable | None:
    """``fn`` of :func:`register_row_terms` when ``eraser`` acts through extra CFG rows, else None."""
    entry = ROW_TERMS.get(eraser.method)
    return entry[1] if entry is not None and entry[0](eraser) else None


def row_session_method() -> str:
    method = ROW_SESSION.get("method")
    if method is None:
        raise UnsupportedEraser("no session folds extra CFG rows (register_row_session)")
    return method


def check_eraser(eraser, path=None) -> None:
    fn = CHECKS.get((eraser.kind, eraser.method))
    if fn is not None:
        fn(eraser, path)


def _handler(table: dict, kind: str, eraser) -> Callable:
    fn = table.get(eraser.method)
    if fn is None:  # never sample without an eraser that was asked for
        raise UnsupportedEraser(f"{eraser.name}: no {kind} handler for method {eraser.method!r} "
                                f"(register_{kind})")
    return fn


def conditioning_handler(eraser) -> Callable:
    return _handler(CONDITIONING_HANDLERS, "conditioning", eraser)


def guidance_handler(eraser) -> Callable:
    return _handler(GUIDANCE_HANDLERS, "guidance", eraser)


def guidance_session(eraser) -> Callable:
    return _handler(GUIDANCE_SESSIONS, "guidance_session", eraser)


#: ``name -> fn(concept, alternative) -> [(prompt with the concept, same prompt with the alternative)]``:
#: training prompt contexts a model world provides (``conceptgate.toyworld`` registers ``toy``), so the
#: trainers take prompts in context without importing that world.
PROMPT_CONTEXTS: dict[str, Callable] = {}


def register_prompt_context(name: str, fn: Callable) -> None:
    PROMPT_CONTEXTS[name] = fn


def prompt_contexts() -> dict[str, Callable]:
    return dict(PROMPT_CONTEXTS)


#: ``method -> gate rule`` used when a stack entry is added without gate settings. The default rule
#: (``context``) follows what the prompt asks for; an implicit concept (a watermark nobody asks for)
#: registers ``always``.
DEFAULT_GATE_RULES: dict[str, str] = {}


def register_default_gate_rule(method: str, rule: str) -> None:
    DEFAULT_GATE_RULES[method] = rule


def default_gate_rule(eraser) -> str:
    from .gate.settings import DEFAULT_RULE

    return DEFAULT_GATE_RULES.get(eraser.method, DEFAULT_RULE)

"""ConceptGate's ComfyUI nodes (category ``ConceptGate``).

Graph shape::

    Load Eraser -> Add to Eraser Stack -> (Add to Eraser Stack ...) -> Apply Eraser Stack -> KSampler
                                                     MODEL, CLIP, positive ----^

Files live in ``models/conceptgate`` (registered here; ``extra_model_paths.yaml`` may add more
folders under the key ``conceptgate``); files in ``models/loras`` are listed too, as ``loras/NAME``.
"""

from __future__ import annotations

import logging
import os

import folder_paths
from comfy_api.latest import io

from ..adapters.files import load_eraser
from ..adapters.gate import DEFAULT_RULE, GateSettings
from ..adapters.gate import RULES as GATE_RULES
from ..adapters.stack import COMBINE_MODES, EraserStack
from . import comfy_glue, lock
from .v3 import CATEGORY, Eraser, Stack, check_choices

log = logging.getLogger("conceptgate")

FOLDER = "conceptgate"
MODES = ("per-row", "batch")


SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "toyworld", "erasers")


def register_model_folder():
    """Add ``models/conceptgate`` (idiom of IPAdapter/ADE: keep user-configured paths), then the toy
    world's shipped erasers and embeddings (read from the package, last: a user's file of the same name
    wins), so the example workflows run without copying anything."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    paths, exts = folder_paths.folder_names_and_paths.get(FOLDER, ([], set()))
    if default not in paths:
        paths = [default] + list(paths)
    if os.path.isdir(SHIPPED) and SHIPPED not in paths:
        paths = list(paths) + [SHIPPED]
    folder_paths.folder_names_and_paths[FOLDER] = (paths, {".safetensors", ".json"} | set(exts))
    embeddings = os.path.join(SHIPPED, "embeddings")
    if os.path.isdir(embeddings) and "embeddings" in folder_paths.folder_names_and_paths:
        emb_paths, emb_exts = folder_paths.folder_names_and_paths["embeddings"]
        if embeddings not in emb_paths:
            folder_paths.folder_names_and_paths["embeddings"] = (list(emb_paths) + [embeddings], emb_exts)


register_model_folder()


def eraser_files() -> list[str]:
    own = [f for f in folder_paths.get_filename_list(FOLDER) if f.endswith(".safetensors")]
    loras = [f"loras/{f}" for f in folder_paths.get_filename_list("loras") if f.endswith(".safetensors")]
    return own + loras


def resolve_eraser_path(name: str) -> str:
    if name.startswith("loras/"):
        return folder_paths.get_full_path_or_raise("loras", name[len("loras/"):])
    return folder_paths.get_full_path_or_raise(FOLDER, name)


_CACHE: dict = {}


def cached_load(path: str, concepts: list[str] | None):
    key = (path, os.path.getmtime(path), tuple(concepts or ()))
    if key not in _CACHE:
        _CACHE.clear() if len(_CACHE) > 32 else None
        _CACHE[key] = load_eraser(path, concepts=concepts)
    return _CACHE[key]


class LoadEraser(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptGateLoadEraser",
            display_name="Load Eraser (ConceptGate)",
            category=CATEGORY,
            description=("Loads an eraser file (ConceptGate, official SPM, or a kohya LoRA made by a ConceptGate "
                         "command) and validates it. Files with problems stop here with a message naming the file."),
            inputs=[
                io.Combo.Input("eraser_name", options=eraser_files(),
                               tooltip="A .safetensors file from models/conceptgate (or models/loras)."),
                io.String.Input("concepts", default="", optional=True, tooltip="Comma-separated erased concepts. "
                                "Needed only when the file does not name them (official SPM files without 'prompts'); "
                                "overrides the file."),
            ],
            outputs=[
                Eraser.Output("eraser", display_name="eraser", tooltip="The loaded eraser, to add to a stack."),
                io.String.Output("info", display_name="info", tooltip="What the file contains."),
            ],
        )

    @classmethod
    def validate_inputs(cls, eraser_name=None) -> bool | str:
        return check_choices(cls, eraser_name=eraser_name)

    @classmethod
    def execute(cls, eraser_name, concepts="") -> io.NodeOutput:
        override = [c.strip() for c in concepts.split(",") if c.strip()] or None
        eraser = cached_load(resolve_eraser_path(eraser_name), override)
        info = (f"{eraser.name}: {eraser.method} ({eraser.kind}), concepts {', '.join(eraser.concepts)}, "
                f"{len(eraser.modules)} modules, rank {eraser.rank}, base {eraser.base_family or 'unknown'}")
        policy = lock.current_policy()
        if policy is not None and policy.is_locked(eraser):
            info += " [locked by the operator: applied to every image on this server, whatever this graph says]"
        return io.NodeOutput(eraser, info)


def manifest_files() -> list[str]:
    return [f for f in folder_paths.get_filename_list(FOLDER) if f.endswith(".json")]


class LoadStack(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptGateLoadStack",
            display_name="Load Eraser Stack (manifest)",
            category=CATEGORY,
            description=("Loads an eraser stack manifest (.json: eraser files pinned by sha256, with their toggles, "
                         "strengths and gate settings; written by 'python -m conceptgate' or shared). Every kind of "
                         "eraser; the same manifest loads as a webui preset and with EraserStack.from_manifest."),
            inputs=[
                io.Combo.Input("manifest", options=manifest_files(), tooltip="A .json stack manifest from "
                               "models/conceptgate. Its files are looked up next to it and in the eraser folders; a "
                               "changed file (sha256) is refused."),
            ],
            outputs=[
                Stack.Output("stack", display_name="stack",
                             tooltip="The stack, for Apply Eraser Stack (or Add to Eraser Stack to extend it)."),
                io.String.Output("info", display_name="info", tooltip="Its entries."),
            ],
        )

    @classmethod
    def validate_inputs(cls, manifest=None) -> bool | str:
        return check_choices(cls, manifest=manifest)

    @classmethod
    def execute(cls, manifest) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(FOLDER, manifest)
        stack = EraserStack.from_manifest(path, search_dirs=folder_paths.get_folder_paths(FOLDER))
        lines = [f"{e.eraser.name}: {e.eraser.method} ({e.eraser.kind}), {'on' if e.enabled else 'off'}, strength "
                 f"{e.strength:g}, gate {e.gate.rule}" for e in stack.entries]
        lines += [f"skipped (best effort): {s}" for s in stack.skipped]
        return io.NodeOutput(stack, "\n".join(lines))


class AddToStack(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptGateAddToStack",
            display_name="Add to Eraser Stack",
            category=CATEGORY,
            description="Adds an eraser to a stack with its own toggle, strength and gate settings.",
            inputs=[
                Eraser.Input("eraser", tooltip="From Load Eraser."),
                io.Boolean.Input("enabled", default=True, tooltip="Off: the eraser stays in the stack but does nothing "
                                 "(output identical to a graph without it)."),
                io.Float.Input("strength", default=1.0, min=-4.0, max=4.0, step=0.05,
                               tooltip="Multiplies the gate. 1.0 = as trained."),
                io.Combo.Input("gate", options=list(GATE_RULES), default=DEFAULT_RULE, tooltip="context (default): "
                               "the eraser's calibrated detector on what the prompt means (content tokens only), or a "
                               "listed name in it; needs 'CLIP Text Encode (ConceptGate)' to know the prompt's tokens, "
                               "else the eraser acts on every prompt. ft: SPM's Facilitated Transport (official): "
                               "max(prompt/concept embedding cosine, share of the concept's tokens in the prompt). "
                               "always: a plain LoRA at 'strength'. cos / tokens: one half of ft."),
                io.Boolean.Input("cond_only", default=False, tooltip="Apply to the positive branch only and keep the "
                                 "unconditional prediction of the base model (non-official)."),
                Stack.Input("stack", optional=True, tooltip="A stack to extend; empty starts a new one."),
                io.Float.Input("threshold", default=0.0, min=0.0, max=1.0, step=0.01, optional=True, tooltip=
                               "Non-official calibration: gates below this become 0 (0 = off, the official rule)."),
                io.Boolean.Input("best_effort", default=False, optional=True, tooltip="Off (default): if this eraser "
                                 "cannot be applied (e.g. it does not fit the model), the generation stops with the "
                                 "reason. On: it is skipped and the gate report says so. Erasers locked by the operator "
                                 "always stop."),
            ],
            outputs=[Stack.Output("stack_out", display_name="stack", tooltip="The stack with this eraser appended.")],
        )

    @classmethod
    def validate_inputs(cls, gate=None) -> bool | str:
        return check_choices(cls, gate=gate)

    @classmethod
    def execute(cls, eraser, enabled, strength, gate, cond_only, stack=None, threshold=0.0,
                best_effort=False) -> io.NodeOutput:
        settings = GateSettings(rule=gate, cond_only=cond_only, threshold=threshold if threshold > 0 else None,
                                temperature=0.0 if threshold > 0 else None)
        return io.NodeOutput((stack or EraserStack()).with_eraser(eraser, enabled, strength, settings,
                                                                  best_effort=best_effort))


class ApplyStack(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptGateApplyStack",
            display_name="Apply Eraser Stack",
            category=CATEGORY,
            description=("Applies an eraser stack to MODEL through ComfyUI patches (the loaded model is never changed). "
                         "Each eraser's gate is computed from the prompt with this CLIP, exactly as the sampler "
                         "encodes it."),
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The model to erase from (a patched clone is returned)."),
                io.Clip.Input("clip", tooltip="The CLIP that encodes your prompts: gates compare the prompt and the "
                              "erased concepts in its embedding space (CLIP skip included)."),
                Stack.Input("stack", tooltip="From Add to Eraser Stack."),
                io.Conditioning.Input("positive", tooltip="The positive prompt. Use 'CLIP Text Encode (ConceptGate)' "
                                      "to enable the token-overlap half of the gate."),
                io.Combo.Input("mode", options=list(MODES), default="per-row", tooltip="per-row: every "
                               "conditioning and batch row gets its own gate at sampling time (hooks, no weight "
                               "copies). batch: one gate from 'positive', weights patched once like a LoRA (fastest)."),
                io.Combo.Input("combine", options=list(COMBINE_MODES), default="additive", tooltip="additive: each "
                               "eraser at its own gate. official: the SPM reference arithmetic (factors summed: gate "
                               "squared, cross terms)."),
                io.Conditioning.Input("negative", optional=True, tooltip="Your negative prompt. Geom-Erasing erasers "
                                      "in the stack append their tokens to it (output 'negative'); one set to regional "
                                      "negation patches the MODEL instead; other kinds leave it as it is."),
                io.Boolean.Input("allow_other_base", default=False, optional=True, tooltip="A UCE/RECE edit file is "
                                 "the exact solution only for the model it was solved on, and is refused on another "
                                 "(base fingerprint). On: apply it anyway, as an approximation. Trained erasers (SPM, "
                                 "All-but-One) are meant to transfer to fine-tunes and are never refused for this."),
            ],
            outputs=[
                io.Model.Output("model_out", display_name="model", tooltip="MODEL with the weight, All-but-One "
                                "guidance and Geom regional-negation erasers attached (for any sampler that uses the model's CFG: KSampler, "
                                "SamplerCustomAdvanced with CFGGuider)."),
                io.String.Output("gate_report", display_name="gate_report",
                                 tooltip="The gate each eraser took for the positive prompt."),
                io.Conditioning.Output("negative_out", display_name="negative", tooltip="Your negative prompt with the "
                                       "Geom-Erasing tokens of the erasers that fired appended: connect it to the "
                                       "sampler's negative (without a negative input: the empty prompt's)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, mode=None, combine=None) -> bool | str:
        return check_choices(cls, mode=mode, combine=combine)

    @classmethod
    def execute(cls, model, clip, stack, positive, mode, combine, negative=None,
                allow_other_base=False) -> io.NodeOutput:
        """Every enabled eraser of every kind, gated on ``positive``: weight deltas (per row or batch),
        All-but-One guidance rows in the model's CFG batch, Geom-Erasing tokens on the negative."""
        stack = stack.with_combine(combine)
        policy = lock.current_policy()  # a broken operator policy stops here too, with its reason
        locked = [e.eraser.name for e in stack.entries if policy is not None and policy.is_locked(e.eraser)]
        if locked:  # the lock applies these at sampling, whatever this node says: never twice
            stack = policy.without_locked(stack)
        stack = comfy_glue.check_fits(model, stack, allow_other_base)
        coeffs, report = comfy_glue.gates_for_conditioning(stack, clip, positive)
        if mode == "batch":
            patched = comfy_glue.weight_patched(model, stack, coeffs, allow_other_base)
        else:
            patched = comfy_glue.row_gated(model, stack, clip, allow_other_base=allow_other_base)
        notes = [f"(mode {mode}, combine {combine})"]
        if any(e.enabled and e.eraser.kind == "guidance" for e in stack.entries):
            from .nodes_abo import patched_model

            patched, _ = patched_model(patched, stack, clip)
            notes.append("(All-but-One guidance attached: its rows join the sampler's CFG batch, gated per prompt)")
        negative, geom_notes = geom_negative(clip, stack, coeffs, negative)
        notes += geom_notes
        patched, regional_notes = geom_regional(patched, clip, stack, coeffs)
        notes += regional_notes
        text = "\n".join([report.text()] + notes)
        if policy is not None:
            text += "\n[locked by the operator, applied to every image whatever this graph says: " + ", ".join(
                f"{e.eraser.name} x{e.strength:g}" for e in policy.entries) + "]"
        log.info("ConceptGate gates: %s", text.replace("\n", "; "))
        return io.NodeOutput(patched, text, negative, ui={"text": [text]})


GEOM_KEY = "conceptgate_geom"  # on negative conditionings: sha256 of the Geom erasers already appended


def geom_negative(clip, stack: EraserStack, coeffs, negative=None) -> tuple[list, list[str]]:
    """``negative`` with the learned tokens of every enabled Geom-Erasing entry whose coefficient (gate x
    strength, from the positive) is >= 0.5 appended (on or off, as in the diffusers handler), with the
    Geom node's defaults; and report lines. Without ``negative``: the empty prompt's conditioning."""
    from .nodes_geom import append_tokens

    from ..adapters.geom import uses_regional_rows

    entries = [(i, e) for i, e in enumerate(stack.entries) if e.enabled and e.eraser.kind == "conditioning"
               and not uses_regional_rows(e.eraser)]  # regional negation files: geom_regional
    if negative is None:
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    notes = []
    for i, e in entries:
        if float(coeffs[i]) >= 0.5:
            negative, info = append_tokens(clip, negative, e.eraser)
            notes.append(f"(Geom-Erasing: {info} appended to the negative)")
        else:
            notes.append(f"(Geom-Erasing: {e.eraser.name} not appended, gate {float(coeffs[i]):.3f})")
    return negative, notes


def geom_regional(model, clip, stack: EraserStack, coeffs) -> tuple[object, list[str]]:
    """``model`` with the regional-negation patch of every enabled Geom-Erasing entry set to it
    (``negation="regional"``) whose coefficient (from the positive) is >= 0.5, at the file's strength, as the
    Geom-Erasing Regional Negation node attaches it; and report lines. One such entry per MODEL, and not beside
    All-but-One guidance (both extend the same batched prediction): refused with the file named."""
    from ..adapters.errors import UnsupportedEraser
    from ..adapters.geom import regional_strength, uses_regional_rows
    from .nodes_geom_regional import patched_model

    entries = [(i, e) for i, e in enumerate(stack.entries) if e.enabled and uses_regional_rows(e.eraser)]
    notes = []
    firing = [(i, e) for i, e in entries if float(coeffs[i]) >= 0.5]
    if len(firing) > 1:
        raise UnsupportedEraser(f"{', '.join(e.eraser.source or e.eraser.name for _, e in firing)}: one Geom-Erasing "
                                "eraser in regional negation per MODEL in this version")
    for i, e in entries:
        if float(coeffs[i]) < 0.5:
            notes.append(f"(Geom-Erasing: {e.eraser.name} regional negation not attached, gate {float(coeffs[i]):.3f})")
            continue
        model, runtime = patched_model(model, clip, e.eraser, regional_strength(e.eraser))
        notes.append(f"(Geom-Erasing: {e.eraser.name} as regional negation x{regional_strength(e.eraser):g} on "
                     f"{len(runtime.region[1])} cell(s); the negative is left as it is)")
    return model, notes


class TextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptGateTextEncode",
            display_name="CLIP Text Encode (ConceptGate)",
            category=CATEGORY,
            description=("CLIP Text Encode that also records the prompt's tokens, so ConceptGate gates can use the "
                         "token-overlap half of Facilitated Transport, and its text, for All-but-One erasers in the "
                         "in-prompt form. Otherwise identical to CLIP Text Encode."),
            inputs=[
                io.String.Input("text", multiline=True, dynamic_prompts=True, tooltip="The prompt."),
                io.Clip.Input("clip", tooltip="The CLIP model used for encoding the text."),
            ],
            outputs=[io.Conditioning.Output("conditioning", display_name="CONDITIONING",
                                            tooltip="The encoded prompt, tagged with its tokens for ConceptGate.")],
        )

    @classmethod
    def execute(cls, text, clip) -> io.NodeOutput:
        tokens = clip.tokenize(text)
        conditioning = clip.encode_from_tokens_scheduled(tokens)
        ids = comfy_glue.window_ids(clip, tokens)
        tokens = comfy_glue.content_tokens(clip, tokens)
        tags = {comfy_glue.TOKENS_KEY: sorted(tokens), comfy_glue.WINDOW_IDS_KEY: ids, comfy_glue.TEXT_KEY: text}
        return io.NodeOutput([[c, dict(extra, **tags)] for c, extra in conditioning])


NODES = [LoadEraser, LoadStack, AddToStack, ApplyStack, TextEncode]

"""UCE / RECE closed-form erasure as a ComfyUI node (issue 5), and the ComfyUI edit host.

Graph shape::

    Load Checkpoint --MODEL, CLIP--> Erase Concepts (UCE / RECE) --MODEL--> KSampler
                                                  \\--ERASER--> Add to Eraser Stack -> Apply Eraser Stack

The node computes the edit on the MODEL it receives (with any LoRAs already applied to it) and
the CLIP that encodes the prompts, returns a clone of MODEL carrying the edit as ComfyUI LoRA
patches (the loaded weights are never written), the edit as a CONCEPTGATE_ERASER (stack and gate it
per prompt instead), and optionally saves it into ``models/conceptgate``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re

import torch

import comfy.lora
import comfy.model_management
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..adapters.gate import GateSettings, to_window
from ..adapters.stack import EraserStack
from ..adapters.fingerprint import _tensor_digest
from ..adapters.rece import CONCEPT_TYPES, EditHost, EditSpec, compute_edit, is_cross_attention_kv, save_edit
from . import comfy_glue
from .nodes_conceptgate import FOLDER, SHIPPED
from .v3 import CATEGORY, Eraser, check_choices

log = logging.getLogger("conceptgate")
EDIT_CONTEXTS = ("bare", "generic", "toy")  # EditSpec.context ("bare" = the published edit)


class ComfyEditHost(EditHost):
    """A ComfyUI MODEL (``ModelPatcher``) + CLIP, read exactly as the sampler will use them."""

    kind = "comfyui"

    def __init__(self, model, clip):
        self.model = model
        self.clip = clip
        names = comfy_glue.module_names(model)
        self.keys = {n: p + ".weight" for n, p in names.items() if is_cross_attention_kv(n)}
        if not self.keys:
            raise ValueError("this MODEL has no cross-attention attn2.to_k/to_v weights ComfyUI can name")
        fam = comfy_glue.unet_layout(model).family
        self.base_family = None if fam == "custom" else fam

    def cross_attention_weights(self) -> dict:
        """Base weight (ComfyUI's backup while another clone is patched in) + this patcher's own
        patches (LoRAs, merges), through ComfyUI's ``get_key_patches`` and ``comfy.lora.calculate_weight``."""
        return comfy_glue.effective_attention_weights(self.model)

    @staticmethod
    def token_ids(tokens: dict) -> torch.Tensor:
        """The first window's token ids of a ``clip.tokenize`` result (SDXL: the ``l`` list)."""
        first = tokens.get("l") or next(iter(tokens.values()))
        chunk = first[0]
        ids = [t[0] if isinstance(t[0], int) else -1 for t in chunk[:77]]  # -1: an embedding vector
        ids += [ids[-1]] * (77 - len(ids))
        return torch.tensor(ids, dtype=torch.long)

    @torch.no_grad()
    def encode(self, texts):
        hidden, ids = [], []
        for text in texts:
            tokens = self.clip.tokenize(text)
            cond = self.clip.encode_from_tokens(tokens)   # what CLIPTextEncode hands the sampler
            hidden.append(to_window(cond.float()).cpu())
            ids.append(self.token_ids(tokens))
        return torch.cat(hidden), torch.stack(ids)

    def gate_encoder(self):
        return comfy_glue.ComfyTextEncoder(self.clip)        # what Apply Eraser Stack gates with

    def text_fingerprint(self) -> str:
        """CLIP weights (sampled, with this CLIP's own patches applied) + the CLIP-skip layer."""
        h = hashlib.sha256(f"comfyui|layer={self.clip.layer_idx}|{type(self.clip.cond_stage_model).__name__}".encode())
        for key, entry in self.clip.patcher.get_key_patches().items():
            weight, convert = entry[0]
            if not weight.is_floating_point():
                continue
            if len(entry) > 1:
                weight = comfy.lora.calculate_weight(entry[1:], convert(weight.to(torch.float32, copy=True), inplace=True), key)
            _tensor_digest(h, key, weight, 256, False)
        return h.hexdigest()[:16]


def _lines(text: str) -> list[str]:
    return [t.strip() for t in re.split(r"[\n]", text or "") if t.strip()]


def _guide(text: str) -> str | None:
    if text == "":
        return None           # the type's default
    if text.strip() in ('""', "''"):
        return ""             # the empty prompt
    return text


def edited_model(model, eraser, strength: float):
    """A clone of ``model`` with ``eraser`` as ComfyUI LoRA patches at ``strength``."""
    stack = EraserStack().with_eraser(eraser, strength=strength, gate=GateSettings(rule="always"))
    return comfy_glue.weight_patched(model, stack, torch.tensor([float(strength)]))


class EraseConcepts(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptGateEraseConcepts",
            display_name="Erase Concepts (UCE / RECE)",
            category=CATEGORY,
            description=("Erases concepts from MODEL with a closed-form cross-attention edit (UCE, or RECE = UCE + "
                         "adversarial-embedding epochs), computed in seconds on this model and CLIP. Returns the model "
                         "with the edit as LoRA patches (your loaded weights are not changed) and the edit as an eraser "
                         "you can stack and gate per prompt instead. Results are cached per model, CLIP and settings."),
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The model to erase from. The edit depends on its weights (LoRAs "
                               "already applied to it included), so compute it on the model you sample with."),
                io.Clip.Input("clip", tooltip="The CLIP that encodes your prompts (CLIP skip included): the edit uses "
                              "its text vectors exactly as the sampler sees them."),
                io.Combo.Input("method", options=["UCE", "RECE"], default="UCE", tooltip="UCE: one closed-form "
                               "edit mapping the concepts onto the guide. RECE: UCE, then epochs that derive an "
                               "embedding regenerating the concept and erase it too (more robust to adversarial "
                               "prompts)."),
                io.String.Input("concepts", multiline=True, default="", tooltip="Concepts to erase, one per line. "
                                "Several lines are erased in one joint solve."),
                io.Combo.Input("concept_type", options=list(CONCEPT_TYPES), default="object", tooltip="Sets RECE's "
                               "defaults: object (lam_reg 0.1, 1 epoch, guide ' '), object_hard (lam_reg 0.001), style "
                               "(0.001, 1 epoch, guide 'art'), nudity (0.1, 3 epochs, guide ' '), unsafe (0.1, 2 "
                               "epochs)."),
                io.String.Input("guide", default="", tooltip="What the concepts are mapped onto. Empty: the type's "
                                "default (' ' or 'art'); \"\" means the empty prompt; or a concept such as 'a dog'."),
                io.String.Input("preserve", multiline=True, default="", tooltip="Concepts to keep unchanged, one per "
                                "line (e.g. other artists when erasing a style)."),
                io.Int.Input("epochs", default=0, min=0, max=20, tooltip="RECE epochs; 0 = the type's default. "
                             "Ignored by UCE."),
                io.Float.Input("lam", default=0.5, min=1e-4, max=100.0, step=0.01, tooltip="UCE ridge lambda (keeps "
                               "directions outside the edited vectors; default 0.5 as published)."),
                io.Float.Input("strength", default=1.0, min=-4.0, max=4.0, step=0.05, tooltip="Strength of the patch "
                               "on the returned MODEL (1.0 = the exact edit). The eraser output is unaffected."),
                io.Float.Input("lam_reg", default=0.0, min=0.0, max=10.0, step=0.001, optional=True, tooltip="RECE's "
                               "regulariser of the adversarial embedding; 0 = the type's default."),
                io.Float.Input("erase_scale", default=1.0, min=0.01, max=100.0, step=0.05, optional=True,
                               tooltip="Weight of the erase term (a_e). Lower it if images of other things degrade."),
                io.Float.Input("preserve_scale", default=0.0, min=0.0, max=100.0, step=0.05, optional=True,
                               tooltip="Weight of the preserve term (a_p); 0 = the published rule max(0.1, 1/#preserve "
                               "prompts)."),
                io.Combo.Input("convention", options=["aligned_tail", "last_token"], default="aligned_tail",
                               optional=True, tooltip="Which token vectors are edited: aligned_tail (old UCE code and "
                               "RECE: last word + end + padding tokens) or last_token (newer UCE code: one vector per "
                               "prompt)."),
                io.String.Input("save_name", default="", optional=True, tooltip="If set, the eraser is also saved as "
                                "models/conceptgate/<save_name>.safetensors (loads in Load Eraser and in stock LoRA "
                                "loaders)."),
                # ConceptGate's in-context edit (not in the papers); last, so saved graphs keep their widget order
                io.String.Input("synonyms", multiline=True, default="", optional=True, tooltip="Other names of the "
                                "concepts, one per line: erased with them and named to their gate (ConceptGate's "
                                "addition, not in the papers)."),
                io.Combo.Input("context", options=list(EDIT_CONTEXTS), default="bare", optional=True,
                               tooltip="bare: the published edit of the words alone. generic: also erase every name, "
                               "and keep every preserve word, inside generic caption sentences (stronger on prompts "
                               "that mention the concept in a sentence). toy: the toy world's captions (toy model)."),
            ],
            outputs=[
                io.Model.Output("model_out", display_name="model",
                                tooltip="MODEL with the edit applied (always on, at 'strength')."),
                Eraser.Output("eraser", display_name="eraser",
                              tooltip="The edit as a ConceptGate eraser: add it to a stack to gate it per prompt."),
                io.String.Output("report", display_name="report",
                                 tooltip="Rank, reconstruction error, time and file size of the edit."),
            ],
            hidden=[io.Hidden.unique_id],  # the node whose progress bar moves
        )

    @classmethod
    def validate_inputs(cls, method=None, concept_type=None, convention=None, context=None) -> bool | str:
        return check_choices(cls, method=method, concept_type=concept_type, convention=convention, context=context)

    @classmethod
    def execute(cls, model, clip, method, concepts, concept_type, guide, preserve, epochs, lam, strength,
                lam_reg=0.0, erase_scale=1.0, preserve_scale=0.0, convention="aligned_tail",
                save_name="", synonyms="", context="bare") -> io.NodeOutput:
        names = _lines(concepts)
        if not names:
            raise ValueError("Erase Concepts: enter at least one concept (one per line)")
        spec = EditSpec(method=method.lower(), concepts=tuple(names), guide=_guide(guide),
                        preserve=tuple(_lines(preserve)), concept_type=concept_type,
                        epochs=int(epochs) or None, lam=float(lam), erase_scale=float(erase_scale),
                        preserve_scale=float(preserve_scale) or None, lam_reg=float(lam_reg) or None,
                        convention=convention, synonyms=tuple(_lines(synonyms)), context=context)
        if context == "toy":
            from .. import toyworld  # noqa: F401  (importing it registers the toy prompt context)
        total = 1 + spec.resolved().get("rece", {}).get("epochs", 0)
        bar = comfy.utils.ProgressBar(total, node_id=cls.hidden.unique_id if cls.hidden is not None else None)

        def progress(done, n):
            comfy.model_management.throw_exception_if_processing_interrupted()
            bar.update_absolute(done, n)

        name = save_name.strip() or None
        outcome = compute_edit(ComfyEditHost(model, clip), spec, progress=progress, name=name)
        if name:
            # the first writable conceptgate folder, never the package's shipped (read-only) one
            folder = next((p for p in folder_paths.get_folder_paths(FOLDER)
                           if os.path.abspath(p) != os.path.abspath(SHIPPED)), None)
            if folder is None:
                raise ValueError("Erase Concepts: no models/conceptgate folder to save into (only the shipped one, "
                                 "which is read-only); clear save_name or add the folder")
            fname = name if name.endswith(".safetensors") else name + ".safetensors"
            save_edit(outcome, os.path.join(folder, os.path.basename(fname)))
        patched = edited_model(model, outcome.eraser, strength)
        text = outcome.text()
        log.info("ConceptGate %s", text.replace("\n", "; "))
        return io.NodeOutput(patched, outcome.eraser, text, ui={"text": [text]})


NODES = [EraseConcepts]

"""Stand-in webui model objects around real tiny networks (test fixtures, not host modules).

``A1111Model``: ``sd_model.model.diffusion_model`` is a real LDM ``UNetModel`` (ComfyUI's port of
``ldm.modules.diffusionmodules.openaimodel``, the module tree A1111 loads for SD1.x);
``cond_stage_model`` is shaped like A1111's ``FrozenCLIPEmbedderWithCustomWords`` (``sd_hijack_clip``):
``wrapped.transformer`` a real CLIP text model whose token embedding is wrapped for textual inversion
(``EmbeddingsWithFixes``: the wrapped ``nn.Embedding`` plus per-row ``fixes``), ``tokenize`` (ids without
start/end), ``id_start`` / ``id_end`` / ``id_pad`` and ``encode_with_transformers(tokens)`` (CLIP skip from
``opts.CLIP_stop_at_last_layers``, final layer norm). ``get_learned_conditioning`` encodes like A1111 for
plain prompts (75-token chunks ``[start, tokens, end, padding]``, ``BREAK`` starts a new chunk, chunks
concatenated) and returns SDXL's dict form when ``sdxl=True``. Emphasis weights are not modelled (the glue
reads whatever the host encoded). ``ForgeModel`` adds ``forge_objects.unet`` (a stand-in patcher) and Forge
HEAD's ``text_processing_engine`` (the same encoder object: Forge's ``ClassicTextProcessingEngine`` has the
same methods).
"""
import copy
from types import SimpleNamespace

import torch


class EmbeddingsWithFixes(torch.nn.Module):
    """A1111's textual-inversion wrapper of the token embedding (only the pass-through and ``fixes``)."""

    def __init__(self, wrapped, owner):
        super().__init__()
        self.wrapped = wrapped
        self.owner = owner

    def forward(self, input_ids):
        fixes, self.owner.fixes = self.owner.fixes, None
        out = self.wrapped(input_ids)
        if not fixes:
            return out
        rows = []
        for row_fixes, tensor in zip(fixes, out):
            for offset, vec in row_fixes:
                tensor = torch.cat([tensor[:offset + 1], vec.to(tensor), tensor[offset + 1 + vec.shape[0]:]])
            rows.append(tensor)
        return torch.stack(rows)


class CondStageModel(torch.nn.Module):
    chunk_length = 75

    def __init__(self, tokenizer, text_encoder):
        super().__init__()
        self.tokenizer = tokenizer
        self.wrapped = SimpleNamespace(tokenizer=tokenizer)
        transformer = copy.deepcopy(text_encoder)
        self.hijack = SimpleNamespace(fixes=None)  # A1111: cond_stage_model.hijack.fixes
        emb = getattr(transformer, "text_model", transformer).embeddings  # transformers 5 flattened text_model
        emb.token_embedding = EmbeddingsWithFixes(emb.token_embedding, self.hijack)
        self.transformer = transformer
        self.wrapped.transformer = transformer
        self.text_encoder = SimpleNamespace(transformer=transformer)  # Forge's engine layout
        self.id_start, self.id_end, self.id_pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.eos_token_id

    def tokenize(self, texts):
        return self.tokenizer(list(texts), truncation=False, add_special_tokens=False)["input_ids"]

    def encode_with_transformers(self, tokens):
        from modules import shared

        skip = int(shared.opts.data.get("CLIP_stop_at_last_layers", 1))
        out = self.transformer(input_ids=tokens, output_hidden_states=skip > 1)
        if skip > 1:
            return getattr(self.transformer, "text_model", self.transformer).final_layer_norm(out.hidden_states[-skip])
        return out.last_hidden_state

    def chunks(self, text):
        chunks = []
        for part in text.split("BREAK"):
            ids = self.tokenize([part.strip()])[0] if part.strip() else []
            for a in range(0, max(len(ids), 1), self.chunk_length):
                piece = ids[a:a + self.chunk_length]
                chunks.append([self.id_start] + piece + [self.id_end] * (self.chunk_length + 1 - len(piece)))
        return chunks

    @torch.no_grad()
    def encode(self, texts):
        per_text = [self.chunks(t) for t in texts]
        n = max(len(c) for c in per_text)
        empty = [self.id_start] + [self.id_end] * (self.chunk_length + 1)
        zs = []
        for k in range(n):  # chunk k of every text at once; shorter texts get empty chunks (A1111's rule)
            tokens = torch.tensor([c[k] if k < len(c) else empty for c in per_text])
            zs.append(self.encode_with_transformers(tokens))
        return torch.cat(zs, 1)


class A1111Model:
    def __init__(self, diffusion_model, text_encoder, tokenizer, sdxl=False):
        self.model = SimpleNamespace(diffusion_model=diffusion_model)
        self.cond_stage_model = CondStageModel(tokenizer, text_encoder)
        self.is_sdxl = sdxl
        self.encoded = []  # every text the host encoded

    @torch.no_grad()
    def get_learned_conditioning(self, texts):
        rows = []
        for text in texts:  # one text at a time, as the tests' expectations encode
            self.encoded.append(text)
            rows.append(self._engine().encode([text]))
        length = max(r.shape[1] for r in rows)
        rows = [torch.cat([r] + [self._engine().encode([""])] * ((length - r.shape[1]) // 77), 1) for r in rows]
        out = torch.cat(rows)
        if self.is_sdxl:
            return {"crossattn": out, "vector": out[:, 0, :8].clone()}
        return out

    def _engine(self):
        return self.cond_stage_model


class ForgeModel(A1111Model):
    def __init__(self, unet_patcher, text_encoder, tokenizer, legacy=False):
        super().__init__(unet_patcher.model.diffusion_model, text_encoder, tokenizer)
        self.forge_objects = SimpleNamespace(unet=unet_patcher, clip=None, vae=None, clipvision=None)
        self.forge_objects_original_unet = unet_patcher
        if not legacy:  # Forge HEAD: no cond_stage_model; the text processing engine tokenizes and encodes
            self.text_processing_engine = self.cond_stage_model
            del self.cond_stage_model

    def _engine(self):
        return getattr(self, "text_processing_engine", None) or self.cond_stage_model

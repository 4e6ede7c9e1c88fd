"""Stand-in webui model objects around real tiny networks (test fixtures, not host modules).

``A1111Model``: ``sd_model.model.diffusion_model`` is a real LDM ``UNetModel`` (ComfyUI's port of
``ldm.modules.diffusionmodules.openaimodel``, the module tree A1111 loads for SD1.x);
``get_learned_conditioning`` encodes like A1111's SD1 embedder for plain prompts (start token,
words, end-token padding to 77, CLIP skip 1, final layer norm; ``BREAK`` starts a new 77-token
chunk) and returns SDXL's dict form when ``sdxl=True``; ``cond_stage_model.tokenize`` returns ids
without start/end tokens. Emphasis weights are not modelled (the glue reads whatever the host
encoded). ``ForgeModel`` adds ``forge_objects.unet`` (a stand-in patcher) and Forge HEAD's
``text_processing_engine.tokenize``.
"""
from types import SimpleNamespace

import torch

from conceptgate.adapters.diffusers_host import DiffusersTextEncoder


class CondStageModel:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.id_start, self.id_end, self.id_pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.eos_token_id

    def tokenize(self, texts):
        return self.tokenizer(list(texts), truncation=False, add_special_tokens=False)["input_ids"]


class A1111Model:
    def __init__(self, diffusion_model, text_encoder, tokenizer, sdxl=False):
        self.model = SimpleNamespace(diffusion_model=diffusion_model)
        self.cond_stage_model = CondStageModel(tokenizer)
        self.encoder = DiffusersTextEncoder(tokenizer, text_encoder)
        self.is_sdxl = sdxl
        self.encoded = []  # every text the host encoded

    @torch.no_grad()
    def get_learned_conditioning(self, texts):
        rows = []
        for text in texts:
            self.encoded.append(text)
            chunks = [c.strip() for c in text.split("BREAK")]
            hidden = self.encoder(chunks).hidden  # [k, 77, D]
            rows.append(hidden.reshape(1, -1, hidden.shape[-1]))
        out = torch.cat(rows)
        if self.is_sdxl:
            return {"crossattn": out, "vector": torch.zeros(out.shape[0], 8)}
        return out


class ForgeModel(A1111Model):
    def __init__(self, unet_patcher, text_encoder, tokenizer, legacy=False):
        super().__init__(unet_patcher.model.diffusion_model, text_encoder, tokenizer)
        self.forge_objects = SimpleNamespace(unet=unet_patcher, clip=None, vae=None, clipvision=None)
        self.forge_objects_original_unet = unet_patcher
        if not legacy:  # Forge HEAD: no cond_stage_model; the text processing engine tokenizes
            self.text_processing_engine = self.cond_stage_model
            del self.cond_stage_model

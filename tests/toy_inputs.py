"""Inputs shared by the toy-model tests."""

import torch


def latents(seeds):
    """One 4x16x16 starting latent per seed (the toy model's 64x64 pixels), the same for every test."""
    return torch.stack([torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(s)) for s in seeds])

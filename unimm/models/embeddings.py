"""Embeddings shared by the backbone input and the DDT head: timesteps, 2D positions, latent patches."""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn


def sinusoidal_features(values: torch.Tensor, size: int, max_period: float = 10000.0) -> torch.Tensor:
    """values (N,) -> (N, size) cos/sin features at geometric frequencies (the DiT / DDPM timestep features)."""
    half = size // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=values.device, dtype=torch.float32) / half)
    angles = values.float()[:, None] * frequencies[None]
    features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if size % 2:
        features = torch.cat([features, torch.zeros_like(features[:, :1])], dim=-1)
    return features


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> (N, hidden): sinusoidal features of 1000 t through a two-layer MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = sinusoidal_features(t * 1000.0, self.frequency_size)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


def sincos_2d_positions(height: int, width: int, size: int, device=None) -> torch.Tensor:
    """Fixed 2D sin-cos position codes (MAE / DiT), (height * width, size) in row-major token order.

    Computed for any grid, so one model serves several output sizes.
    """
    if size % 4:
        raise ValueError(f"2D sin-cos positions need a width divisible by 4, got {size}")
    rows, columns = torch.meshgrid(
        torch.arange(height, device=device, dtype=torch.float32),
        torch.arange(width, device=device, dtype=torch.float32),
        indexing="ij",
    )
    quarter = size // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    parts = []
    for coordinate in (rows.flatten(), columns.flatten()):
        angles = coordinate[:, None] * frequencies[None]
        parts += [torch.sin(angles), torch.cos(angles)]
    return torch.cat(parts, dim=-1)


def patchify(latents: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/P * W/P, C * P * P), tokens in row-major order."""
    return rearrange(latents, "b c (h p) (w q) -> b (h w) (c p q)", p=patch_size, q=patch_size)


def unpatchify(tokens: torch.Tensor, patch_size: int, height: int, width: int) -> torch.Tensor:
    """(B, h * w, C * P * P) -> (B, C, h * P, w * P) for a token grid of height x width."""
    return rearrange(tokens, "b (h w) (c p q) -> b c (h p) (w q)", h=height, w=width, p=patch_size, q=patch_size)

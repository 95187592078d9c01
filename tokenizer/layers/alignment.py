"""ReaLS's alignment heads: two 2-layer MLPs from the VAE latent to the frozen VFM's patch tokens and CLS token."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AlignmentHeads(nn.Module):
    def __init__(self, latent_channels: int, feature_channels: int, hidden_size: int, feature_grid: int):
        super().__init__()
        self.feature_grid = feature_grid
        self.patch_head = nn.Sequential(
            nn.Linear(latent_channels, hidden_size), nn.GELU(), nn.Linear(hidden_size, feature_channels)
        )
        self.cls_head = nn.Sequential(
            nn.Linear(latent_channels, hidden_size), nn.GELU(), nn.Linear(hidden_size, feature_channels)
        )

    def forward(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latent (B, C, h, w) -> patch predictions (B, g*g, D) on the VFM grid and a CLS prediction (B, D)."""
        if latent.shape[-1] != self.feature_grid:
            # The VAE latent (e.g. 32×32 for f8) is pooled onto the VFM's token grid (16×16).
            latent = F.adaptive_avg_pool2d(latent, self.feature_grid)
        tokens = latent.flatten(2).transpose(1, 2)  # (B, g*g, C)
        return self.patch_head(tokens), self.cls_head(tokens.mean(1))

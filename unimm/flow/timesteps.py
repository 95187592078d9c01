"""Training timesteps: logit-normal draws, then the resolution/channel-dependent shift (PS-VAE §4.1)."""

from __future__ import annotations

import math

import torch

# The reference latent the shift is measured against: 16 channels, patch size 1 (PS-VAE §4.1).
BASE_CHANNELS = 16
BASE_PATCH_SIZE = 1


def training_shift(channels: int, patch_size: int = 1) -> float:
    """s = sqrt(C * P^2 / (C_base * P_base^2)): more numbers per token need more noise to hide the signal.

    Checks from the paper: Flux-VAE (16, 2) -> 2; DINOv2-B features (768, 1) -> 6.93; PS-VAE 96c (96, 1) -> 2.449.
    """
    if channels < 1 or patch_size < 1:
        raise ValueError(f"channels and patch size must be positive, got {channels} and {patch_size}")
    return math.sqrt(channels * patch_size**2 / (BASE_CHANNELS * BASE_PATCH_SIZE**2))


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t' = s * t / (1 + (s - 1) * t): keeps 0 and 1 fixed and moves mass towards t = 1 (noise) for s > 1."""
    return shift * t / (1 + (shift - 1) * t)


def logit_normal_timesteps(
    count: int, mean: float = 0.0, std: float = 1.0, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """t = sigmoid(N(mean, std^2)), shape (count,)."""
    normal = torch.randn(count, generator=generator, device=device if generator is None else generator.device)
    return torch.sigmoid(normal * std + mean).to(device)


def training_timesteps(
    count: int, shift: float, mean: float = 0.0, std: float = 1.0, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """Logit-normal timesteps, shifted: what every training step draws, shape (count,)."""
    return shift_timesteps(logit_normal_timesteps(count, mean, std, generator, device), shift)

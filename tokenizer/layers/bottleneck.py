"""Latent regularisers: the Gaussian (KL) bottleneck, GAE's RMSNorm + dynamic noise, RAE's noise augmentation.

All take and return channel-first maps (B, C, h, w). `forward` returns the sampled latent used for
decoding during training and a dict of what the losses need; `mode` is the deterministic latent
that `encode` returns.
"""

from __future__ import annotations

import torch
from torch import nn


class GaussianBottleneck(nn.Module):
    """Diagonal Gaussian posterior from (B, 2C, h, w) moments; z = mean + std·ε (VAE, PS-VAE, S-AE, ReaLS)."""

    def __init__(self, logvar_range: tuple[float, float] = (-30.0, 20.0)):
        super().__init__()
        # The same clamp as LDM: keeps exp(logvar) finite early in training.
        self.logvar_range = logvar_range

    def split(self, moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(*self.logvar_range)

    def mode(self, moments: torch.Tensor) -> torch.Tensor:
        return self.split(moments)[0]

    def forward(self, moments: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mean, logvar = self.split(moments)
        latent = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if sample else mean
        return latent, {"mean": mean, "logvar": logvar}


class RMSNormNoiseBottleneck(nn.Module):
    """GAE: μ = RMSNorm(x) without parameters, then z = μ + |σ|·ε with σ ~ N(0, C_σ) drawn per sample.

    The parameter-free RMSNorm puts μ on a sphere of radius sqrt(C) (per position, over channels),
    which replaces the KL term; the per-sample noise scale ("dynamic noise") trains the decoder to
    reconstruct from latents at many noise levels. We read N(0, C_σ) as standard deviation C_σ
    (GAE Table 13: "latent standard deviation C_σ = 0.2").
    """

    def __init__(self, noise_std: float = 0.2, eps: float = 1e-6):
        super().__init__()
        self.noise_std = noise_std
        self.eps = eps

    def mode(self, features: torch.Tensor) -> torch.Tensor:
        return features * torch.rsqrt(features.pow(2).mean(dim=1, keepdim=True) + self.eps)

    def forward(self, features: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mean = self.mode(features)
        if not sample or self.noise_std == 0:
            return mean, {"mean": mean}
        sigma = torch.randn(mean.shape[0], 1, 1, 1, device=mean.device, dtype=mean.dtype) * self.noise_std
        return mean + sigma.abs() * torch.randn_like(mean), {"mean": mean}


class NoiseAugmentation(nn.Module):
    """RAE: the latent is the raw encoder feature; training adds n ~ N(0, σ²I) with σ ~ |N(0, τ²)|
    so the decoder tolerates the imperfect latents a diffusion model produces."""

    def __init__(self, noise_tau: float = 0.8):
        super().__init__()
        self.noise_tau = noise_tau

    def mode(self, features: torch.Tensor) -> torch.Tensor:
        return features

    def forward(self, features: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not sample or self.noise_tau == 0:
            return features, {"mean": features}
        sigma = (torch.randn(features.shape[0], 1, 1, 1, device=features.device) * self.noise_tau).abs()
        return features + sigma.to(features.dtype) * torch.randn_like(features), {"mean": features}


def build_bottleneck(kind: str, noise_std: float) -> nn.Module:
    if kind == "gaussian":
        return GaussianBottleneck()
    if kind == "rmsnorm_noise":
        return RMSNormNoiseBottleneck(noise_std)
    if kind == "noise_augmentation":
        return NoiseAugmentation(noise_std)
    raise ValueError(f"unknown bottleneck {kind!r}; use gaussian, rmsnorm_noise or noise_augmentation")


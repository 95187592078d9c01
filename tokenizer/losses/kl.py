"""KL divergence of a diagonal Gaussian posterior to the standard normal prior."""

from __future__ import annotations

import torch
from torch import Tensor

from tokenizer.losses.shapes import require_same_shape


def gaussian_kl_loss(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)), summed over every non-batch dimension, averaged over the batch.

    Per element the divergence is 0.5·(mean² + var − 1 − logvar). Summing over the latent dimensions and
    averaging over the batch is LDM's convention (``DiagonalGaussianDistribution.kl`` summed over
    C, H, W, then ``sum / batch_size``); the paper weights (ReaLS 2e-5, S-AE 1e-6) assume that scale,
    so it is kept here rather than a per-element mean. ``mean`` and ``logvar`` have the same shape
    (B, ...); clamping logvar (LDM uses [−30, 20]) is the bottleneck's job, not this loss's.
    """
    require_same_shape("gaussian_kl_loss", mean, logvar)
    if mean.dim() < 2:
        raise ValueError(
            f"gaussian_kl_loss expects a batch dimension plus latent dimensions, got shape {tuple(mean.shape)}"
        )
    per_element = 0.5 * (mean.pow(2) + torch.exp(logvar) - 1.0 - logvar)  # (B, ...)
    per_sample = per_element.flatten(start_dim=1).sum(dim=1)  # (B,)
    return per_sample.mean()

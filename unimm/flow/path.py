"""The straight (rectified-flow) path between data and noise, its velocity, and the training loss."""

from __future__ import annotations

import torch


def _broadcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t (B,) -> (B, 1, ..., 1) so it scales a (B, ...) tensor per sample."""
    return t.reshape(t.shape[0], *([1] * (like.dim() - 1))).to(like)


def interpolate(clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) * x_0 + t * noise; clean and noise (B, ...), t (B,) in [0, 1]."""
    t = _broadcast(t, clean)
    return (1 - t) * clean + t * noise


def velocity_target(clean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d x_t / d t along the path: noise - x_0 (constant in t)."""
    return noise - clean


def flow_matching_loss(predicted_velocity: torch.Tensor, clean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the predicted and the true velocity, averaged over every element."""
    return (predicted_velocity.float() - velocity_target(clean, noise).float()).pow(2).mean()

"""Pixel reconstruction loss between a decoded image and its input."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from tokenizer.losses.shapes import require_same_shape

PIXEL_LOSS_KINDS = ("l1", "l2", "l1+l2")


def pixel_reconstruction_loss(reconstruction: Tensor, target: Tensor, kind: str = "l1") -> Tensor:
    """Mean pixel error over all elements (batch, channels and pixels).

    ``kind``: "l1" (LDM, S-AE, GAE), "l2" (ReaLS trains with MSE) or "l1+l2" (their unweighted sum).
    Both images are (B, C, H, W) in the same range; the result is a scalar.
    """
    require_same_shape("pixel_reconstruction_loss", reconstruction, target)
    if kind == "l1":
        return F.l1_loss(reconstruction, target)
    if kind == "l2":
        return F.mse_loss(reconstruction, target)
    if kind == "l1+l2":
        return F.l1_loss(reconstruction, target) + F.mse_loss(reconstruction, target)
    raise ValueError(f"unknown pixel loss kind {kind!r}; expected one of {', '.join(PIXEL_LOSS_KINDS)}")

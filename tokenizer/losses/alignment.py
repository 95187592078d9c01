"""ReaLS representation-alignment loss (seed 003, Eq. 2)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from tokenizer.losses.semantic import one_minus_cosine
from tokenizer.losses.shapes import require_same_shape


def alignment_loss(
    predicted: Tensor,
    target: Tensor,
    cosine_weight: float = 0.9,
    smooth_weight: float = 0.1,
    channel_dim: int = -1,
    smooth_beta: float = 1.0,
) -> Tensor:
    """L_align = λ1·L_cos + λ2·L_smMSE with λ1 = 0.9, λ2 = 0.1 (ReaLS §3.2).

    ``predicted`` are the latents mapped by an alignment MLP to the DINOv2 width, ``target`` the frozen
    DINOv2 features (detached here). The caller applies it twice: to patch features (B, N, D') and to
    the CLS feature (B, D') against the MLP of the spatially averaged latent.

    L_cos is the mean over feature vectors of 1 − cos along ``channel_dim``. The paper names the second
    term "smooth mean squared error" without defining it and its code is not public; we read it as the
    smooth-L1 (Huber) loss, which is exactly a (halved) squared error for |error| < ``smooth_beta`` and
    linear beyond, so large feature errors cannot dominate early training. ``smooth_beta`` = 1 is
    PyTorch's default and an assumption, not a paper value. Mean over all elements.
    """
    require_same_shape("alignment_loss", predicted, target)
    target = target.detach()
    cosine = one_minus_cosine(predicted, target, channel_dim)
    smooth = F.smooth_l1_loss(predicted, target, beta=smooth_beta)
    return cosine_weight * cosine + smooth_weight * smooth

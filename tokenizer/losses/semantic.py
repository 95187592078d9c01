"""Feature-space losses that keep a tokenizer's latents semantic.

Targets here are always teacher features (a frozen representation encoder, its frozen copy, or a frozen
downsampler of it), so every function detaches its target: a teacher must never be pulled towards the
student through the loss.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from tokenizer.losses.shapes import require_same_shape


def one_minus_cosine(predicted: Tensor, target: Tensor, channel_dim: int = -1) -> Tensor:
    """Mean over all feature vectors of 1 − cos(predicted, target) along ``channel_dim``; lies in [0, 2].

    Shapes are equal, e.g. (B, N, D) with ``channel_dim=-1``. A zero vector has cosine 0 with anything
    (``F.cosine_similarity`` clamps the norm with eps), so it costs 1 rather than NaN.
    """
    require_same_shape("cosine loss", predicted, target)
    return (1.0 - F.cosine_similarity(predicted, target, dim=channel_dim)).mean()


def semantic_reconstruction_loss(
    predicted: Tensor, target: Tensor, channel_dim: int = -1
) -> dict[str, Tensor]:
    """PS-VAE's semantic reconstruction loss L_s: an ℓ2 loss plus a cosine loss on features.

    ``predicted`` are the semantic decoder's reconstructed features f''_h, ``target`` the representation
    encoder's features f'_h (frozen in stage 1, the frozen original encoder in stage 2), e.g. (B, N, D).
    Returns {"l2": mean squared error, "cosine": mean of 1 − cos along ``channel_dim``,
    "total": l2 + cosine}; the paper gives no relative weight, so the two terms are summed.
    """
    require_same_shape("semantic_reconstruction_loss", predicted, target)
    target = target.detach()
    l2 = F.mse_loss(predicted, target)
    cosine = one_minus_cosine(predicted, target, channel_dim)
    return {"l2": l2, "cosine": cosine, "total": l2 + cosine}


def teacher_feature_loss(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """S-AE's semantic regulariser ‖f_s(x) − f_t(x)‖², as a mean squared error (the paper calls it MSE).

    ``student_features`` come from the encoder being fine-tuned, ``teacher_features`` from its frozen
    copy; both (B, N, D) patch features. The caller multiplies by λ_reg (100 or 200).
    """
    require_same_shape("teacher_feature_loss", student_features, teacher_features)
    return F.mse_loss(student_features, teacher_features.detach())


def semantic_preservation_loss(latent_mean: Tensor, teacher_latent: Tensor) -> Tensor:
    """GAE's semantic preservation loss L_sp = ‖μ − E_sp(f_vfm(x))‖²₂ (seed 002, Eq. 2).

    The paper writes a squared norm but says "the alignment is supervised via MSE loss", so this is the
    mean over all elements (a sum would scale with the latent size and break λ_sp = 1). ``latent_mean`` is
    the RMS-normalised latent mean μ before the dynamic noise, ``teacher_latent`` the frozen downsampler's
    output of the same shape, e.g. (B, h, w, d) or (B, d, h, w).
    """
    require_same_shape("semantic_preservation_loss", latent_mean, teacher_latent)
    return F.mse_loss(latent_mean, teacher_latent.detach())


def cosine_distillation_loss(predicted: Tensor, target: Tensor, channel_dim: int = -1) -> Tensor:
    """GAE's semantic-teacher pre-training loss L_spt: cosine distance to the VFM features.

    The paper (seed 002, Eq. 4) writes L_spt = −cos(D_sp(E_sp(f_vfm(x))), f_vfm(x)) and calls it "the
    cosine distance"; 1 − cos differs only by the constant 1 (same gradients) and is 0 at the optimum,
    so that is what is returned: mean over tokens of 1 − cos along ``channel_dim``. ``predicted`` is the
    small decoder's reconstruction of the VFM patch tokens ``target``, e.g. (B, N, D).
    """
    return one_minus_cosine(predicted, target.detach(), channel_dim)

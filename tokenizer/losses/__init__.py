"""Tokenizer training losses: pixel, perceptual (LPIPS), adversarial, KL and semantic/feature losses."""

from tokenizer.losses.adversarial import (
    LastLayerCapture,
    adaptive_generator_weight,
    adaptive_generator_weight_by_replay,
    adversarial_start_factor,
    generator_adversarial_loss,
    hinge_discriminator_loss,
)
from tokenizer.losses.alignment import alignment_loss
from tokenizer.losses.kl import gaussian_kl_loss
from tokenizer.losses.perceptual import PerceptualLoss
from tokenizer.losses.reconstruction import pixel_reconstruction_loss
from tokenizer.losses.semantic import (
    cosine_distillation_loss,
    semantic_preservation_loss,
    semantic_reconstruction_loss,
    teacher_feature_loss,
)

__all__ = [
    "LastLayerCapture",
    "PerceptualLoss",
    "adaptive_generator_weight",
    "adaptive_generator_weight_by_replay",
    "adversarial_start_factor",
    "alignment_loss",
    "cosine_distillation_loss",
    "gaussian_kl_loss",
    "generator_adversarial_loss",
    "hinge_discriminator_loss",
    "pixel_reconstruction_loss",
    "semantic_preservation_loss",
    "semantic_reconstruction_loss",
    "teacher_feature_loss",
]

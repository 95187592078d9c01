"""Typed configuration of the tokenizer framework: one schema, presets in `configs/tokenizer/*.yaml` as deltas.

A model is: representation encoder (backbone of the latent, or only a frozen teacher) and/or a pixel
encoder -> optional semantic encoder / stride-2 downsampler -> latent regulariser -> pixel decoder
(+ optional semantic decoder, alignment heads, semantic-teacher downsampler).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class RepresentationEncoderConfig:
    name_or_path: str = "facebook/dinov2-base"  # hub id or a local `save_pretrained` directory
    kind: str = ""  # dinov2 | dinov2_registers | dinov3 | siglip | siglip2; empty = from the checkpoint's config
    image_size: int = 224  # the encoder's own input resolution (images are resized inside the adapter)
    # backbone: the latent is computed from its features (PS-VAE, S-AE, RAE);
    # teacher: frozen, only supervises the latent (GAE's semantic teacher, ReaLS's alignment target);
    # none: no representation encoder (plain VAE).
    role: Literal["backbone", "teacher", "none"] = "backbone"


@dataclass
class SemanticConfig:
    """PS-VAE's semantic encoder/decoder: `num_blocks` blocks copied from the encoder + an MLP projection."""

    num_blocks: int = 0  # 0 = no semantic encoder (features go straight to the bottleneck)
    mlp_hidden: int = 0  # hidden width of the projection MLPs; 0 = the encoder's hidden size
    decoder: bool = True  # semantic decoder reconstructing the encoder features (the L_s path)
    # Not in PS-VAE: a training-only linear map from each latent cell to the encoder features, trained with
    # L_s (weight loss.linear_readout_weight). The paper's semantic decoder is three transformer blocks, which
    # can read a non-linear code; this term asks the latent to hold the features linearly as well.
    linear_readout: bool = False


@dataclass
class PixelEncoderConfig:
    """A pixel-space encoder for models whose latent does not come from a representation encoder."""

    kind: Literal["none", "cnn", "vit"] = "none"
    base_channels: int = 128  # cnn
    channel_multipliers: tuple[int, ...] = (1, 2, 4, 4)
    layers_per_block: int = 2
    norm_groups: int = 32
    hidden_size: int = 768  # vit
    depth: int = 12
    num_heads: int = 12


@dataclass
class LatentConfig:
    channels: int = 96
    factor: int = 16  # pixels per latent cell (spatial compression), checked against the encoder's geometry
    bottleneck: Literal["gaussian", "rmsnorm_noise", "noise_augmentation"] = "gaussian"
    noise_std: float = 0.0  # GAE's C_σ (rmsnorm_noise) or RAE's τ (noise_augmentation)
    downsample_layers: int = 0  # S-AE's k: stride-2 convs after the encoder, f = 16·2^k


@dataclass
class PixelDecoderConfig:
    kind: Literal["cnn", "vit"] = "cnn"
    base_channels: int = 128  # cnn: the LDM decoder
    channel_multipliers: tuple[int, ...] = (1, 1, 2, 2, 4)
    layers_per_block: int = 2
    norm_groups: int = 32
    mid_attention: bool = True
    hidden_size: int = 768  # vit: RAE / GAE decoder
    depth: int = 12
    num_heads: int = 12


@dataclass
class AuxiliaryConfig:
    """Training-time heads that shape the latent: GAE's semantic teacher downsampler, ReaLS's alignment MLPs."""

    semantic_downsampler: bool = False  # GAE E_sp (trained first with D_sp, then frozen)
    downsampler_heads: int = 8
    teacher_decoder_depth: int = 4
    teacher_decoder_hidden: int = 512
    alignment_heads: bool = False  # ReaLS
    alignment_hidden: int = 1024


@dataclass
class TokenizerModelConfig:
    family: Literal["psvae", "sae", "gae", "reals", "rae", "vae"] = "psvae"
    image_size: int = 256  # pixel resolution reconstructed by the decoder
    encoder: RepresentationEncoderConfig = field(default_factory=RepresentationEncoderConfig)
    semantic: SemanticConfig = field(default_factory=SemanticConfig)
    pixel_encoder: PixelEncoderConfig = field(default_factory=PixelEncoderConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    pixel_decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)
    auxiliary: AuxiliaryConfig = field(default_factory=AuxiliaryConfig)


@dataclass
class LossConfig:
    pixel_kind: Literal["l1", "l2", "l1+l2"] = "l1"
    pixel_weight: float = 1.0
    perceptual_weight: float = 1.0  # LPIPS-VGG
    # Local VGG16 weights; empty = UNIMM_VGG16_WEIGHTS or the torch hub cache; "random" = untrained (tests only).
    perceptual_backbone: str = ""
    adversarial_weight: float = 0.5
    adversarial_start_step: int = 50001  # LDM's delayed discriminator start
    adaptive_adversarial_weight: bool = True
    discriminator_channels: int = 64
    discriminator_layers: int = 3
    discriminator_norm: Literal["batch", "group", "none"] = "group"
    kl_weight: float = 1e-6
    semantic_weight: float = 0.0  # PS-VAE's L_s (ℓ2 + cosine on encoder features)
    # PS-VAE states the L_s : L_p ratio two ways (§4.1: 1 : 0.1; §4.4: 0.1 : 1, 0.05 : 1 for SigLIP2).
    # "section_4_4" (the PS-VAE presets' choice) and "section_4_1" pick a reading; "explicit" uses the two
    # weights below (the other families, where there is no ratio to read).
    loss_ratio_reading: Literal["section_4_4", "section_4_1", "explicit"] = "explicit"
    semantic_group_weight: float = 1.0  # multiplies L_s (and L_KL) when loss_ratio_reading = explicit
    pixel_group_weight: float = 1.0  # multiplies L_p (pixel + perceptual + adversarial)
    teacher_feature_weight: float = 0.0  # S-AE's λ_reg·||f_s(x) − f_t(x)||², stage 2
    semantic_preservation_weight: float = 0.0  # GAE's λ_sp
    linear_readout_weight: float = 0.0  # L_s on model.semantic.linear_readout's prediction (psvae; not in the paper)
    alignment_weight: float = 0.0  # ReaLS
    alignment_cosine_weight: float = 0.9
    alignment_smooth_weight: float = 0.1

    def group_weights(self, encoder_kind: str = "") -> tuple[float, float]:
        """(weight on L_s + L_KL, weight on L_p) under the chosen reading of PS-VAE."""
        if self.loss_ratio_reading == "section_4_1":
            return 1.0, 0.1
        if self.loss_ratio_reading == "section_4_4":
            return (0.05 if encoder_kind.startswith("siglip") else 0.1), 1.0
        return self.semantic_group_weight, self.pixel_group_weight


@dataclass
class StageConfig:
    steps: int = 0
    train_encoder: bool = False  # unfreeze the representation encoder
    detach_pixel_latent: bool = False  # PS-VAE stage 1: the pixel decoder sees latent.detach()
    learning_rate: float = 1e-4
    kl_weight: float = -1.0  # < 0: use loss.kl_weight
    teacher_feature_weight: float = -1.0  # < 0: use loss.teacher_feature_weight


@dataclass
class TrainConfig:
    data: str = ""  # shards (glob / comma list) of training images; webdataset or parquet
    val_data: str = ""  # held-out images for reconstruction grids and the final metrics
    data_format: Literal["webdataset", "parquet"] = "webdataset"
    image_field: str = "png;jpg;jpeg;webp;image"
    batch_size: int = 96
    num_workers: int = 2
    teacher_steps: int = 0  # GAE: pre-train the semantic downsampler E_sp with D_sp first
    stage1: StageConfig = field(default_factory=StageConfig)
    stage2: StageConfig = field(default_factory=StageConfig)
    # Pixel-decoder fine-tuning after the other stages (or alone, from `init_from`): the encoder, the
    # bottleneck and the latent statistics stay fixed, so the latent space -- and every generator trained
    # on it -- is unchanged while the decoder learns sharper reconstructions (SD's "ft-MSE" decoders).
    decoder: StageConfig = field(default_factory=StageConfig)
    init_from: str = ""  # a tokenizer save_pretrained directory whose weights (and statistics) start the run
    discriminator_learning_rate: float = 1e-4
    warmup_steps: int = 0  # linear warm-up at the start of every stage
    lr_schedule: Literal["constant", "cosine", "wsd"] = "constant"  # after warm-up, within each stage
    min_lr_ratio: float = 0.0
    cooldown_steps: int = 0  # "wsd": linear decay over each stage's last cooldown_steps
    weight_decay: float = 0.0
    adam_beta1: float = 0.5  # LDM's autoencoder recipe
    adam_beta2: float = 0.9
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    ema_warmup: bool = False  # decay min(ema_decay, (1 + n) / (10 + n)): for short runs
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"  # only used on GPU; the CPU always runs fp32
    deepspeed_config: str = ""  # e.g. configs/deepspeed/zero2.json
    seed: int = 0
    log_every: int = 50
    image_every: int = 1000  # 0: no reconstruction grids
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    stats_images: int = 2048  # images used for the exact per-channel latent statistics after training


@dataclass
class TokenizerTrainingConfig:
    output_dir: str = "runs/tokenizer"
    model: TokenizerModelConfig = field(default_factory=TokenizerModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

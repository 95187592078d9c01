"""The configuration schema of `unimm train` (text-to-image and editing) and of sampling.

YAML presets under configs/t2i and configs/edit hold only deltas against these defaults, which follow PS-VAE
§4.1: lr 1e-4, EMA 0.9999, caption dropout for CFG, 50 Euler steps at inference with shift 3 and CFG 6.5.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from unimm.models.config import GeneratorModelConfig
from unimm.training.hard_negatives import CaptionContrastConfig


@dataclass
class SamplingConfig:
    steps: int = 50
    # Text CFG scale for text-to-image (1 = no guidance); for editing, the text scale of the two-scale rule.
    cfg: float = 6.5
    # Editing: the input-image guidance scale (InstructPix2Pix's s_I).
    image_cfg: float = 1.5
    # Inference shift of the sampling schedule.
    shift: float = 3.0


@dataclass
class GeneratorTrainConfig:
    task: Literal["text_to_image", "edit"] = "text_to_image"
    # Shards (files, directories or globs, comma-separated) or a latent cache made by `unimm cache-latents`.
    data: str = ""
    data_format: Literal["webdataset", "parquet"] = "webdataset"
    image_fields: list[str] = field(default_factory=lambda: ["jpg", "jpeg", "png", "webp", "image"])
    # Every present field is a candidate caption and one is drawn per sample (CC12M: json.caption_llava, ...).
    caption_fields: list[str] = field(default_factory=lambda: ["txt"])
    batch_size: int = 32  # per process
    num_workers: int = 4
    steps: int = 200_000
    learning_rate: float = 1e-4
    warmup_steps: int = 1000
    lr_schedule: Literal["constant", "cosine", "wsd"] = "constant"
    min_lr_ratio: float = 0.0
    # "wsd": the rate decays linearly to min_lr_ratio * learning_rate over the last cooldown_steps before `steps`
    # (resume a constant-rate run with lr_schedule=wsd and a new `steps` to cool it down from where it stopped).
    cooldown_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    ema_warmup: bool = False
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"  # bf16 on GPU; the CPU always runs fp32
    gradient_checkpointing: bool = False
    deepspeed_config: str = ""  # e.g. configs/deepspeed/zero2.json
    # Classifier-free guidance needs the unconditional model: the caption is emptied with this probability.
    caption_dropout: float = 0.1
    # Editing: the input image is dropped with this probability (independently of the caption).
    image_dropout: float = 0.05
    # Logit-normal timesteps t = sigmoid(N(mean, std^2)), then shifted.
    timestep_mean: float = 0.0
    timestep_std: float = 1.0
    # Training shift; 0 = sqrt(C * P^2 / 16) from the tokenizer's latent channels C and the patch size P.
    shift: float = 0.0
    # Editing starts from a text-to-image checkpoint: a pipeline or generator directory (or a run directory).
    init_from: str = ""
    seed: int = 0
    log_every: int = 10
    sample_every: int = 1000
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    # Wall-clock budget of one invocation in minutes (0: none). When it runs out the run ends early as if
    # `steps` were reached: checkpoint + final pipeline at the step it got to (for time-boxed jobs; a later
    # invocation resumes towards `steps`). The step reached is in the logs and the resolved config.
    time_limit_minutes: float = 0.0
    # Prompts of the periodic sample grids (text-to-image) and the sampler used for them.
    sample_prompts: list[str] = field(default_factory=lambda: ["a photo of a red circle", "a photo of two blue squares"])
    sample_steps: int = 25
    # Text-to-image: a second pass on captions whose binding is swapped (relation words, two colours), asking the
    # model to fit the image better under the true caption (unimm/training/hard_negatives.py). Off by default.
    caption_contrast: CaptionContrastConfig = field(default_factory=CaptionContrastConfig)


@dataclass
class GeneratorTrainingConfig:
    output_dir: str = "runs/t2i"
    # A saved tokenizer directory (`<run>/tokenizer` of `unimm train-tokenizer`). A tokenizer preset name is
    # accepted where no weights are needed (`unimm info`).
    tokenizer: str = ""
    model: GeneratorModelConfig = field(default_factory=GeneratorModelConfig)
    train: GeneratorTrainConfig = field(default_factory=GeneratorTrainConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

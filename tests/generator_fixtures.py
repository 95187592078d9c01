"""Tiny generator runs: a tiny saved tokenizer, the Shapes text model at toy size, and a training config.

Same classes and code paths as configs/t2i/mini-shapes.yaml: the text model is a real Qwen2 written with
`save_pretrained` and loaded back with `from_pretrained`; the tokenizer is a real `SemanticAutoencoder`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from data.shapes.text_model import ShapesTextModelConfig, write_shapes_text_model
from tests.tokenizer_fixtures import TINY_IMAGE, tiny_config
from tokenizer.model import SemanticAutoencoder
from unimm.models.config import BackboneConfig, GeneratorModelConfig, HeadConfig
from unimm.train_config import GeneratorTrainConfig, GeneratorTrainingConfig, SamplingConfig

TINY_TEXT_MODEL = ShapesTextModelConfig(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, corpus_scenes=100
)


def write_tiny_tokenizer(encoders, shapes, directory: Path) -> Path:
    """A mini-psvae-shaped tokenizer (8 x 4 x 4 latents at 32 px) with latent statistics, saved and reloadable."""
    torch.manual_seed(0)
    model = SemanticAutoencoder.build(tiny_config("mini-psvae", encoders, shapes, directory / "unused").model).eval()
    channels = model.latent_shape[0]
    model.set_latent_statistics(torch.linspace(-0.1, 0.1, channels), torch.linspace(0.5, 1.5, channels), 64)
    model.save_pretrained(directory / "tokenizer")
    return directory / "tokenizer"


def write_tiny_text_model(directory: Path) -> Path:
    return write_shapes_text_model(directory, TINY_TEXT_MODEL)


def tiny_generator_config(tokenizer: Path, text_model: Path, data: str, output_dir: Path, **train_changes) -> GeneratorTrainingConfig:
    train = GeneratorTrainConfig(
        data=data, image_fields=["png"], caption_fields=["txt"], batch_size=4, num_workers=0, steps=6,
        learning_rate=1e-3, warmup_steps=0, ema_decay=0.9, mixed_precision="no", log_every=1, sample_every=0,
        checkpoint_every=1000, sample_prompts=["a photo of a red circle"], sample_steps=2,
    )
    for key, value in train_changes.items():
        setattr(train, key, value)
    model = GeneratorModelConfig(
        backbone=BackboneConfig(name_or_path=str(text_model), max_text_tokens=24),
        head=HeadConfig(hidden_size=32, depth=2, num_heads=4),
        latent_channels=0,
        timestep_frequency_size=32,
    )
    return GeneratorTrainingConfig(output_dir=str(output_dir), tokenizer=str(tokenizer), model=model, train=train,
                                   sampling=SamplingConfig(steps=3, cfg=2.0, image_cfg=1.5, shift=3.0))


assert TINY_IMAGE == 32  # the fixtures' images, tokenizer and latent grid (4 x 4) assume it

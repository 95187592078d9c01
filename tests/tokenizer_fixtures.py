"""Tiny versions of the tokenizer presets: same classes and code paths, a few thousand parameters.

Every representation encoder is a real `transformers` model of the preset's family, built from a tiny
config, written with `save_pretrained` and loaded back through `from_pretrained`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from tokenizer.config import TokenizerTrainingConfig
from tokenizer.encoder_catalog import CATALOG
from tokenizer.encoders import RepresentationEncoder, tiny_encoder_config
from tokenizer.model import SemanticAutoencoder
from tokenizer.presets import load_preset
from unimm.cli import main

TINY_IMAGE = 32
TINY_PATCH = 8
TINY_HIDDEN = 32


def write_tiny_encoders(directory: Path) -> dict[str, Path]:
    """One tiny saved encoder per kind: {kind: directory}."""
    paths = {}
    torch.manual_seed(0)  # the same tiny encoders in every run: golden trajectories depend on them
    for kind in ("dinov2", "dinov2_registers", "dinov3", "siglip", "siglip2"):
        path = directory / kind
        encoder = RepresentationEncoder.from_config(
            tiny_encoder_config(kind, image_size=TINY_IMAGE, patch_size=TINY_PATCH, hidden_size=TINY_HIDDEN, layers=4), kind
        )
        encoder.save_pretrained(str(path))
        paths[kind] = path
    return paths


def write_tiny_shapes(directory: Path) -> Path:
    assert main(["shapes", "dataset", "-o", str(directory), "resolution=32", "num_train=48", "num_val=8",
                 "num_edit_train=0", "num_edit_val=0", "write_parquet=false", "num_dpg_items=2",
                 "samples_per_shard=24"]) == 0
    return directory


def tiny_config(preset: str, encoders: dict[str, Path], shapes: Path, output_dir: Path, **train_changes) -> TokenizerTrainingConfig:
    """The preset shrunk to 32 px and a few thousand parameters, with every stage one step long."""
    config = load_preset(preset)
    model, loss, train = config.model, config.loss, config.train
    encoder = model.encoder
    if encoder.role != "none":
        kind = CATALOG[encoder.name_or_path][0] if encoder.name_or_path in CATALOG else "dinov2"
        encoder = dataclasses.replace(encoder, name_or_path=str(encoders[kind]), image_size=TINY_IMAGE, kind="")
    grid = TINY_IMAGE // TINY_PATCH
    latent = model.latent
    if encoder.role == "backbone":
        factor = TINY_IMAGE // (grid // 2**latent.downsample_layers)
        channels = TINY_HIDDEN if latent.bottleneck != "gaussian" else 8
    else:
        factor, channels = min(latent.factor, 8), 8
    latent = dataclasses.replace(latent, factor=factor, channels=channels)
    small_vit = dict(hidden_size=32, depth=1, num_heads=2)
    pixel_encoder = dataclasses.replace(model.pixel_encoder, base_channels=8, channel_multipliers=(1, 2), layers_per_block=1, norm_groups=4, **small_vit)
    pixel_decoder = dataclasses.replace(model.pixel_decoder, base_channels=8, channel_multipliers=(1, 2), layers_per_block=1, norm_groups=4, **small_vit)
    auxiliary = dataclasses.replace(model.auxiliary, downsampler_heads=2, teacher_decoder_depth=1, teacher_decoder_hidden=32, alignment_hidden=16)
    semantic = dataclasses.replace(model.semantic, num_blocks=min(model.semantic.num_blocks, 2))
    model = dataclasses.replace(model, image_size=TINY_IMAGE, encoder=encoder, latent=latent, pixel_encoder=pixel_encoder,
                                pixel_decoder=pixel_decoder, auxiliary=auxiliary, semantic=semantic)
    if loss.perceptual_weight > 0:
        loss = dataclasses.replace(loss, perceptual_backbone="random")
    loss = dataclasses.replace(loss, discriminator_channels=8, discriminator_layers=2,
                               adversarial_start_step=0 if loss.adversarial_weight > 0 else loss.adversarial_start_step)
    stage1 = dataclasses.replace(train.stage1, steps=min(train.stage1.steps, 1))
    stage2 = dataclasses.replace(train.stage2, steps=min(train.stage2.steps, 1))
    decoder = dataclasses.replace(train.decoder, steps=min(train.decoder.steps, 1))
    init_from = ""
    if train.init_from:  # a decoder-stage preset: start from a saved tokenizer of the same (tiny) model
        torch.manual_seed(0)
        start = SemanticAutoencoder.build(model)
        start.set_latent_statistics(torch.zeros(start.latent_shape[0]), torch.ones(start.latent_shape[0]), 8)
        init_from = str(start.save_pretrained(Path(output_dir).parent / f"{Path(output_dir).name}-init-from"))
    train = dataclasses.replace(
        train, data=str(shapes / "t2i" / "train"), val_data=str(shapes / "t2i" / "val"), batch_size=4, num_workers=0,
        teacher_steps=min(train.teacher_steps, 1), stage1=stage1, stage2=stage2, decoder=decoder, init_from=init_from,
        mixed_precision="no",
        log_every=1, image_every=1000, checkpoint_every=1000, stats_images=8, warmup_steps=0, deepspeed_config="",
    )
    train = dataclasses.replace(train, **train_changes)
    return dataclasses.replace(config, output_dir=str(output_dir), model=model, loss=loss, train=train)

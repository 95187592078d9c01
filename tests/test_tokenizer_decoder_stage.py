"""The pixel-decoder stage: fine-tuning a finished tokenizer's decoder moves the decoder only -- the latents of
every image and the saved latent statistics stay bit-identical, so generators trained on it keep working."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.tokenizer_fixtures import tiny_config
from tokenizer.config import StageConfig
from tokenizer.model import SemanticAutoencoder
from tokenizer.trainer import TokenizerTrainer
from unimm.errors import UserError


def finished_tokenizer(encoders, shapes, tmp_path):
    config = tiny_config(
        "psvae-96c", encoders, shapes, tmp_path / "base",
        stage1=StageConfig(steps=2, learning_rate=3e-3, detach_pixel_latent=True),
        stage2=StageConfig(steps=2, learning_rate=1e-3, train_encoder=True),
    )
    TokenizerTrainer(config, resume=False).train()
    return config, tmp_path / "base" / "tokenizer"


def decoder_config(base_config, source, output_dir, steps=6):
    train = dataclasses.replace(
        base_config.train, init_from=str(source), stage1=StageConfig(), stage2=StageConfig(),
        decoder=StageConfig(steps=steps, learning_rate=3e-3), ema_decay=0.5,
    )
    return dataclasses.replace(base_config, output_dir=str(output_dir), train=train)


def test_decoder_stage_keeps_the_latent_space_and_changes_the_decoder(encoders, shapes, tmp_path):
    base_config, source = finished_tokenizer(encoders, shapes, tmp_path)
    records = TokenizerTrainer(decoder_config(base_config, source, tmp_path / "decoder"), resume=False).train()
    assert {record["stage"] for record in records} == {"decoder"}
    assert set(records[0]) >= {"pixel"} and "semantic" not in records[0] and "kl" not in records[0]

    before = SemanticAutoencoder.from_pretrained(source)
    after = SemanticAutoencoder.from_pretrained(tmp_path / "decoder" / "tokenizer")
    changed = set()
    for (name, old), (_, new) in zip(before.state_dict().items(), after.state_dict().items()):
        if not torch.equal(old, new):
            changed.add(name.split(".")[0])
    assert changed == {"pixel_decoder"}  # statistics, encoder, semantic VAE untouched, bit for bit
    images = torch.rand(3, 3, before.config.image_size, before.config.image_size) * 2 - 1
    with torch.no_grad():
        assert torch.equal(before.encode(images), after.encode(images))
        assert not torch.equal(before.decode(before.encode(images)), after.decode(after.encode(images)))


def test_decoder_stage_rejects_a_tokenizer_of_another_shape(encoders, shapes, tmp_path):
    base_config, source = finished_tokenizer(encoders, shapes, tmp_path)
    config = decoder_config(base_config, source, tmp_path / "decoder")
    wider = dataclasses.replace(config.model.pixel_decoder, base_channels=config.model.pixel_decoder.base_channels * 2)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, pixel_decoder=wider))
    with pytest.raises(UserError, match="does not fit this preset's model"):
        TokenizerTrainer(config, resume=False)


def test_decoder_stage_from_a_saved_tokenizer_needs_no_encoder_directory(encoders, shapes, tmp_path):
    # On a fresh machine the preset's encoder run (runs/shapes-encoder) is gone; the saved tokenizer's own
    # encoder config builds the backbone and init_from supplies every weight.
    base_config, source = finished_tokenizer(encoders, shapes, tmp_path)
    config = decoder_config(base_config, source, tmp_path / "decoder", steps=2)
    gone = dataclasses.replace(config.model.encoder, name_or_path=str(tmp_path / "no-such-encoder"))
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, encoder=gone))
    TokenizerTrainer(config, resume=False).train()
    before = SemanticAutoencoder.from_pretrained(source)
    after = SemanticAutoencoder.from_pretrained(tmp_path / "decoder" / "tokenizer")
    images = torch.rand(2, 3, before.config.image_size, before.config.image_size) * 2 - 1
    with torch.no_grad():
        assert torch.equal(before.encode(images), after.encode(images))

"""Tokenizer framework: encoder adapters, every preset end to end on a tiny config, API, info, statistics."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tokenizer_fixtures import tiny_config
from tokenizer.config import StageConfig
from tokenizer.encoders import (
    ENCODER_KINDS,
    RepresentationEncoder,
    map_to_tokens,
    tiny_encoder_config,
    tokens_to_map,
)
from tokenizer.model import SemanticAutoencoder, shift_factor
from tokenizer.presets import available_presets, describe_preset, load_preset
from tokenizer.trainer import TokenizerTrainer, latent_statistics


# ------------------------------------------------------------------------------------- adapters
@pytest.mark.parametrize("kind", sorted(ENCODER_KINDS))
def test_encoder_adapter_round_trips_through_from_pretrained(kind, encoders):
    loaded = RepresentationEncoder.from_pretrained(str(encoders[kind])).eval()
    assert loaded.kind == kind  # detected from the saved config's model_type
    reference = RepresentationEncoder.from_config(tiny_encoder_config(kind, image_size=32, patch_size=8, hidden_size=32), kind)
    assert set(reference.state_dict()) == set(loaded.state_dict())
    images = torch.rand(2, 3, 48, 48) * 2 - 1  # any size: the adapter resizes to its own 32 px
    features = loaded(images)
    assert features.shape == (2, 32, 4, 4)  # patch tokens only: CLS and registers dropped
    assert torch.allclose(tokens_to_map(map_to_tokens(features), 4), features)
    patches, global_token = loaded.patch_and_global_tokens(images)
    assert patches.shape == (2, 16, 32) and global_token.shape == (2, 32)


@pytest.mark.parametrize("kind", ["dinov2", "siglip"])
def test_adapter_normalisation_matches_the_family(kind, encoders):
    encoder = RepresentationEncoder.from_pretrained(str(encoders[kind]))
    white = torch.ones(1, 3, 32, 32)
    normalised = encoder.preprocess(white)[0, :, 0, 0]
    expected = {"dinov2": [(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225], "siglip": [1.0, 1.0, 1.0]}[kind]
    assert torch.allclose(normalised, torch.tensor(expected), atol=1e-5)


@pytest.mark.parametrize("kind", ["dinov2", "dinov3", "siglip"])
def test_copied_last_blocks_reproduce_the_encoder_on_patch_only_input(kind, encoders):
    """Running the copied blocks is the same computation as the encoder's own blocks (prefix tokens aside)."""
    encoder = RepresentationEncoder.from_pretrained(str(encoders[kind])).eval()
    stack = encoder.copy_last_blocks(2)
    for copied, original in zip(stack.layers, list(encoder.blocks)[-2:]):
        assert all(torch.equal(a, b) for a, b in zip(copied.state_dict().values(), original.state_dict().values()))
        assert copied is not original
    tokens = torch.randn(2, 16, 32)
    assert stack(tokens, 4).shape == (2, 16, 32)


# ---------------------------------------------------------------------------------------- presets
PAPER_SHAPES = {
    "psvae-96c": ([96, 16, 16], 2.449),
    "rae-dinov2-b": ([768, 16, 16], 6.93),
    "sae-dinov3-hplus-k0": ([1280, 16, 16], None),
    "sae-dinov3-hplus-k1": ([1280, 8, 8], None),
    "gae-d32": ([32, 16, 16], None),
}


@pytest.mark.parametrize("preset", sorted(PAPER_SHAPES))
def test_info_prints_the_paper_latent_shapes(preset):
    result = subprocess.run([sys.executable, "-m", "unimm", "info", preset, "--json"], capture_output=True, text=True, check=True)
    described = json.loads(result.stdout.strip().splitlines()[-1])
    shape, shift = PAPER_SHAPES[preset]
    assert described["latent_shape"] == shape
    if shift is not None:
        assert described["shift"] == pytest.approx(shift, abs=0.005)


def test_shift_rule_matches_the_paper_checks():
    assert shift_factor(16, 2) == pytest.approx(2.0)  # Flux-VAE
    assert shift_factor(768) == pytest.approx(6.928, abs=1e-3)  # DINOv2-B features
    assert shift_factor(96) == pytest.approx(math.sqrt(6))


def test_info_parameter_counts_of_known_encoders():
    """The meta-device builds carry the published encoder sizes (DINOv2-B 86.6M, DINOv3-H+ 840.6M)."""
    assert describe_preset("psvae-96c")["params_by_part"]["backbone"] == pytest.approx(86.6e6, rel=0.01)
    assert describe_preset("sae-dinov3-hplus-k0")["params_by_part"]["backbone"] == pytest.approx(840.6e6, rel=0.01)


def test_unknown_preset_is_a_one_line_error():
    result = subprocess.run([sys.executable, "-m", "unimm", "info", "psvae-97c"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "unknown tokenizer preset 'psvae-97c'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("preset", available_presets())
def test_every_preset_trains_a_step_per_stage_and_saves(preset, encoders, shapes, tmp_path):
    config = tiny_config(preset, encoders, shapes, tmp_path / preset)
    trainer = TokenizerTrainer(config, resume=False)
    records = trainer.train()
    stages = [record["stage"] for record in records]
    expected = (["teacher"] if config.train.teacher_steps else []) + [
        name for name in ("stage1", "stage2", "decoder") if getattr(config.train, name).steps
    ]
    assert stages == expected
    assert all(math.isfinite(record["loss"]) for record in records)
    if config.loss.adversarial_weight > 0:
        assert any("discriminator" in record for record in records)
    saved = SemanticAutoencoder.from_pretrained(tmp_path / preset / "tokenizer")
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    latents = saved.encode(images)
    assert tuple(latents.shape[1:]) == saved.latent_shape
    assert saved.decode(latents).shape == images.shape
    assert int(saved.latent_statistics_count) == 8


# ------------------------------------------------------------------------------- stage semantics
def _parameters(module):
    return {name: parameter.detach().clone() for name, parameter in module.named_parameters()}


def test_psvae_stage1_freezes_the_encoder_and_detaches_the_pixel_path(encoders, shapes, tmp_path):
    config = tiny_config("psvae-96c", encoders, shapes, tmp_path)
    trainer = TokenizerTrainer(config, resume=False)
    model = trainer.unwrapped
    images = next(iter(trainer.loader))["image"]
    stage1 = trainer.plan[0]
    # The pixel loss of stage 1 must stop at the latent: nothing reaches the semantic encoder.
    gradients = torch.autograd.grad(_pixel_term(trainer, images, stage1), list(model.semantic_encoder.parameters()), allow_unused=True)
    assert all(gradient is None for gradient in gradients)
    # ... while the semantic loss does train it.
    loss, terms, _ = trainer.compute_losses(images, stage1, 0)
    assert terms["semantic"] > 0
    gradients = torch.autograd.grad(loss, list(model.semantic_encoder.parameters()), allow_unused=True)
    assert any(gradient is not None and torch.count_nonzero(gradient) > 0 for gradient in gradients)
    before = _parameters(model.backbone)
    trainer.train(max_steps=1)
    after = _parameters(model.backbone)
    assert all(torch.equal(before[name], after[name]) for name in before)  # stage 1: encoder frozen
    trainer.train(max_steps=1)  # stage 2
    changed = _parameters(model.backbone)
    assert any(not torch.equal(after[name], changed[name]) for name in after)


PIXEL_ENCODER_PRESETS = [preset for preset in available_presets() if load_preset(preset).model.encoder.role == "none"]


@pytest.mark.parametrize("preset", PIXEL_ENCODER_PRESETS)
def test_pixel_encoder_presets_train_the_encoder_through_the_pixel_loss(preset, encoders, shapes, tmp_path):
    # A pixel encoder has no semantic loss: if the pixel path were detached (as PS-VAE's stage 1 is), only the KL
    # term would reach it and the latent would collapse to the prior (the mini VAE did, inheriting mini-psvae's stage 1).
    config = tiny_config(preset, encoders, shapes, tmp_path)
    trainer = TokenizerTrainer(config, resume=False)
    images = next(iter(trainer.loader))["image"]
    for stage in trainer.plan:
        if stage.name == "decoder":
            continue
        gradients = torch.autograd.grad(_pixel_term(trainer, images, stage), list(trainer.unwrapped.pixel_encoder.parameters()),
                                        allow_unused=True)
        assert any(gradient is not None and torch.count_nonzero(gradient) > 0 for gradient in gradients), stage.name


@pytest.mark.parametrize("preset,loss_override", [
    ("mini-vae", {}),                                      # a pixel encoder: only the KL term besides the pixel loss
    ("mini-psvae", {"semantic_weight": 0.0}),              # PS-VAE with its semantic losses off
    ("sae-dinov3-hplus-k0", {}),                           # S-AE's teacher term stops at the encoder's tokens
    ("gae-d32", {"semantic_preservation_weight": 0.0}),
    ("reals", {"alignment_weight": 0.0}),
])
def test_a_detached_pixel_path_without_semantic_losses_is_refused(preset, loss_override, encoders, shapes, tmp_path):
    import dataclasses

    from unimm.errors import UserError

    config = tiny_config(preset, encoders, shapes, tmp_path,
                         stage1=StageConfig(steps=1, learning_rate=1e-4, detach_pixel_latent=True))
    config = dataclasses.replace(config, loss=dataclasses.replace(config.loss, **loss_override))
    with pytest.raises(UserError, match="train.stage1.detach_pixel_latent=false"):
        TokenizerTrainer(config, resume=False)


def test_a_detached_pixel_path_before_a_frozen_latent_is_accepted(encoders, shapes, tmp_path):
    """RAE's latent is the frozen encoder's features: nothing before it learns, so detaching changes nothing."""
    from unimm.errors import UserError

    config = tiny_config("mini-rae", encoders, shapes, tmp_path,
                         stage1=StageConfig(steps=1, learning_rate=1e-4, detach_pixel_latent=True))
    TokenizerTrainer(config, resume=False)
    config = tiny_config("mini-rae", encoders, shapes, tmp_path,
                         stage1=StageConfig(steps=1, learning_rate=1e-4, detach_pixel_latent=True, train_encoder=True))
    with pytest.raises(UserError, match="train.stage1.detach_pixel_latent=false"):
        TokenizerTrainer(config, resume=False)  # unfrozen, the encoder would learn from nothing


@pytest.mark.parametrize("preset", ["mini-psvae", "gae-d32", "reals"])
def test_a_detached_pixel_path_with_a_semantic_loss_on_the_latent_is_accepted(preset, encoders, shapes, tmp_path):
    """GAE's and ReaLS's semantic terms act on the posterior mean: with the pixel path detached, their pixel encoder
    still learns from them."""
    config = tiny_config(preset, encoders, shapes, tmp_path,
                         stage1=StageConfig(steps=1, learning_rate=1e-4, detach_pixel_latent=True))
    trainer = TokenizerTrainer(config, resume=False)
    images = next(iter(trainer.loader))["image"]
    stage = next(stage for stage in trainer.plan if stage.name == "stage1")
    loss, terms, _ = trainer.compute_losses(images, stage, 0)
    semantic = {"mini-psvae": "semantic", "gae-d32": "semantic_preservation", "reals": "alignment"}[preset]
    assert semantic in terms
    encoder = trainer.unwrapped.semantic_encoder if preset == "mini-psvae" else trainer.unwrapped.pixel_encoder
    gradients = torch.autograd.grad(loss, [p for p in encoder.parameters() if p.requires_grad], allow_unused=True)
    assert any(gradient is not None and torch.count_nonzero(gradient) > 0 for gradient in gradients)


def _pixel_term(trainer, images, stage):
    outputs = trainer.model(images, detach_pixel_latent=stage.config.detach_pixel_latent, train_backbone=False)
    return (outputs["reconstruction"] - images).abs().mean()


# ------------------------------------------------------------------------------------ API pieces
def test_save_and_load_pretrained_round_trip(encoders, tmp_path):
    config = tiny_config("psvae-96c", encoders, tmp_path, tmp_path)
    model = SemanticAutoencoder.build(config.model).eval()
    model.set_latent_statistics(torch.arange(8.0), torch.full((8,), 2.0), 123)
    model.save_pretrained(tmp_path / "saved")
    loaded = SemanticAutoencoder.from_pretrained(tmp_path / "saved")
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    assert torch.equal(model.encode(images), loaded.encode(images))
    latents = torch.randn(3, 8, 4, 4)
    assert torch.equal(model.decode(latents), loaded.decode(latents))
    assert torch.equal(loaded.latent_mean, torch.arange(8.0)) and int(loaded.latent_statistics_count) == 123
    assert torch.allclose(loaded.denormalize_latents(loaded.normalize_latents(latents)), latents, atol=1e-6)
    saved_config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved_config["latent_shape"] == [8, 4, 4] and saved_config["shift"] == pytest.approx(math.sqrt(8 / 16))


def test_latent_statistics_are_exact(encoders, tmp_path):
    config = tiny_config("vae", encoders, tmp_path, tmp_path)
    model = SemanticAutoencoder.build(config.model).eval()
    batches = [torch.rand(5, 3, 32, 32) * 2 - 1, torch.rand(3, 3, 32, 32) * 2 - 1]
    mean, var, count = latent_statistics(model, batches, "cpu")
    with torch.no_grad():
        latents = torch.cat([model.encode(batch) for batch in batches]).double()
    per_channel = latents.transpose(0, 1).flatten(1)
    assert count == 8
    assert torch.allclose(mean, per_channel.mean(1), atol=1e-10)
    assert torch.allclose(var, per_channel.var(1, unbiased=False), atol=1e-10)


def test_gae_bottleneck_is_on_the_sphere_and_noise_is_per_sample():
    from tokenizer.layers.bottleneck import RMSNormNoiseBottleneck

    bottleneck = RMSNormNoiseBottleneck(noise_std=0.2)
    features = torch.randn(4, 32, 3, 3) * 7
    mean = bottleneck.mode(features)
    assert torch.allclose(mean.pow(2).mean(1), torch.ones(4, 3, 3), atol=1e-4)  # RMS 1 over channels
    torch.manual_seed(0)
    sampled, _ = bottleneck(features)
    residual_scale = (sampled - mean).flatten(1).std(1)
    assert residual_scale.std() > 0  # σ drawn per sample, not one global scale


@pytest.mark.parametrize("encoder_run", ["absent", "training"])
def test_info_of_a_mini_preset_before_the_shapes_encoder_exists(tmp_path, encoder_run):
    """`unimm info mini-psvae` on a fresh checkout, or while `shapes train-encoder` is still writing its run directory
    (only its config.yaml there so far), describes the encoder that command will write."""
    if encoder_run == "training":
        (tmp_path / "runs" / "shapes-encoder").mkdir(parents=True)
        (tmp_path / "runs" / "shapes-encoder" / "config.yaml").write_text("steps: 6000\n")
    result = subprocess.run(
        [sys.executable, "-m", "unimm", "info", "mini-psvae", "--json"], cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    described = json.loads(result.stdout.strip().splitlines()[-1])
    assert described["latent_shape"] == [32, 8, 8]
    assert described["params_by_part"]["backbone"] == 1224704


def test_info_refuses_an_encoder_directory_without_a_config(tmp_path, capsys):
    from unimm.cli import main

    (tmp_path / "half-written").mkdir()
    assert main(["info", "mini-psvae", f"model.encoder.name_or_path={tmp_path / 'half-written'}"]) == 2
    assert "has no config.json" in capsys.readouterr().err

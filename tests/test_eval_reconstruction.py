"""Reconstruction metrics: Fréchet distance, streaming statistics, PSNR/SSIM conventions, the noise curve,
the Inception loader, image sources and ``unimm eval recon``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from eval.fid import FeatureStatistics, InceptionFeatures, _trace_sqrt_product, frechet_distance
from eval.image_sources import ImageSource, scene_from_metadata
from eval.reconstruction import evaluate_reconstruction, psnr_per_image, quantize_8bit, ssim_per_image
from unimm.errors import UserError

ROOT = Path(__file__).parent.parent


# ----------------------------------------------------------------------------------------------------
# Fréchet distance and statistics
# ----------------------------------------------------------------------------------------------------
def test_frechet_distance_is_zero_for_identical_statistics():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(200, 16))
    mu, sigma = features.mean(0), np.cov(features, rowvar=False)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_matches_closed_forms():
    # 1-D: (m1 - m2)^2 + s1 + s2 - 2 sqrt(s1 s2), with s the variances.
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 4.0 + 9.0 - 2 * 6.0)
    # Diagonal covariances: the sum of the 1-D distances.
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    var1, var2 = np.array([1.0, 0.25, 4.0]), np.array([2.0, 1.0, 0.5])
    expected = float(((mu1 - mu2) ** 2 + var1 + var2 - 2 * np.sqrt(var1 * var2)).sum())
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-9)
    # torch inputs are accepted too.
    assert frechet_distance(torch.tensor(mu1), torch.diag(torch.tensor(var1)), mu2, np.diag(var2)) == pytest.approx(expected)


def test_frechet_distance_is_finite_for_singular_sample_covariances():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(10, 40)), rng.normal(size=(10, 40)) + 0.5  # fewer samples than dimensions
    sa, sb = FeatureStatistics().update(a), FeatureStatistics().update(b)
    distance = sa.frechet_distance(sb)
    assert np.isfinite(distance) and distance > 0
    # The spectral fallback computes the same trace term.
    reference = float(((sa.mean - sb.mean) ** 2).sum() + np.trace(sa.covariance) + np.trace(sb.covariance)
                      - 2 * _trace_sqrt_product(sa.covariance, sb.covariance))
    assert distance == pytest.approx(reference, rel=1e-4)


def test_streaming_statistics_equal_numpy_mean_and_covariance():
    rng = np.random.default_rng(2)
    features = rng.normal(loc=1000.0, scale=0.5, size=(103, 7))  # large offset: tests the stable update
    stats = FeatureStatistics()
    for start, stop in ((0, 1), (1, 40), (40, 41), (41, 103)):
        stats.update(torch.from_numpy(features[start:stop]).float() if start == 41 else features[start:stop])
    reference = np.concatenate([features[:41], torch.from_numpy(features[41:]).float().double().numpy()])
    assert stats.count == 103
    np.testing.assert_allclose(stats.mean, reference.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.covariance, np.cov(reference, rowvar=False), rtol=1e-8, atol=1e-10)


# ----------------------------------------------------------------------------------------------------
# PSNR, SSIM, the noise curve
# ----------------------------------------------------------------------------------------------------
def test_psnr_is_exact_for_a_known_mse_and_ssim_is_one_for_identical_images():
    reference = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.8
    shifted = reference + 0.1  # MSE 0.01 on [0, 1] pixels -> 20 dB
    assert torch.allclose(psnr_per_image(shifted, reference), torch.full((3,), 20.0), atol=1e-4)
    assert torch.allclose(ssim_per_image(reference, reference), torch.ones(3), atol=1e-6)
    assert float(ssim_per_image(shifted, reference).max()) < 1.0
    # Through the pipeline, without quantisation: images in [-1, 1], offset 0.2 there = 0.1 on [0, 1].
    images = reference * 2 - 1
    result = evaluate_reconstruction([images], lambda x: x, lambda z: z + 0.2, quantize=False)
    assert result["num_images"] == 3 and result["curve"][0]["psnr"] == pytest.approx(20.0, abs=1e-4)
    assert result["curve"][0]["lpips"] is None and result["curve"][0]["rfid"] is None


def test_quantize_rounds_to_8bit_levels():
    images = torch.linspace(-1, 1, 1000).reshape(1, 1, 10, 100).expand(1, 3, 10, 100)
    levels = (quantize_8bit(images) + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4) and float((levels - (images + 1) * 127.5).abs().max()) <= 0.5 + 1e-4


class MeanAbsoluteDifference:
    """A stand-in perceptual metric with the PerceptualLoss interface."""

    def per_image(self, x, y):
        return (x - y).abs().flatten(1).mean(1)


def random_feature_network() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, stride=2), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(),
    ).eval()


def test_noise_curve_gets_worse_as_sigma_grows():
    generator = torch.Generator().manual_seed(3)
    base = F.interpolate(torch.rand(12, 3, 8, 8, generator=generator) * 2 - 1, size=32, mode="bilinear", align_corners=False)
    batches = [base[:5], base[5:]]

    def encode(images):  # a real (if fixed) encoder/decoder pair: 4x average pooling and bilinear upsampling
        return F.avg_pool2d(images, 4)

    def decode(latents):
        return F.interpolate(latents, scale_factor=4, mode="bilinear", align_corners=False)

    sigmas = (0.0, 0.1, 0.3, 1.0)
    result = evaluate_reconstruction(
        batches, encode, decode, perceptual=MeanAbsoluteDifference(), fid_feature_extractor=random_feature_network(),
        noise_sigmas=sigmas, generator_seed=0, max_images=11,
    )
    assert result["num_images"] == 11 and result["latent_shape"] == [3, 8, 8]
    curve = result["curve"]
    assert [row["sigma"] for row in curve] == list(sigmas)
    psnr = [row["psnr"] for row in curve]
    assert all(a > b for a, b in zip(psnr, psnr[1:])) and psnr[0] > 20
    assert all(a < b for a, b in zip([r["lpips"] for r in curve], [r["lpips"] for r in curve][1:]))
    assert all(a > b for a, b in zip([r["ssim"] for r in curve], [r["ssim"] for r in curve][1:]))
    assert curve[0]["rfid"] < curve[-1]["rfid"]
    # Deterministic: the same seed gives the same curve.
    again = evaluate_reconstruction(batches, encode, decode, noise_sigmas=sigmas, generator_seed=0, max_images=11)
    assert [row["psnr"] for row in again["curve"]] == psnr


def test_lpips_through_the_project_perceptual_loss():
    perceptual_module = pytest.importorskip("tokenizer.losses.perceptual")
    perceptual = perceptual_module.PerceptualLoss(random_backbone=True)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    result = evaluate_reconstruction([images], lambda x: x, lambda z: z, perceptual=perceptual, noise_sigmas=(0.0, 0.5))
    assert result["curve"][0]["lpips"] == pytest.approx(0.0, abs=2e-3)  # only 8-bit rounding differs
    assert result["curve"][1]["lpips"] > result["curve"][0]["lpips"]


# ----------------------------------------------------------------------------------------------------
# Inception: local weights only, both layouts
# ----------------------------------------------------------------------------------------------------
def test_inception_loads_torchvision_and_tf_fid_layouts_from_local_files(tmp_path, monkeypatch):
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    torchvision_layout = inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict()
    extractor = InceptionFeatures(torchvision_layout, weights_path="torchvision.pth")
    assert not extractor.tf_fid_weights and extractor.feature_network.startswith("torchvision")
    # pytorch-fid's FID Inception: 1008 classes, no auxiliary head; same parameters, TF pooling.
    tf_layout = {k: v for k, v in torchvision_layout.items() if not k.startswith("AuxLogits.")}
    tf_layout["fc.weight"], tf_layout["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(tf_layout, path)
    tf_extractor = InceptionFeatures.from_file(path)
    assert tf_extractor.tf_fid_weights and tf_extractor.protocol()["weights_sha256"]
    image = torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert tf_extractor(image).shape == (1, 2048)
    # The TF pooling patches are active: same parameters, different outputs of the patched blocks.
    with torch.no_grad():
        for block, channels in (("Mixed_5b", 192), ("Mixed_7c", 2048)):
            x = torch.rand(1, channels, 6, 6, generator=torch.Generator().manual_seed(2))
            assert not torch.allclose(getattr(extractor.model, block)(x), getattr(tf_extractor.model, block)(x))
    # The environment variable is a default location.
    monkeypatch.setenv("UNIMM_INCEPTION_WEIGHTS", str(path))
    assert InceptionFeatures.from_file(hash_file=False).tf_fid_weights


def test_missing_inception_weights_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.delenv("UNIMM_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(UserError, match="--inception-weights"):
        InceptionFeatures.from_file()
    with pytest.raises(UserError, match="do not exist"):
        InceptionFeatures.from_file(tmp_path / "nope.pth")
    monkeypatch.setenv("UNIMM_INCEPTION_WEIGHTS", str(tmp_path / "nope.pth"))
    with pytest.raises(UserError, match="UNIMM_INCEPTION_WEIGHTS points to"):
        InceptionFeatures.from_file()


# ----------------------------------------------------------------------------------------------------
# Image sources
# ----------------------------------------------------------------------------------------------------
def test_folder_source_is_sorted_resized_and_counts_bad_files(tmp_path):
    (tmp_path / "b").mkdir()
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "b" / "z.png")
    Image.new("RGB", (16, 16), (0, 0, 255)).save(tmp_path / "a.jpg", quality=95)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    source = ImageSource(tmp_path, resolution=8, batch_size=4)
    batches = list(source)
    assert len(batches) == 1 and batches[0]["image"].shape == (2, 3, 8, 8)
    assert batches[0]["key"] == ["a", "b/z"] and [m["folder"] for m in batches[0]["meta"]] == ["", "b"]
    assert float(batches[0]["image"][1, 0].min()) > 0.9  # red, center-cropped from 40x20
    assert source.report()["skipped"] == {"undecodable image": 1} and source.report()["delivered"] == 2


def test_shard_sources_carry_scene_metadata(tmp_path):
    from data.shapes.dataset import ShapesDatasetConfig, write_shapes_dataset

    config = ShapesDatasetConfig(resolution=32, num_train=5, num_val=1, num_edit_train=1, num_edit_val=1, num_dpg_items=1,
                                 samples_per_shard=3)
    write_shapes_dataset(config, tmp_path, progress=False)
    webdataset = ImageSource(tmp_path / "t2i" / "train", resolution=32, batch_size=2, max_images=4)
    parquet = ImageSource(tmp_path / "t2i-parquet" / "train", resolution=32, batch_size=3)
    assert (webdataset.kind, parquet.kind) == ("webdataset", "parquet")
    from_tar = [(k, img, scene_from_metadata(m)) for b in webdataset for k, img, m in zip(b["key"], b["image"], b["meta"])]
    from_parquet = [(k, img, scene_from_metadata(m)) for b in parquet for k, img, m in zip(b["key"], b["image"], b["meta"])]
    assert len(from_tar) == 4 and len(from_parquet) == 5 and webdataset.report()["delivered"] == 4
    for (key_a, image_a, scene_a), (key_b, image_b, scene_b) in zip(from_tar, from_parquet):
        assert key_a == key_b and torch.equal(image_a, image_b) and scene_a == scene_b and scene_a["objects"]
    with pytest.raises(UserError, match="does not exist"):
        ImageSource(tmp_path / "missing", resolution=32)


# ----------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["eval", "recon", "--tokenizer", "{tmp}/missing", "--data", "{images}"], "tokenizer directory"),
        (["eval", "recon", "--tokenizer", "{tmp}", "--data", "{tmp}/nothing-here"], "does not exist"),
        (["eval", "recon", "--tokenizer", "{tmp}", "--data", "{images}", "--noise-sigmas", "0,x"], "--noise-sigmas"),
        (["eval", "recon", "--tokenizer", "{tmp}", "--data", "{images}", "--no-lpips", "--no-fid"], "not a saved tokenizer"),
        (["eval", "linprobe", "--encoder", "{tmp}/missing", "--train", "{images}", "--val", "{images}"], "encoder directory"),
        (["eval", "linprobe", "--encoder", "{tmp}", "--train", "{images}", "--val", "{images}", "--pool", "max"], "--pool"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, fragment):
    from unimm.cli import main

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (16, 16)).save(images / "0.png")
    assert main([a.format(tmp=tmp_path, images=images) for a in argv]) == 2
    stderr = capsys.readouterr().err
    assert len(stderr.strip().splitlines()) == 1 and fragment in stderr and stderr.startswith("unimm eval ")


def test_bad_path_from_the_shell_is_one_line_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "unimm", "eval", "recon", "--tokenizer", str(tmp_path), "--data",
                             str(tmp_path / "missing")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"unimm eval recon: error: data path '{tmp_path / 'missing'}' does not exist"


def tiny_tokenizer(directory: Path) -> None:
    from tokenizer.config import (
        LatentConfig,
        PixelDecoderConfig,
        PixelEncoderConfig,
        RepresentationEncoderConfig,
        TokenizerModelConfig,
    )
    from tokenizer.model import SemanticAutoencoder

    torch.manual_seed(0)
    config = TokenizerModelConfig(
        family="vae", image_size=32, encoder=RepresentationEncoderConfig(role="none"),
        pixel_encoder=PixelEncoderConfig(kind="cnn", base_channels=8, channel_multipliers=(1, 2, 2, 2), layers_per_block=1, norm_groups=4),
        latent=LatentConfig(channels=4, factor=8),
        pixel_decoder=PixelDecoderConfig(kind="cnn", base_channels=8, channel_multipliers=(1, 2, 2, 2), layers_per_block=1,
                                         norm_groups=4, mid_attention=False),
    )
    SemanticAutoencoder.build(config).save_pretrained(directory)


def test_recon_command_end_to_end_with_a_saved_tokenizer(tmp_path, capsys):
    from unimm.cli import main

    tiny_tokenizer(tmp_path / "tok")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for index in range(5):
        Image.fromarray(rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)).save(images / f"{index}.png")
    out = tmp_path / "results.json"
    argv = ["eval", "recon", "--tokenizer", str(tmp_path / "tok"), "--data", str(images), "--batch-size", "2",
            "--max-images", "4", "--noise-sigmas", "0,0.5", "--no-fid", "--no-lpips", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| sigma | PSNR (dB) | SSIM | LPIPS | rFID |" in printed and "| 0.5 |" in printed
    payload = json.loads(out.read_text())
    assert payload["num_images"] == 4 and payload["protocol"]["resolution"] == 32
    assert payload["protocol"]["num_images"] == 4 and payload["protocol"]["feature_network"] is None
    assert payload["protocol"]["tf_fid_weights"] is None and payload["data_report"]["skipped_total"] == 0
    assert [row["sigma"] for row in payload["curve"]] == [0.0, 0.5] and payload["curve"][0]["psnr"] > 0

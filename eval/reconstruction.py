"""Reconstruction metrics of an image tokenizer: PSNR, SSIM, LPIPS and rFID, and the noise-robustness curve.

The functions take callables (``encode_fn``, ``decode_fn``, a perceptual metric, a feature network), so
they work with any tokenizer class. Conventions, recorded in every result:

- Inputs are images in [-1, 1] at the tokenizer's resolution (the ImageNet protocol: shorter side
  resized, center crop; ``eval.image_sources`` does it with ``data.transforms``).
- Reconstructions are clamped to [-1, 1] and, by default, quantised to 8-bit levels, as when they are
  saved to PNG before scoring (the usual protocol for published rFID/PSNR). Real images from files are
  already 8-bit.
- PSNR: per image on [0, 1] pixels, ``10 log10(1 / MSE)`` with data range 1 and the MSE over all pixels
  and channels of that image, then averaged over images (not the PSNR of the pooled MSE). An exact
  reconstruction (MSE 0) counts as ``PSNR_CAP_DB``.
- SSIM: torchmetrics ``structural_similarity_index_measure`` per image on [0, 1] pixels, data range 1,
  Gaussian window 11 with sigma 1.5, averaged over images.
- LPIPS: the injected metric's ``per_image(x, y)`` on [-1, 1] images (VGG LPIPS in the CLI), averaged.
- rFID: Fréchet distance between the feature statistics of the real images and of their reconstructions
  (``eval.fid``); ``None`` without a feature network.
- Noise curve: for each sigma, ``decode(z + sigma * eps)`` with ``eps ~ N(0, I)`` drawn from a generator
  seeded by ``(generator_seed, index of sigma)``; sigma is absolute, in latent units (the result also
  reports the RMS of the clean latents so sigma can be read relative to the latent scale).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import torch

from eval.fid import FeatureStatistics

PSNR_CAP_DB = 100.0  # PSNR of an exact reconstruction (MSE floored at 1e-10)


class PerImageMetric(Protocol):
    def per_image(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def quantize_8bit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images rounded to the 256 levels of an 8-bit file, back in [-1, 1]."""
    levels = torch.round(to_unit_range(images) * 255.0)
    return levels / 127.5 - 1.0


def psnr_per_image(reconstructed: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(B,) PSNR in dB of [0, 1] images, data range 1, MSE per image."""
    mse = (reconstructed.double() - reference.double()).pow(2).flatten(1).mean(1)
    return (10.0 * torch.log10(1.0 / mse.clamp_min(10 ** (-PSNR_CAP_DB / 10)))).float()


def ssim_per_image(reconstructed: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(B,) SSIM of [0, 1] images: data range 1, Gaussian kernel 11, sigma 1.5 (torchmetrics)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    values = structural_similarity_index_measure(
        reconstructed.float(), reference.float(), data_range=1.0, gaussian_kernel=True, sigma=1.5, kernel_size=11,
        reduction="none",
    )
    return values.reshape(-1)


def _as_images(batch: Any) -> torch.Tensor:
    if isinstance(batch, dict):
        batch = batch["image"]
    elif isinstance(batch, (tuple, list)):
        batch = batch[0]
    if not isinstance(batch, torch.Tensor) or batch.ndim != 4 or batch.shape[1] != 3:
        raise ValueError(f"expected image batches of shape (B, 3, H, W), got {getattr(batch, 'shape', type(batch))}")
    return batch


class _Running:
    """Sum and count of per-image values (float64)."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def add(self, values: torch.Tensor) -> None:
        values = values.detach().double().cpu()
        self.total += float(values.sum())
        self.count += int(values.numel())

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None


@torch.no_grad()
def evaluate_reconstruction(
    batches: Iterable[Any],
    encode_fn: Callable[[torch.Tensor], torch.Tensor],
    decode_fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    perceptual: PerImageMetric | None = None,
    fid_feature_extractor: Callable[[torch.Tensor], torch.Tensor] | None = None,
    noise_sigmas: Sequence[float] = (0.0,),
    generator_seed: int = 0,
    max_images: int | None = None,
    quantize: bool = True,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Score ``decode(encode(x) + sigma * eps)`` against ``x`` for every sigma.

    ``batches`` yields tensors ``(B, 3, H, W)`` in [-1, 1] (or dicts with ``"image"``, or tuples whose
    first item is the images). Returns ``{"num_images", "latent_shape", "latent_rms", "curve": [{"sigma",
    "psnr", "ssim", "lpips", "rfid"}, ...]}``; ``lpips``/``rfid`` are ``None`` when not measured.
    """
    sigmas = [float(sigma) for sigma in noise_sigmas]
    if not sigmas or any(not math.isfinite(sigma) or sigma < 0 for sigma in sigmas):
        raise ValueError(f"noise sigmas must be finite and >= 0, got {list(noise_sigmas)}")
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be at least 1, got {max_images}")
    generators = []
    for index in range(len(sigmas)):
        generator = torch.Generator(device="cpu")
        generator.manual_seed(int(generator_seed) * 1_000_003 + index)
        generators.append(generator)
    psnr = [_Running() for _ in sigmas]
    ssim = [_Running() for _ in sigmas]
    lpips = [_Running() for _ in sigmas]
    real_stats = FeatureStatistics() if fid_feature_extractor is not None else None
    fake_stats = [FeatureStatistics() for _ in sigmas] if fid_feature_extractor is not None else None
    num_images = 0
    latent_square_sum, latent_count, latent_shape = 0.0, 0, None

    for batch in batches:
        images = _as_images(batch)
        if max_images is not None:
            images = images[: max_images - num_images]
        if images.shape[0] == 0:
            break
        if device is not None:
            images = images.to(device)
        images = images.float()
        latents = encode_fn(images)
        latent_shape = list(latents.shape[1:])
        latent_square_sum += float(latents.double().pow(2).sum())
        latent_count += latents.numel()
        reference = to_unit_range(images)
        if real_stats is not None:
            real_stats.update(fid_feature_extractor(images))
        for index, sigma in enumerate(sigmas):
            noisy = latents
            if sigma > 0:
                noise = torch.randn(latents.shape, generator=generators[index], dtype=torch.float32)
                noisy = latents + sigma * noise.to(device=latents.device, dtype=latents.dtype)
            reconstructed = decode_fn(noisy).float().clamp(-1.0, 1.0)
            if reconstructed.shape != images.shape:
                raise ValueError(f"decoder returned {tuple(reconstructed.shape)} for inputs {tuple(images.shape)}")
            if quantize:
                reconstructed = quantize_8bit(reconstructed)
            unit = to_unit_range(reconstructed)
            psnr[index].add(psnr_per_image(unit, reference))
            ssim[index].add(ssim_per_image(unit, reference))
            if perceptual is not None:
                lpips[index].add(perceptual.per_image(reconstructed, images).reshape(-1))
            if fake_stats is not None:
                fake_stats[index].update(fid_feature_extractor(reconstructed))
        num_images += images.shape[0]
        if max_images is not None and num_images >= max_images:
            break

    curve = []
    for index, sigma in enumerate(sigmas):
        rfid = None
        if fake_stats is not None and num_images >= 2:
            rfid = real_stats.frechet_distance(fake_stats[index])
        curve.append({
            "sigma": sigma,
            "psnr": psnr[index].mean,
            "ssim": ssim[index].mean,
            "lpips": lpips[index].mean if perceptual is not None else None,
            "rfid": rfid,
        })
    return {
        "num_images": num_images,
        "latent_shape": latent_shape,
        "latent_rms": math.sqrt(latent_square_sum / latent_count) if latent_count else None,
        "curve": curve,
    }


RECONSTRUCTION_CONVENTIONS = {
    "reconstructions": "clamped to [-1, 1], quantised to 8 bits",
    "psnr": "per image on [0, 1] pixels, data range 1, mean over images; exact reconstruction counts as 100 dB",
    "ssim": "torchmetrics structural_similarity_index_measure per image on [0, 1], data range 1, gaussian kernel 11, sigma 1.5, mean over images",
    "lpips": "per image on [-1, 1], mean over images",
    "rfid": "Frechet distance of feature statistics, real images vs reconstructions",
    "noise": "decode(z + sigma * eps), eps ~ N(0, I), sigma in latent units, generator seeded per sigma",
}

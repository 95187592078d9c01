"""Fréchet distance between feature distributions (FID, rFID) and the Inception feature network.

``frechet_distance`` follows pytorch-fid: ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2))``
with ``scipy.linalg.sqrtm``; when the square root is not finite (near-singular covariances, e.g. fewer
images than feature dimensions) an ``eps * I`` offset is added to both covariances, and a numerically
complex result keeps its real part. Where the imaginary part is too large to be rounding noise
(pytorch-fid raises there), the trace is taken from the eigenvalues of ``sqrt(S1) S2 sqrt(S1)``
instead, which has the same spectrum as ``S1 S2`` and is symmetric, so it cannot go complex.

``FeatureStatistics`` accumulates mean and covariance batch by batch in float64 (Chan et al.'s pairwise
update of the mean and of the centred outer-product sum, which stays accurate where the naive
``sum(x x^T) - n mu mu^T`` loses digits); the covariance is the unbiased one, as ``numpy.cov``.

Inception. ``InceptionFeatures`` is torchvision's ``inception_v3`` returning pool3 (2048-d) features,
with weights read from a local file only (nothing is downloaded). Two weight files are accepted:

- torchvision's ImageNet weights ``inception_v3_google-0cc3c7bd.pth`` (what ``torch.hub`` caches);
- pytorch-fid's port of the TensorFlow FID graph ``pt_inception-2015-12-05-6726825d.pth`` (recognised by
  its 1008-way classifier). Its four pooling differences from torchvision (average pools that exclude
  padding in the A, C and first E blocks, a max pool in the last E block) are applied, so features
  match pytorch-fid's.

Only the TF-FID weights give FID values comparable with papers. torchvision's Inception weights are a
different network (trained separately by torchvision), so FID measured with them is internally
consistent but its absolute value differs from published numbers; every result records which one was
used (``feature_network`` and ``tf_fid_weights``).

Preprocessing, for both: images in [-1, 1] are resized to 299x299 with bilinear interpolation
(``align_corners=False``, no antialiasing, as pytorch-fid) and fed in [-1, 1], which is exactly what
torchvision's ImageNet normalisation followed by its ``transform_input`` produces for these weights.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from torch import nn

from unimm.errors import UserError

INCEPTION_WEIGHTS_ENV = "UNIMM_INCEPTION_WEIGHTS"
TORCHVISION_INCEPTION_FILE = "inception_v3_google-0cc3c7bd.pth"
TF_FID_INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
FEATURE_NETWORK_TORCHVISION = "torchvision-inception_v3-IMAGENET1K_V1-pool3"
FEATURE_NETWORK_TF_FID = "pytorch-fid-inception-2015-12-05-pool3"
INCEPTION_SIZE = 299
IMAGINARY_TOLERANCE = 1e-3


# ----------------------------------------------------------------------------------------------------
# Fréchet distance
# ----------------------------------------------------------------------------------------------------
def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (numpy or torch inputs)."""
    mu1, mu2 = np.atleast_1d(_float64(mu1)), np.atleast_1d(_float64(mu2))
    sigma1, sigma2 = np.atleast_2d(_float64(sigma1)), np.atleast_2d(_float64(sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"statistics do not match: means {mu1.shape} and {mu2.shape}, covariances {sigma1.shape} and {sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if np.allclose(np.diagonal(covmean).imag, 0, atol=IMAGINARY_TOLERANCE):
            trace_covmean = float(np.trace(covmean.real))
        else:
            trace_covmean = _trace_sqrt_product(sigma1, sigma2)
    else:
        trace_covmean = float(np.trace(covmean))
    if not np.isfinite(trace_covmean):
        trace_covmean = _trace_sqrt_product(sigma1, sigma2)
    distance = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_covmean)
    # Rounding can leave a tiny negative value for (nearly) identical statistics.
    if -1e-6 * max(1.0, float(np.trace(sigma1))) < distance < 0:
        distance = 0.0
    return distance


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr(sqrtm(S1 S2)) for symmetric PSD S1, S2, from the spectrum of sqrt(S1) S2 sqrt(S1)."""
    values, vectors = linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = root1 @ sigma2 @ root1
    eigenvalues = linalg.eigvalsh((middle + middle.T) / 2)
    return float(np.sqrt(np.clip(eigenvalues, 0, None)).sum())


def _float64(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)


class FeatureStatistics:
    """Streaming mean and (unbiased) covariance of feature vectors, in float64."""

    def __init__(self, dim: int | None = None):
        self.dim = dim
        self.count = 0
        self._mean: np.ndarray | None = None
        self._scatter: np.ndarray | None = None  # sum of centred outer products

    def update(self, features) -> FeatureStatistics:
        """Add a batch ``(N, D)`` (tensor or array; extra trailing dims are flattened)."""
        batch = _float64(features)
        batch = batch.reshape(batch.shape[0], -1) if batch.ndim != 2 else batch
        count = batch.shape[0]
        if count == 0:
            return self
        if self.dim is None:
            self.dim = batch.shape[1]
        if batch.shape[1] != self.dim:
            raise ValueError(f"features of dimension {batch.shape[1]} added to statistics of dimension {self.dim}")
        batch_mean = batch.mean(axis=0)
        centred = batch - batch_mean
        batch_scatter = centred.T @ centred
        if self.count == 0:
            self._mean, self._scatter = batch_mean, batch_scatter
        else:
            total = self.count + count
            delta = batch_mean - self._mean
            self._mean = self._mean + delta * (count / total)
            self._scatter = self._scatter + batch_scatter + np.outer(delta, delta) * (self.count * count / total)
        self.count += count
        return self

    @property
    def mean(self) -> np.ndarray:
        if self.count == 0:
            raise ValueError("no features were added")
        return self._mean

    @property
    def covariance(self) -> np.ndarray:
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        return self._scatter / (self.count - 1)

    def frechet_distance(self, other: FeatureStatistics) -> float:
        return frechet_distance(self.mean, self.covariance, other.mean, other.covariance)

    def save(self, path: str | os.PathLike) -> None:
        """``.npz`` with ``mu``, ``sigma`` (pytorch-fid's names) and ``count``, written atomically."""
        from unimm.atomic import atomic_write

        def write(temporary: Path) -> None:
            with open(temporary, "wb") as handle:
                np.savez(handle, mu=self.mean, sigma=self.covariance, count=np.int64(self.count))

        atomic_write(path, write)


# ----------------------------------------------------------------------------------------------------
# Inception
# ----------------------------------------------------------------------------------------------------
def default_inception_weights_paths() -> list[Path]:
    """Where weights are looked for when no path is given: the environment variable, then the torch hub
    cache (torchvision's file first, then pytorch-fid's)."""
    candidates = []
    if os.environ.get(INCEPTION_WEIGHTS_ENV):
        candidates.append(Path(os.environ[INCEPTION_WEIGHTS_ENV]).expanduser())
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    candidates += [checkpoints / TORCHVISION_INCEPTION_FILE, checkpoints / TF_FID_INCEPTION_FILE]
    return candidates


def find_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The weight file to use: ``path`` if given (it must exist), else the first default that exists."""
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise UserError(f"Inception weights '{path}' do not exist; pass the .pth file of torchvision's inception_v3 or pytorch-fid's pt_inception-2015-12-05")
        return path
    from_env = os.environ.get(INCEPTION_WEIGHTS_ENV)
    if from_env and not Path(from_env).expanduser().is_file():
        raise UserError(f"{INCEPTION_WEIGHTS_ENV} points to '{from_env}', which does not exist; fix it or pass --inception-weights FILE")
    for candidate in default_inception_weights_paths():
        if candidate.is_file():
            return candidate
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    raise UserError(
        f"no Inception weights found for FID; pass --inception-weights FILE, set {INCEPTION_WEIGHTS_ENV}, or put "
        f"{TF_FID_INCEPTION_FILE} (pytorch-fid, comparable with papers) or {TORCHVISION_INCEPTION_FILE} in {hub} "
        "(or use --no-fid)"
    )


def _avg_pool_excluding_padding(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _inception_a_forward(self, x):
    branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
    branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    pool = self.branch_pool(_avg_pool_excluding_padding(x))
    return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, pool], 1)


def _inception_c_forward(self, x):
    branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    double = x
    for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
        double = layer(double)
    pool = self.branch_pool(_avg_pool_excluding_padding(x))
    return torch.cat([self.branch1x1(x), branch7x7, double, pool], 1)


def _inception_e_branches(self, x):
    branch3x3 = self.branch3x3_1(x)
    branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
    double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    double = torch.cat([self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double)], 1)
    return self.branch1x1(x), branch3x3, double


def _inception_e1_forward(self, x):
    pool = self.branch_pool(_avg_pool_excluding_padding(x))
    return torch.cat([*_inception_e_branches(self, x), pool], 1)


def _inception_e2_forward(self, x):
    # The TF FID graph max-pools here (torchvision average-pools).
    pool = self.branch_pool(F.max_pool2d(x, kernel_size=3, stride=1, padding=1))
    return torch.cat([*_inception_e_branches(self, x), pool], 1)


def _patched_class(base: type, forward: Callable, name: str) -> type:
    return type(name, (base,), {"forward": forward})


def _patch_for_tf_fid(model: nn.Module) -> None:
    """Turn torchvision's Inception3 into the TF FID graph (same parameters, different pooling)."""
    from torchvision.models import inception

    classes = {
        "A": _patched_class(inception.InceptionA, _inception_a_forward, "FIDInceptionA"),
        "C": _patched_class(inception.InceptionC, _inception_c_forward, "FIDInceptionC"),
        "E1": _patched_class(inception.InceptionE, _inception_e1_forward, "FIDInceptionE1"),
        "E2": _patched_class(inception.InceptionE, _inception_e2_forward, "FIDInceptionE2"),
    }
    for name, kind in (("Mixed_5b", "A"), ("Mixed_5c", "A"), ("Mixed_5d", "A"), ("Mixed_6b", "C"), ("Mixed_6c", "C"),
                       ("Mixed_6d", "C"), ("Mixed_6e", "C"), ("Mixed_7b", "E1"), ("Mixed_7c", "E2")):
        getattr(model, name).__class__ = classes[kind]


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class InceptionFeatures(nn.Module):
    """images (B, 3, H, W) in [-1, 1] -> Inception-v3 pool3 features (B, 2048), float32.

    ``feature_network`` names the weights (torchvision's or the TF-FID port), ``tf_fid_weights`` says
    whether FID values are comparable with published ones, ``weights_sha256`` identifies the file.
    """

    def __init__(self, state_dict: dict[str, torch.Tensor], weights_path: str | None = None, weights_sha256: str | None = None):
        super().__init__()
        from torchvision.models import inception_v3

        if "fc.weight" not in state_dict or "Mixed_7c.branch_pool.conv.weight" not in state_dict:
            raise UserError(
                f"'{weights_path}' is not an Inception-v3 state dict (no fc / Mixed_7c weights); pass torchvision's "
                f"{TORCHVISION_INCEPTION_FILE} or pytorch-fid's {TF_FID_INCEPTION_FILE}"
            )
        num_classes = int(state_dict["fc.weight"].shape[0])
        has_aux = any(key.startswith("AuxLogits.") for key in state_dict)
        self.tf_fid_weights = num_classes == 1008
        model = inception_v3(weights=None, aux_logits=has_aux, init_weights=False, transform_input=False, num_classes=num_classes)
        if self.tf_fid_weights:
            _patch_for_tf_fid(model)
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as error:
            first = str(error).strip().splitlines()[0]
            raise UserError(f"the Inception weights '{weights_path}' do not fit torchvision's inception_v3 ({first})") from None
        model.fc = nn.Identity()
        model.AuxLogits = None
        model.aux_logits = False
        self.model = model.eval().requires_grad_(False)
        self.feature_network = FEATURE_NETWORK_TF_FID if self.tf_fid_weights else FEATURE_NETWORK_TORCHVISION
        self.weights_path = weights_path
        self.weights_sha256 = weights_sha256

    @classmethod
    def from_file(cls, path: str | os.PathLike | None = None, hash_file: bool = True) -> InceptionFeatures:
        """Load from ``path``, or from the defaults (``UNIMM_INCEPTION_WEIGHTS``, the torch hub cache)."""
        path = find_inception_weights(path)
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # unpickling errors come in many types
            raise UserError(f"cannot read Inception weights '{path}' ({error.__class__.__name__}); pass a .pth state dict") from None
        if isinstance(state_dict, dict) and "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
            state_dict = state_dict["state_dict"]
        if not isinstance(state_dict, dict):
            raise UserError(f"'{path}' does not hold a state dict; pass a .pth state dict of inception_v3")
        return cls(state_dict, weights_path=str(path), weights_sha256=file_sha256(path) if hash_file else None)

    def protocol(self) -> dict:
        return {
            "feature_network": self.feature_network,
            "tf_fid_weights": self.tf_fid_weights,
            "weights_path": self.weights_path,
            "weights_sha256": self.weights_sha256,
            "input": "bilinear resize to 299 (align_corners=False, no antialias), values in [-1, 1]",
        }

    def train(self, mode: bool = True) -> InceptionFeatures:
        # Always in eval mode: batch norm running statistics and no dropout.
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        return self.model(x).float()

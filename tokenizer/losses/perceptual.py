"""LPIPS perceptual loss (VGG16 trunk) that never downloads anything.

The ``lpips`` package would fetch ImageNet VGG16 weights through torchvision on first use. Here the trunk
is built with ``pnet_rand=True`` (no download) and the ImageNet weights are loaded from a local file
found, in order, at: the ``backbone_weights`` argument, the ``UNIMM_VGG16_WEIGHTS`` environment variable,
or torchvision's own cache ``<torch hub dir>/checkpoints/vgg16-397923af.pth``. The linear heads
(lin0..lin4, calibrated on human judgements) ship inside the ``lpips`` package. Every file is read with
``torch.load(weights_only=True)``, so a checkpoint can hold tensors only, never arbitrary objects.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import lpips
import torch
from torch import Tensor, nn

from unimm.errors import UserError

VGG16_WEIGHTS_ENV = "UNIMM_VGG16_WEIGHTS"
VGG16_FILE_NAME = "vgg16-397923af.pth"
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILE_NAME}"


def torch_cache_vgg16_path() -> Path:
    """Where torchvision caches its ImageNet VGG16 weights (honours TORCH_HOME / XDG_CACHE_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE_NAME


def lpips_linear_heads_path() -> Path:
    """The LPIPS v0.1 linear-head weights for the VGG trunk, shipped with the ``lpips`` package."""
    return Path(lpips.__file__).resolve().parent / "weights" / "v0.1" / "vgg.pth"


def find_vgg16_weights(backbone_weights: str | os.PathLike | None) -> Path | None:
    """The VGG16 weight file to use, or None when none is configured and the torch cache has none.

    A path given explicitly (argument or environment) must exist: a typo should fail loudly rather than
    fall through to another file.
    """
    environment_value = os.environ.get(VGG16_WEIGHTS_ENV, "").strip()
    for source, value in (("backbone_weights", backbone_weights), (VGG16_WEIGHTS_ENV, environment_value)):
        if value:
            path = Path(value).expanduser()
            if not path.is_file():
                raise UserError(f"VGG16 weights file from {source} not found: {path}")
            return path
    cached = torch_cache_vgg16_path()
    return cached if cached.is_file() else None


def load_tensor_file(path: Path, what: str) -> Mapping[str, Tensor]:
    """Read a tensors-only checkpoint (.safetensors, or a torch file via ``weights_only=True``)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling, corrupt zip, truncated file: all one user-facing problem
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise UserError(f"cannot read {what} from {path}: {type(error).__name__}: {first_line}") from error
    if not isinstance(state, Mapping):
        raise UserError(f"{what} in {path} is a {type(state).__name__}, expected a state dict of tensors")
    return state


def vgg16_features_to_lpips_slices(state: Mapping[str, Tensor], trunk: nn.Module) -> dict[str, Tensor]:
    """Rename a torchvision VGG16 state dict onto the lpips trunk's slices.

    torchvision names the convolutions ``features.<index>.{weight,bias}``; lpips keeps the same layers,
    same indices, split into ``slice1..slice5`` (``slice3.10.weight`` is ``features.10.weight``). The
    mapping is read off the trunk itself rather than hard-coded. Keys without the ``features.`` prefix (a
    saved ``vgg.features`` module) are accepted too; the classifier is ignored.
    """
    renamed: dict[str, Tensor] = {}
    missing: list[str] = []
    for trunk_key in trunk.state_dict():
        _slice_name, layer_index, parameter_name = trunk_key.split(".")
        feature_key = f"{layer_index}.{parameter_name}"
        for candidate in (f"features.{feature_key}", feature_key):
            if candidate in state:
                renamed[trunk_key] = state[candidate]
                break
        else:
            missing.append(f"features.{feature_key}")
    if missing:
        raise UserError(
            f"not a torchvision VGG16 state dict: missing {len(missing)} keys, e.g. {', '.join(missing[:3])}"
        )
    return renamed


def build_uninitialised_lpips_vgg() -> lpips.LPIPS:
    """The lpips VGG network with its weights allocated but not yet set.

    ``lpips.LPIPS`` builds a whole torchvision VGG16 (138M parameters, 102M of them in the classifier it
    then throws away); initialising that takes seconds on a CPU. Building on the meta device skips the
    initialisation; the caller then fills every tensor: linear heads and trunk from files (or the trunk
    randomly), and the input scaling constants are re-created here.
    """
    with warnings.catch_warnings(), torch.device("meta"):
        # lpips still calls torchvision with the deprecated ``pretrained=`` argument.
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        network = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
    network.to_empty(device="cpu")
    network.scaling_layer = lpips.ScalingLayer()  # its constant shift/scale buffers were never materialised
    return network


def load_linear_heads(network: lpips.LPIPS) -> None:
    """Load the shipped lin0..lin4 weights; they must cover every head (``lins`` aliases the same modules)."""
    path = lpips_linear_heads_path()
    loaded = network.load_state_dict(load_tensor_file(path, "LPIPS linear heads"), strict=False)
    missing_heads = [
        key for key in loaded.missing_keys if key.startswith("lin") and not key.startswith("lins.")
    ]
    if loaded.unexpected_keys or missing_heads:
        raise UserError(f"the LPIPS linear heads at {path} do not match the VGG trunk")


def initialise_trunk_randomly(trunk: nn.Module) -> None:
    """torchvision's VGG initialisation for the convolutions (Kaiming normal, fan-out; zero bias). Tests only."""
    for module in trunk.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)


def load_trunk(trunk: nn.Module, weights_path: Path) -> None:
    """Load ImageNet VGG16 convolution weights (torchvision format) into the lpips trunk."""
    trunk_state = vgg16_features_to_lpips_slices(load_tensor_file(weights_path, "VGG16 weights"), trunk)
    try:
        trunk.load_state_dict(trunk_state, strict=True)
    except RuntimeError as error:  # right names, wrong shapes: not VGG16 (e.g. another VGG depth)
        raise UserError(
            f"VGG16 weights in {weights_path} do not fit the VGG16 trunk (tensor shapes differ)"
        ) from error


class PerceptualLoss(nn.Module):
    """LPIPS distance with the VGG16 trunk; images in [−1, 1], (B, 3, H, W).

    Frozen and always in eval mode (``train()`` is overridden) so it can sit inside a model that is
    switched to training without its dropout turning on. ``random_backbone=True`` keeps a randomly
    initialised trunk and looks for no file: for tests only, the distance is then meaningless. Missing
    weights raise ``UserError`` with the three ways to provide them.
    """

    def __init__(
        self, backbone_weights: str | os.PathLike | None = None, random_backbone: bool = False
    ) -> None:
        super().__init__()
        if random_backbone and backbone_weights is not None:
            raise ValueError("PerceptualLoss: pass either backbone_weights or random_backbone=True, not both")
        weights_path = None if random_backbone else find_vgg16_weights(backbone_weights)
        if weights_path is None and not random_backbone:
            raise UserError(
                f"LPIPS needs ImageNet VGG16 weights ({VGG16_URL}) and found none: pass the file's path, "
                f"set {VGG16_WEIGHTS_ENV}=<path>, or put it at {torch_cache_vgg16_path()}"
            )
        self.network = build_uninitialised_lpips_vgg()
        load_linear_heads(self.network)
        if weights_path is None:
            initialise_trunk_randomly(self.network.net)
        else:
            load_trunk(self.network.net, weights_path)
        self.weights_path = weights_path
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> PerceptualLoss:
        """Stay in eval mode whatever is asked: LPIPS is a fixed metric, its dropout must stay off."""
        return super().train(False)

    def per_image(self, x: Tensor, y: Tensor) -> Tensor:
        """LPIPS distance of each pair, (B,). Gradients flow to the images, not to the network."""
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(
                f"PerceptualLoss expects two (B, 3, H, W) images of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        distance = self.network(x, y)  # (B, 1, 1, 1): spatial average of the five weighted layer distances
        return distance.flatten()

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Mean LPIPS distance over the batch, a scalar."""
        return self.per_image(x, y).mean()

"""PatchGAN discriminator: pix2pix's NLayerDiscriminator as used by taming-transformers and LDM."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn

DISCRIMINATOR_NORMS = ("batch", "group", "none")


@dataclass
class PatchDiscriminatorConfig:
    """Shape of the PatchGAN.

    ``norm``: "batch" is the original recipe. "group" exists because BatchNorm statistics are per device:
    under DeepSpeed / DDP each rank normalises with its own (small, differently composed) batch of real
    or fake images, and the running statistics drift between ranks, whereas GroupNorm normalises each
    sample alone and behaves the same on any number of ranks. "none" drops normalisation entirely.
    """

    in_channels: int = 3
    base_channels: int = 64
    num_layers: int = 3
    norm: str = "batch"


def normalisation_layer(norm: str, channels: int) -> nn.Module:
    """The normalisation after each inner convolution."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        # 32 groups as usual, or fewer when the width is not a multiple of 32 (gcd keeps them dividing).
        return nn.GroupNorm(math.gcd(32, channels), channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown discriminator norm {norm!r}; expected one of {', '.join(DISCRIMINATOR_NORMS)}")


class PatchDiscriminator(nn.Module):
    """A convolutional discriminator that scores overlapping patches: (B, C, H, W) -> logits (B, 1, h, w).

    Layout (4×4 kernels, padding 1, LeakyReLU 0.2): a stride-2 conv to ``base_channels`` without norm,
    ``num_layers − 1`` stride-2 conv + norm blocks doubling the width (capped at 8× base), one stride-1
    conv + norm block, and a stride-1 conv to one channel. With the defaults the receptive field is 70×70
    pixels and a 256×256 image gives a 30×30 logit map. Inner convolutions have no bias when followed by
    a norm with its own shift (batch, group): the bias would be cancelled by the normalisation.
    """

    def __init__(self, config: PatchDiscriminatorConfig | None = None) -> None:
        super().__init__()
        config = config or PatchDiscriminatorConfig()
        if config.num_layers < 1:
            raise ValueError(f"PatchDiscriminator needs num_layers >= 1, got {config.num_layers}")
        if config.norm not in DISCRIMINATOR_NORMS:
            raise ValueError(
                f"unknown discriminator norm {config.norm!r}; expected one of {', '.join(DISCRIMINATOR_NORMS)}"
            )
        self.config = config
        inner_bias = config.norm == "none"

        layers: list[nn.Module] = [
            nn.Conv2d(config.in_channels, config.base_channels, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        channels = config.base_channels
        for layer_index in range(1, config.num_layers + 1):
            # The last inner block keeps the resolution (stride 1); the others halve it.
            stride = 2 if layer_index < config.num_layers else 1
            out_channels = config.base_channels * min(2**layer_index, 8)
            layers += [
                nn.Conv2d(channels, out_channels, kernel_size=4, stride=stride, padding=1, bias=inner_bias),
                normalisation_layer(config.norm, out_channels),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            channels = out_channels
        layers.append(nn.Conv2d(channels, 1, kernel_size=4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)
        self.apply(initialise_weights)

    def forward(self, images: Tensor) -> Tensor:
        """Patch logits (B, 1, h, w) for images (B, C, H, W); with 3 layers h = H/8 − 2."""
        return self.layers(images)


def initialise_weights(module: nn.Module) -> None:
    """pix2pix / taming initialisation: conv weights N(0, 0.02), norm scales N(1, 0.02), shifts 0.

    Conv biases are zeroed too (taming leaves PyTorch's default), so the untrained discriminator's output
    does not start from a random offset.
    """
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d | nn.GroupNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)

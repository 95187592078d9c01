"""LDM-style convolutional pixel encoder and decoder (diffusers' `Encoder`/`Decoder` blocks).

The number of resolution levels follows from the spatial factor: a 16×16 latent decoded to 256×256
needs four 2× upsamplings, i.e. five levels of `block_out_channels`.
"""

from __future__ import annotations

import torch
from diffusers.models.autoencoders.vae import Decoder, Encoder
from torch import nn

from tokenizer.layers.vit import num_upsampling_stages


def _level_channels(base_channels: int, multipliers: tuple[int, ...], levels: int) -> tuple[int, ...]:
    if len(multipliers) < levels:
        multipliers = tuple(multipliers) + (multipliers[-1],) * (levels - len(multipliers))
    return tuple(base_channels * m for m in multipliers[:levels])


class CNNPixelDecoder(nn.Module):
    """latent (B, C, h, w) -> images (B, 3, h·f, w·f), the LDM decoder (ResNet blocks, mid attention, GroupNorm)."""

    def __init__(self, latent_channels: int, factor: int, base_channels: int, channel_multipliers: tuple[int, ...],
                 layers_per_block: int, norm_groups: int = 32, mid_attention: bool = True):
        super().__init__()
        levels = num_upsampling_stages(factor) + 1
        self.decoder = Decoder(
            in_channels=latent_channels,
            out_channels=3,
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=_level_channels(base_channels, channel_multipliers, levels),
            layers_per_block=layers_per_block,
            norm_num_groups=norm_groups,
            mid_block_add_attention=mid_attention,
        )

    @property
    def last_layer(self) -> nn.Module:
        """The output conv, whose weight the adaptive GAN weight differentiates against."""
        return self.decoder.conv_out

    def last_output_to_image(self, output: torch.Tensor) -> torch.Tensor:
        return output  # the output conv's result is the image

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.decoder(latent)


class CNNPixelEncoder(nn.Module):
    """images (B, 3, H, W) -> moments (B, out, H/f, W/f), the LDM encoder (SD-VAE / MAR-VAE / ReaLS)."""

    def __init__(self, out_channels: int, factor: int, base_channels: int, channel_multipliers: tuple[int, ...],
                 layers_per_block: int, norm_groups: int = 32, mid_attention: bool = True):
        super().__init__()
        levels = num_upsampling_stages(factor) + 1
        self.encoder = Encoder(
            in_channels=3,
            out_channels=out_channels,
            down_block_types=("DownEncoderBlock2D",) * levels,
            block_out_channels=_level_channels(base_channels, channel_multipliers, levels),
            layers_per_block=layers_per_block,
            norm_num_groups=norm_groups,
            double_z=False,
            mid_block_add_attention=mid_attention,
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)

"""Spatial and channel downsamplers: S-AE's stride-2 convolutions and GAE's semantic-teacher downsampler."""

from __future__ import annotations

import torch
from timm.layers import RmsNorm, SwiGLU
from timm.models.vision_transformer import Block
from torch import nn

from tokenizer.layers.vit import sincos_position_embedding_2d


class StrideConvDownsampler(nn.Module):
    """S-AE: k stride-2 3×3 convolutions on the (B, D, h, w) feature map, so the compression is f = 16·2^k."""

    def __init__(self, channels: int, num_layers: int):
        super().__init__()
        layers: list[nn.Module] = []
        for index in range(num_layers):
            layers.append(nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1))
            if index < num_layers - 1:
                layers.append(nn.SiLU())
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


def _llama_style_block(dim: int, num_heads: int) -> Block:
    return Block(dim, num_heads, mlp_ratio=8 / 3, qkv_bias=False, norm_layer=RmsNorm, mlp_layer=SwiGLU)


class SemanticDownsampler(nn.Module):
    """GAE's E_sp: one self-attention block over the VFM tokens, then a non-overlapping patch convolution
    to the autoencoder's latent width ("Attention + Patch Conv", GAE §4.2, Table 2).

    (B, D, h, w) VFM features -> (B, d, h/p, w/p) teacher latent.
    """

    def __init__(self, in_channels: int, latent_channels: int, num_heads: int, patch: int = 1):
        super().__init__()
        self.attention = _llama_style_block(in_channels, num_heads)
        self.patch_conv = nn.Conv2d(in_channels, latent_channels, kernel_size=patch, stride=patch)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = features.shape
        tokens = features.flatten(2).transpose(1, 2)  # (B, h*w, D)
        tokens = self.attention(tokens)
        return self.patch_conv(tokens.transpose(1, 2).reshape(batch, channels, height, width))


class SemanticTeacherDecoder(nn.Module):
    """GAE's auxiliary D_sp: a small Llama-style transformer that recovers the VFM tokens' directions from
    the teacher latent; used only while pre-training E_sp (cosine distillation), then discarded."""

    def __init__(self, latent_channels: int, out_channels: int, hidden_size: int, depth: int, num_heads: int, patch: int = 1):
        super().__init__()
        self.input = nn.ConvTranspose2d(latent_channels, hidden_size, kernel_size=patch, stride=patch)
        self.blocks = nn.Sequential(*(_llama_style_block(hidden_size, num_heads) for _ in range(depth)))
        self.norm = RmsNorm(hidden_size)
        self.output = nn.Linear(hidden_size, out_channels)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """(B, d, h', w') -> (B, D, h, w)."""
        hidden = self.input(latent)
        batch, channels, height, width = hidden.shape
        tokens = hidden.flatten(2).transpose(1, 2)
        tokens = tokens + sincos_position_embedding_2d(channels, height, width).to(tokens)
        tokens = self.output(self.norm(self.blocks(tokens)))
        return tokens.transpose(1, 2).reshape(batch, -1, height, width)

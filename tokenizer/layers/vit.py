"""ViT pixel encoder and decoder (RAE's decoder, GAE's encoder/decoder): timm blocks with RMSNorm + SwiGLU."""

from __future__ import annotations

import math

import torch
from timm.layers import RmsNorm, SwiGLU
from timm.models.vision_transformer import Block
from torch import nn


def sincos_position_embedding_2d(dim: int, height: int, width: int) -> torch.Tensor:
    """Fixed 2D sine-cosine embeddings (1, h*w, dim), row-major: half the channels encode y, half x."""
    if dim % 4:
        raise ValueError(f"sin-cos embedding needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    frequencies = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij")
    angles_y = ys.reshape(-1, 1) * frequencies
    angles_x = xs.reshape(-1, 1) * frequencies
    table = torch.cat([angles_y.sin(), angles_y.cos(), angles_x.sin(), angles_x.cos()], dim=1)
    return table.float().unsqueeze(0)


def _blocks(dim: int, depth: int, num_heads: int, mlp_ratio: float) -> nn.Sequential:
    return nn.Sequential(
        *(Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=RmsNorm, mlp_layer=SwiGLU) for _ in range(depth))
    )


class ViTPixelEncoder(nn.Module):
    """images (B, 3, H, W) -> features (B, out, H/p, W/p) through a patch embedding and ViT blocks."""

    def __init__(self, image_size: int, patch_size: int, hidden_size: int, depth: int, num_heads: int, out_channels: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.grid = image_size // patch_size
        self.patch_embedding = nn.Conv2d(3, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.register_buffer("position", sincos_position_embedding_2d(hidden_size, self.grid, self.grid), persistent=False)
        self.blocks = _blocks(hidden_size, depth, num_heads, mlp_ratio)
        self.norm = RmsNorm(hidden_size)
        self.projection = nn.Linear(hidden_size, out_channels)  # GAE's projector A_p

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embedding(images).flatten(2).transpose(1, 2) + self.position.to(images.dtype)
        tokens = self.projection(self.norm(self.blocks(tokens)))
        return tokens.transpose(1, 2).reshape(images.shape[0], -1, self.grid, self.grid)


class ViTPixelDecoder(nn.Module):
    """latent (B, C, h, w) -> images (B, 3, h·p, w·p): linear in, ViT blocks, linear to p×p×3 pixels per token."""

    def __init__(self, latent_channels: int, grid_size: int, patch_size: int, hidden_size: int, depth: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.grid = grid_size
        self.patch_size = patch_size
        self.input = nn.Linear(latent_channels, hidden_size)
        self.register_buffer("position", sincos_position_embedding_2d(hidden_size, grid_size, grid_size), persistent=False)
        self.blocks = _blocks(hidden_size, depth, num_heads, mlp_ratio)
        self.norm = RmsNorm(hidden_size)
        self.output = nn.Linear(hidden_size, patch_size * patch_size * 3)

    @property
    def last_layer(self) -> nn.Module:
        """The output projection, whose weight the adaptive GAN weight differentiates against."""
        return self.output

    def last_output_to_image(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, h*w, p*p*3) pixel patches -> (B, 3, h·p, w·p)."""
        batch, p, g = patches.shape[0], self.patch_size, self.grid
        patches = patches.reshape(batch, g, g, p, p, 3)
        return patches.permute(0, 5, 1, 3, 2, 4).reshape(batch, 3, g * p, g * p)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        tokens = self.input(latent.flatten(2).transpose(1, 2)) + self.position.to(latent.dtype)
        return self.last_output_to_image(self.output(self.norm(self.blocks(tokens))))


def num_upsampling_stages(factor: int) -> int:
    stages = int(round(math.log2(factor)))
    if 2**stages != factor:
        raise ValueError(f"up/downsampling factor {factor} is not a power of two")
    return stages

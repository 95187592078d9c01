"""The wide DDT head (RAE's DiT^DH, after DDT): a few wide transformer blocks that turn the backbone's output
at the noisy image tokens into a velocity.

Each block is a DiT block with adaLN-Zero, but the modulation is **per token**: the condition of a token is
its backbone hidden state (projected to the head width) plus the timestep embedding. The head re-embeds the
noisy latent itself (a long skip from the input), so the narrow backbone only has to supply semantics and
the wide head does the denoising in a space wider than the latent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from unimm.models.config import HeadConfig
from unimm.models.embeddings import TimestepEmbedder, sincos_2d_positions


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class HeadAttention(nn.Module):
    """Full self-attention among the tokens of one image (the head never mixes images)."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"head width {hidden_size} is not divisible by {num_heads} attention heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.query_norm = nn.RMSNorm(hidden_size // num_heads, eps=1e-6)  # QK-norm keeps wide-head logits tame
        self.key_norm = nn.RMSNorm(hidden_size // num_heads, eps=1e-6)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (images, tokens, width)
        query, key, value = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        attended = F.scaled_dot_product_attention(self.query_norm(query), self.key_norm(key), value)
        return self.proj(rearrange(attended, "b h n d -> b n (h d)"))


class DDTBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attention = HeadAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, hidden_size))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        # x, condition: (images, tokens, width); six modulation vectors per token.
        shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = self.modulation(condition).chunk(6, dim=-1)
        x = x + gate_attn * self.attention(modulate(self.norm1(x), shift_attn, scale_attn))
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, output_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.linear = nn.Linear(hidden_size, output_size)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(condition).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DDTHead(nn.Module):
    def __init__(self, config: HeadConfig, token_size: int, condition_size: int, frequency_size: int = 256):
        super().__init__()
        self.config = config
        width = config.hidden_size
        self.input_projection = nn.Linear(token_size, width)  # re-embeds the noisy latent: the long skip
        self.condition_projection = nn.Linear(condition_size, width)
        self.timestep_embedder = TimestepEmbedder(width, frequency_size)
        self.blocks = nn.ModuleList(DDTBlock(width, config.num_heads, config.mlp_ratio) for _ in range(config.depth))
        self.final_layer = FinalLayer(width, token_size)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's adaLN-Zero: every block starts as the identity and the head predicts zero velocity."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            nn.init.zeros_(block.modulation[-1].weight)
            nn.init.zeros_(block.modulation[-1].bias)
        nn.init.zeros_(self.final_layer.modulation[-1].weight)
        nn.init.zeros_(self.final_layer.modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        nn.init.normal_(self.timestep_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.timestep_embedder.mlp[2].weight, std=0.02)

    def forward(
        self, noisy_tokens: torch.Tensor, backbone_hidden: torch.Tensor, t: torch.Tensor, grid: tuple[int, int]
    ) -> torch.Tensor:
        """noisy_tokens (images, n, C*P*P), backbone_hidden (images, n, backbone width), t (images,) -> velocity
        tokens (images, n, C*P*P); n = grid[0] * grid[1]."""
        positions = sincos_2d_positions(*grid, self.config.hidden_size, device=noisy_tokens.device).to(noisy_tokens.dtype)
        x = self.input_projection(noisy_tokens) + positions[None]
        condition = self.condition_projection(backbone_hidden) + self.timestep_embedder(t)[:, None]
        for block in self.blocks:
            x = block(x, condition)
        return self.final_layer(x, condition)

"""PS-VAE's semantic encoder and decoder: transformer blocks inherited from the representation encoder + an MLP.

Semantic encoder: patch features (B, N, D) -> L copied encoder blocks -> MLP D -> 2·C (mean, log-variance).
Semantic decoder (symmetric): latent (B, N, C) -> MLP C -> D -> L copied encoder blocks -> (B, N, D).
Starting both stacks from the encoder's own last blocks keeps the initial mapping close to the
feature space they must reconstruct (PS-VAE §3.3: "three Transformer blocks inherited from the
representation encoder and an MLP projection layer").
"""

from __future__ import annotations

import torch
from torch import nn

from tokenizer.encoders import EncoderBlockStack


def projection_mlp(in_features: int, out_features: int, hidden_features: int) -> nn.Sequential:
    """Two linear layers with a GELU: the dimensionality adjustment between features and latent."""
    return nn.Sequential(nn.Linear(in_features, hidden_features), nn.GELU(), nn.Linear(hidden_features, out_features))


class SemanticEncoder(nn.Module):
    def __init__(self, blocks: EncoderBlockStack, hidden_size: int, latent_channels: int, mlp_hidden: int = 0):
        super().__init__()
        self.blocks = blocks
        self.norm = nn.LayerNorm(hidden_size)
        self.projection = projection_mlp(hidden_size, 2 * latent_channels, mlp_hidden or hidden_size)

    def forward(self, tokens: torch.Tensor, grid_size: int) -> torch.Tensor:
        """tokens (B, N, D) -> moments (B, N, 2C): mean then log-variance."""
        return self.projection(self.norm(self.blocks(tokens, grid_size)))


class SemanticDecoder(nn.Module):
    def __init__(self, blocks: EncoderBlockStack, hidden_size: int, latent_channels: int, mlp_hidden: int = 0):
        super().__init__()
        self.projection = projection_mlp(latent_channels, hidden_size, mlp_hidden or hidden_size)
        self.blocks = blocks
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, latent_tokens: torch.Tensor, grid_size: int) -> torch.Tensor:
        """latent tokens (B, N, C) -> reconstructed encoder features (B, N, D)."""
        return self.norm(self.blocks(self.projection(latent_tokens), grid_size))

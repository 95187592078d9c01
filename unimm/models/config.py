"""Typed configuration of the generator model (the architecture only; training lives in unimm.train_config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class BackboneConfig:
    # A hub id (Qwen/Qwen2.5-0.5B, -1.5B, -3B) or a local Qwen2-format directory (config.json, weights,
    # tokenizer files). The same path serves the text tokenizer.
    name_or_path: str = "Qwen/Qwen2.5-0.5B"
    # Load the pretrained weights (False: the same architecture, randomly initialised).
    pretrained: bool = True
    # sdpa (default, any device) | eager | flex_attention (a BlockMask built from the same rule) |
    # flash_attention_2: our varlen plan of the block-causal mask (`varlen_attention.py`) through flash-attn's
    # varlen kernel on CUDA fp16/bf16 when flash-attn is installed, else SDPA with the dense mask.
    attention: Literal["sdpa", "eager", "flex_attention", "flash_attention_2"] = "sdpa"
    # Longest caption kept (tokens); longer captions are truncated from the end.
    max_text_tokens: int = 128


@dataclass
class HeadConfig:
    """The wide DDT head (RAE's DiT^DH): a few wide adaLN blocks over the image tokens."""

    hidden_size: int = 2048
    depth: int = 2
    num_heads: int = 16
    mlp_ratio: float = 4.0


@dataclass
class GeneratorModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    # Latent channels C of the tokenizer (0: read from the tokenizer when the model is built for training).
    latent_channels: int = 96
    # Latents are cut into P x P patches, one token each (P = 1 for 16x16 semantic latents).
    latent_patch_size: int = 1
    # Sinusoidal features fed to the timestep MLPs.
    timestep_frequency_size: int = 256
    # Add the backbone's final state at each sample's last text token (projected; the projection starts at zero)
    # to every noisy image token's input, beside the timestep embedding. Causal text means an early word cannot
    # know what follows it ("red circle" before "left of a blue square"); the last token has read the whole
    # caption, and this hands that reading to every image token from the first layer on. Costs one extra
    # backbone pass over the prefix in training (none in KV-cached sampling, which runs the prefix anyway).
    text_summary: bool = False
    # Experimental: in the first `text_blind_layers` backbone layers the noisy image tokens do not see the text
    # (they still see each other and the clean input image). In a backbone trained from scratch, the first
    # layer's text keys are bare word embeddings, and reading the caption there gives the image tokens a bag of
    # words; hiding it there makes them read contextualised text states from the later layers.
    text_blind_layers: int = 0

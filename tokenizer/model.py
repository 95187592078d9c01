"""The semantic autoencoder: one `nn.Module` for every preset (PS-VAE, S-AE, GAE, ReaLS, RAE, VAE).

Public interface (the only thing the generator sees):
- `encode(images in [-1, 1]) -> latents (B, C, h, w)`: the deterministic latent (posterior mean);
- `decode(latents) -> images in [-1, 1]`;
- `latent_statistics` (exact per-channel mean / variance) and `shift` = sqrt(C·P²/16);
- `save_pretrained(dir)` / `from_pretrained(dir)`: config.json + model.safetensors (+ the backbone's
  transformers config, so the model is rebuilt offline) + latent_statistics.safetensors.

Training-only parts (semantic decoder, alignment heads, GAE's semantic downsampler) live in the same
module so one state dict holds a run; frozen teachers are built by the trainer and never saved here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tokenizer.config import TokenizerModelConfig
from tokenizer.encoder_catalog import catalog_config
from tokenizer.encoders import RepresentationEncoder, map_to_tokens, tokens_to_map
from tokenizer.layers.alignment import AlignmentHeads
from tokenizer.layers.bottleneck import build_bottleneck
from tokenizer.layers.cnn import CNNPixelDecoder, CNNPixelEncoder
from tokenizer.layers.downsample import SemanticDownsampler, SemanticTeacherDecoder, StrideConvDownsampler
from tokenizer.layers.semantic import SemanticDecoder, SemanticEncoder
from tokenizer.layers.vit import ViTPixelDecoder, ViTPixelEncoder
from unimm.atomic import atomic_write, atomic_write_text
from unimm.errors import UserError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ENCODER_CONFIG_DIR = "representation_encoder"
STATISTICS_NAME = "latent_statistics.safetensors"
SHIFT_BASE_CHANNELS = 16  # PS-VAE §4.1: s = sqrt(C·P² / (C_base·P_base²)) with the Flux-VAE base C=16, P=1


def shift_factor(channels: int, patch_size: int = 1) -> float:
    """Timestep shift for a latent with `channels` channels patchified by `patch_size` in the generator."""
    return math.sqrt(channels * patch_size**2 / SHIFT_BASE_CHANNELS)


def load_encoder_config(name_or_path: str):
    """The transformers config of a representation encoder: a local directory, the catalogue, or the hub."""
    import transformers

    path = Path(name_or_path)
    if (path / "config.json").is_file():
        return transformers.AutoConfig.from_pretrained(name_or_path)
    catalogued = catalog_config(name_or_path)
    if catalogued is not None:
        return catalogued
    from tokenizer.shapes_encoder import ShapesEncoderConfig, backbone_config

    if path == Path(ShapesEncoderConfig.output_dir):
        # Not trained yet (or still training): the architecture `unimm shapes train-encoder` will write there.
        return backbone_config(ShapesEncoderConfig())
    if path.is_dir():
        raise UserError(f"'{name_or_path}' has no config.json: not a save_pretrained encoder directory (or still being written)")
    try:
        return transformers.AutoConfig.from_pretrained(name_or_path)
    except OSError as error:
        raise UserError(
            f"cannot load the representation encoder config '{name_or_path}' ({error.__class__.__name__}); "
            "pass a local save_pretrained directory or a reachable hub id"
        ) from None


class SemanticAutoencoder(nn.Module):
    def __init__(self, config: TokenizerModelConfig, backbone: RepresentationEncoder | None = None):
        """`backbone`: the representation encoder the latent is computed from (role = backbone), already built."""
        super().__init__()
        self.config = config
        family, latent = config.family, config.latent
        if (config.encoder.role == "backbone") != (backbone is not None):
            raise ValueError(f"encoder role {config.encoder.role!r} and the given backbone disagree")
        self.backbone = backbone
        self.semantic_encoder = self.semantic_decoder = self.semantic_linear_readout = None
        self.downsampler = self.quant_projection = None
        self.pixel_encoder = None
        self.semantic_downsampler = self.semantic_teacher_decoder = None
        self.alignment_heads = None

        if backbone is not None:
            grid = backbone.grid_size // 2**latent.downsample_layers
            hidden = backbone.hidden_size
            if family == "psvae":
                self.semantic_encoder = SemanticEncoder(
                    backbone.copy_last_blocks(config.semantic.num_blocks), hidden, latent.channels, config.semantic.mlp_hidden
                )
                if config.semantic.decoder:
                    self.semantic_decoder = SemanticDecoder(
                        backbone.copy_last_blocks(config.semantic.num_blocks), hidden, latent.channels, config.semantic.mlp_hidden
                    )
                if config.semantic.linear_readout:
                    self.semantic_linear_readout = nn.Linear(latent.channels, hidden)  # (B, N, C) -> (B, N, D), per cell
            elif latent.bottleneck == "gaussian":
                if latent.downsample_layers:
                    self.downsampler = StrideConvDownsampler(hidden, latent.downsample_layers)
                self.quant_projection = nn.Conv2d(hidden, 2 * latent.channels, kernel_size=1)
            elif latent.channels != hidden:
                raise ValueError(f"{latent.bottleneck} keeps the encoder width: latent.channels must be {hidden}")
        else:
            grid = config.image_size // latent.factor
            encoder_config = config.pixel_encoder
            out_channels = 2 * latent.channels if latent.bottleneck == "gaussian" else latent.channels
            if encoder_config.kind == "cnn":
                self.pixel_encoder = CNNPixelEncoder(
                    out_channels, latent.factor, encoder_config.base_channels, encoder_config.channel_multipliers,
                    encoder_config.layers_per_block, encoder_config.norm_groups,
                )
            elif encoder_config.kind == "vit":
                self.pixel_encoder = ViTPixelEncoder(
                    config.image_size, latent.factor, encoder_config.hidden_size, encoder_config.depth,
                    encoder_config.num_heads, out_channels,
                )
            else:
                raise ValueError(f"family {family!r} without a backbone encoder needs pixel_encoder.kind cnn or vit")
        if grid * latent.factor != config.image_size:
            raise ValueError(
                f"latent grid {grid}x{grid} with factor {latent.factor} does not give image_size {config.image_size}; "
                "set latent.factor = image_size / grid"
            )
        self.latent_grid = grid
        self.bottleneck = build_bottleneck(latent.bottleneck, latent.noise_std)

        decoder = config.pixel_decoder
        if decoder.kind == "cnn":
            self.pixel_decoder = CNNPixelDecoder(
                latent.channels, latent.factor, decoder.base_channels, decoder.channel_multipliers,
                decoder.layers_per_block, decoder.norm_groups, decoder.mid_attention,
            )
        else:
            self.pixel_decoder = ViTPixelDecoder(
                latent.channels, grid, latent.factor, decoder.hidden_size, decoder.depth, decoder.num_heads
            )

        auxiliary = config.auxiliary
        if auxiliary.semantic_downsampler or auxiliary.alignment_heads:
            teacher_config = load_encoder_config(config.encoder.name_or_path)
            teacher_hidden = int(teacher_config.hidden_size)
            teacher_grid = config.encoder.image_size // int(teacher_config.patch_size)
            if auxiliary.semantic_downsampler:
                patch = max(1, teacher_grid // grid)
                self.semantic_downsampler = SemanticDownsampler(teacher_hidden, latent.channels, auxiliary.downsampler_heads, patch)
                self.semantic_teacher_decoder = SemanticTeacherDecoder(
                    latent.channels, teacher_hidden, auxiliary.teacher_decoder_hidden, auxiliary.teacher_decoder_depth,
                    max(1, auxiliary.teacher_decoder_hidden // 64), patch,
                )
            if auxiliary.alignment_heads:
                self.alignment_heads = AlignmentHeads(latent.channels, teacher_hidden, auxiliary.alignment_hidden, teacher_grid)

        # Exact per-channel statistics of `encode` over a dataset; the generator normalises with them.
        self.register_buffer("latent_mean", torch.zeros(latent.channels))
        self.register_buffer("latent_var", torch.ones(latent.channels))
        self.register_buffer("latent_statistics_count", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------------------------ build
    @classmethod
    def build(cls, config: TokenizerModelConfig, pretrained_encoder: bool = True,
              encoder_config_dir: str | Path | None = None) -> SemanticAutoencoder:
        """Build a preset; the backbone comes from `from_pretrained`, or is randomly initialised from a config:
        the preset encoder's (`pretrained_encoder=False`) or the one in `encoder_config_dir` (e.g. saved inside a
        tokenizer whose weights will replace these, so the preset's encoder need not exist on this machine)."""
        backbone = None
        if config.encoder.role == "backbone":
            name = str(encoder_config_dir) if encoder_config_dir is not None else config.encoder.name_or_path
            kind = config.encoder.kind or None
            if pretrained_encoder and encoder_config_dir is None:
                try:
                    backbone = RepresentationEncoder.from_pretrained(name, kind=kind, image_size=config.encoder.image_size)
                except OSError as error:
                    raise UserError(
                        f"cannot load representation encoder '{name}' ({error.__class__.__name__}); pass "
                        "model.encoder.name_or_path=<local save_pretrained dir> or make the hub id reachable"
                    ) from None
            else:
                backbone = RepresentationEncoder.from_config(load_encoder_config(name), kind=kind, image_size=config.encoder.image_size)
        return cls(config, backbone)

    # ----------------------------------------------------------------------------------- shapes
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.config.latent.channels, self.latent_grid, self.latent_grid)

    @property
    def shift(self) -> float:
        return shift_factor(self.config.latent.channels)

    # ---------------------------------------------------------------------------------- forward
    def backbone_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the representation encoder's patch tokens (B, N, D)."""
        return self.backbone.patch_tokens(images)

    def _pre_bottleneck(self, images: torch.Tensor, train_backbone: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (moments or features map (B, *, h, w), backbone tokens or None)."""
        if self.backbone is None:
            return self.pixel_encoder(images), None
        if train_backbone:
            tokens = self.backbone_tokens(images)
        else:
            with torch.no_grad():  # a frozen encoder (stage 1) needs no graph
                tokens = self.backbone_tokens(images)
        grid = self.backbone.grid_size
        if self.semantic_encoder is not None:
            return tokens_to_map(self.semantic_encoder(tokens, grid), grid), tokens
        features = tokens_to_map(tokens, grid)
        if self.downsampler is not None:
            features = self.downsampler(features)
        if self.quant_projection is not None:
            features = self.quant_projection(features)
        return features, tokens

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> deterministic latents (B, C, h, w)."""
        pre_bottleneck, _ = self._pre_bottleneck(images)
        return self.bottleneck.mode(pre_bottleneck)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B, C, h, w) -> images (B, 3, H, W), nominally in [-1, 1]."""
        return self.pixel_decoder(latents)

    def forward(
        self,
        images: torch.Tensor,
        sample: bool = True,
        detach_pixel_latent: bool = False,
        train_backbone: bool = True,
        teacher_tokens: torch.Tensor | None = None,
        teacher_stage: bool = False,
        decoder_only: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Everything the losses need for one batch.

        `teacher_tokens` (B, N, D): the frozen teacher's patch tokens, for GAE's semantic downsampler.
        `teacher_stage`: GAE's first stage — only E_sp and D_sp run (cosine feature distillation).
        `decoder_only`: the pixel-decoder stage — encoder and bottleneck run without a graph.
        """
        if decoder_only:
            with torch.no_grad():
                pre_bottleneck, _ = self._pre_bottleneck(images, train_backbone=False)
                latent, _ = self.bottleneck(pre_bottleneck, sample=sample)
            return {"latent": latent, "reconstruction": self.pixel_decoder(latent)}
        if teacher_stage:
            teacher_map = tokens_to_map(teacher_tokens, math.isqrt(teacher_tokens.shape[1]))
            return {"teacher_reconstruction": map_to_tokens(self.semantic_teacher_decoder(self.semantic_downsampler(teacher_map)))}
        pre_bottleneck, tokens = self._pre_bottleneck(images, train_backbone)
        latent, posterior = self.bottleneck(pre_bottleneck, sample=sample)
        pixel_input = latent.detach() if detach_pixel_latent else latent
        outputs = {"latent": latent, "reconstruction": self.pixel_decoder(pixel_input), **posterior}
        if tokens is not None:
            outputs["encoder_tokens"] = tokens
        latent_tokens = map_to_tokens(latent)  # (B, h*w, C): what both semantic read-backs take
        if self.semantic_decoder is not None:
            outputs["semantic_reconstruction"] = self.semantic_decoder(latent_tokens, self.backbone.grid_size)
        if self.semantic_linear_readout is not None:
            outputs["linear_semantic_reconstruction"] = self.semantic_linear_readout(latent_tokens)
        if self.alignment_heads is not None:
            outputs["aligned_patches"], outputs["aligned_cls"] = self.alignment_heads(posterior["mean"])
        if self.semantic_downsampler is not None and teacher_tokens is not None:
            with torch.no_grad():  # E_sp is frozen once its own stage is over
                teacher_map = tokens_to_map(teacher_tokens, math.isqrt(teacher_tokens.shape[1]))
                outputs["teacher_latent"] = self.semantic_downsampler(teacher_map)
        return outputs

    @property
    def last_decoder_layer(self) -> nn.Module:
        return self.pixel_decoder.last_layer

    # ------------------------------------------------------------------------------- statistics
    def set_latent_statistics(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        self.latent_mean.copy_(mean)
        self.latent_var.copy_(var)
        self.latent_statistics_count.fill_(count)

    def normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self.latent_mean.view(1, -1, 1, 1), self.latent_var.clamp_min(1e-12).sqrt().view(1, -1, 1, 1)
        return (latents - mean.to(latents)) / std.to(latents)

    def denormalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self.latent_mean.view(1, -1, 1, 1), self.latent_var.clamp_min(1e-12).sqrt().view(1, -1, 1, 1)
        return latents * std.to(latents) + mean.to(latents)

    def latent_space_differences(self, other: SemanticAutoencoder) -> list[str]:
        """Names of the tensors outside the pixel decoder in which `other` differs from this tokenizer.

        Empty when both encode every image to the same latents with the same statistics -- e.g. after the
        decoder stage -- so one's pixel decoder can stand in for the other's under a trained generator.
        """
        mine, theirs = self.state_dict(), other.state_dict()
        names = sorted((set(mine) | set(theirs)) - {name for name in mine if name.startswith("pixel_decoder.")})
        return [
            name for name in names
            if name not in mine or name not in theirs or mine[name].shape != theirs[name].shape
            or not torch.equal(mine[name].float(), theirs[name].float())
        ]

    # ------------------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        statistics = {name: state.pop(name) for name in ("latent_mean", "latent_var", "latent_statistics_count")}
        # Copied encoder blocks share nothing with the backbone, but safetensors refuses aliased storage.
        state = {name: tensor.clone() for name, tensor in state.items()}
        atomic_write(directory / WEIGHTS_NAME, lambda path: save_file(state, str(path), metadata={"format": "pt"}))
        atomic_write(directory / STATISTICS_NAME, lambda path: save_file(statistics, str(path)))
        if self.backbone is not None:
            self.backbone.model.config.save_pretrained(str(directory / ENCODER_CONFIG_DIR))
        payload = {
            "model": dataclasses.asdict(self.config),
            "latent_shape": list(self.latent_shape),
            "shift": self.shift,
            "backbone_kind": self.backbone.kind if self.backbone is not None else None,
        }
        atomic_write_text(directory / CONFIG_NAME, json.dumps(payload, indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str = "cpu") -> SemanticAutoencoder:
        from tokenizer.checkpoint_names import match_state_dict_names
        from unimm.config import apply_delta

        directory = Path(directory)
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            raise UserError(f"'{directory}' is not a saved tokenizer (no {CONFIG_NAME}); pass a save_pretrained directory")
        payload = json.loads(config_path.read_text())
        config = apply_delta(TokenizerModelConfig(), payload["model"], source=str(config_path))
        backbone = None
        if config.encoder.role == "backbone":
            import transformers

            encoder_config = transformers.AutoConfig.from_pretrained(str(directory / ENCODER_CONFIG_DIR))
            backbone = RepresentationEncoder.from_config(encoder_config, kind=payload.get("backbone_kind"), image_size=config.encoder.image_size)
        # The saved auxiliary heads were sized from the teacher's config; keep them loadable offline.
        model = cls(config, backbone)
        state = load_file(str(directory / WEIGHTS_NAME), device=map_location)
        if (directory / STATISTICS_NAME).is_file():
            state.update(load_file(str(directory / STATISTICS_NAME), device=map_location))
        state = match_state_dict_names(state, model.state_dict().keys())  # saved under another transformers release
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UserError(f"'{directory}' does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
        return model.eval()


def count_parameters(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())

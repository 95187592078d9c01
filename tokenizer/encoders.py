"""Representation-encoder adapters over `transformers` vision models.

Every semantic autoencoder in this package starts from a pretrained representation encoder (DINOv2,
DINOv2 with registers, DINOv3 ViT, SigLIP, SigLIP2). The adapter hides the differences between them:

- input resolution and normalisation (ImageNet mean/std for DINO, 0.5/0.5 for SigLIP) — callers
  always pass images in [-1, 1] at any size; the adapter resizes to its own input resolution;
- which tokens are kept: patch tokens only (CLS and register tokens are dropped, as S-AE and
  PS-VAE do), returned as a 2D map `(B, D, h, w)`;
- how one transformer layer is called (DINOv3 layers need the RoPE tables, SigLIP layers an
  attention mask), so semantic encoders/decoders can be initialised from copies of its last blocks.

Models load through the real path: `from_pretrained(hub_id_or_local_dir)`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class EncoderKind:
    """What differs between the encoder families."""

    name: str
    model_type: str  # transformers `config.model_type`
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


ENCODER_KINDS: dict[str, EncoderKind] = {
    "dinov2": EncoderKind("dinov2", "dinov2", IMAGENET_MEAN, IMAGENET_STD),
    "dinov2_registers": EncoderKind("dinov2_registers", "dinov2_with_registers", IMAGENET_MEAN, IMAGENET_STD),
    "dinov3": EncoderKind("dinov3", "dinov3_vit", IMAGENET_MEAN, IMAGENET_STD),
    "siglip": EncoderKind("siglip", "siglip_vision_model", SIGLIP_MEAN, SIGLIP_STD),
    "siglip2": EncoderKind("siglip2", "siglip2_vision_model", SIGLIP_MEAN, SIGLIP_STD),
}
_KIND_BY_MODEL_TYPE = {kind.model_type: kind.name for kind in ENCODER_KINDS.values()}
# Full SigLIP checkpoints (text + vision) carry their vision tower in `config.vision_config`.
_KIND_BY_MODEL_TYPE.update({"siglip": "siglip", "siglip2": "siglip2"})


def _model_class(kind: str) -> type[nn.Module]:
    import transformers

    return {
        "dinov2": transformers.Dinov2Model,
        "dinov2_registers": transformers.Dinov2WithRegistersModel,
        "dinov3": transformers.DINOv3ViTModel,
        "siglip": transformers.SiglipVisionModel,
        "siglip2": transformers.Siglip2VisionModel,
    }[kind]


def detect_kind(config) -> str:
    """Encoder family from a transformers config (its `model_type`)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in _KIND_BY_MODEL_TYPE:
        known = ", ".join(sorted(_KIND_BY_MODEL_TYPE))
        raise ValueError(f"unsupported representation encoder model_type {model_type!r}; known: {known}")
    return _KIND_BY_MODEL_TYPE[model_type]


def _vision_config(config):
    return getattr(config, "vision_config", None) or config


class RepresentationEncoder(nn.Module):
    """A pretrained ViT that maps images in [-1, 1] to a 2D map of patch features `(B, D, h, w)`."""

    def __init__(self, model: nn.Module, kind: str, image_size: int | None = None):
        super().__init__()
        if kind not in ENCODER_KINDS:
            raise ValueError(f"unknown encoder kind {kind!r}; known: {', '.join(ENCODER_KINDS)}")
        self.kind = kind
        self.model = model
        config = model.config
        self.patch_size: int = int(config.patch_size)
        self.hidden_size: int = int(config.hidden_size)
        if image_size is None:
            image_size = getattr(config, "image_size", None)
            if image_size is None:  # SigLIP2 NaFlex configs give a patch budget, not an image size
                image_size = int(math.isqrt(int(config.num_patches))) * self.patch_size
        self.image_size: int = int(image_size)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch size {self.patch_size}")
        self.num_prefix_tokens: int = {
            "dinov2": 1,
            "dinov2_registers": 1 + int(getattr(config, "num_register_tokens", 0)),
            "dinov3": 1 + int(getattr(config, "num_register_tokens", 0)),
            "siglip": 0,
            "siglip2": 0,
        }[kind]
        spec = ENCODER_KINDS[kind]
        self.register_buffer("pixel_mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    # ----------------------------------------------------------------------------------- building
    @classmethod
    def from_pretrained(
        cls, name_or_path: str, kind: str | None = None, image_size: int | None = None, **kwargs
    ) -> RepresentationEncoder:
        """Load a hub id or a local `save_pretrained` directory through transformers."""
        import transformers

        config = transformers.AutoConfig.from_pretrained(name_or_path)
        kind = kind or detect_kind(config)
        model_class = _model_class(kind)
        model = model_class.from_pretrained(name_or_path, **kwargs)
        return cls(model, kind, image_size=image_size)

    @classmethod
    def from_config(cls, config, kind: str | None = None, image_size: int | None = None) -> RepresentationEncoder:
        """Random initialisation from a transformers config (used on the meta device and in tests)."""
        config = _vision_config(config)
        kind = kind or detect_kind(config)
        return cls(_model_class(kind)(config), kind, image_size=image_size)

    def save_pretrained(self, directory: str, **kwargs) -> None:
        self.model.save_pretrained(directory, **kwargs)

    # ----------------------------------------------------------------------------------- geometry
    @property
    def grid_size(self) -> int:
        """Patch tokens per side at the adapter's input resolution."""
        return self.image_size // self.patch_size

    @property
    def blocks(self) -> nn.ModuleList:
        """The encoder's transformer layers, in order."""
        if self.kind in ("dinov2", "dinov2_registers"):
            return self.model.encoder.layer
        if self.kind == "dinov3":
            return self.model.model.layer
        return self._siglip_tower().encoder.layers

    def _siglip_tower(self) -> nn.Module:
        # transformers 5 flattens SiglipVisionModel; older versions nest it under `vision_model`.
        return getattr(self.model, "vision_model", self.model)

    def final_norm(self) -> nn.Module:
        if self.kind in ("dinov2", "dinov2_registers"):
            return self.model.layernorm
        if self.kind == "dinov3":
            return self.model.norm
        return self._siglip_tower().post_layernorm

    # ----------------------------------------------------------------------------------- forward
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images of any size -> the encoder's normalised input at `image_size`."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(
                images, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False, antialias=True
            )
        pixels = (images + 1) / 2
        return (pixels - self.pixel_mean.to(pixels.dtype)) / self.pixel_std.to(pixels.dtype)

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> final-layer patch tokens (B, h*w, D), row-major."""
        return self.patch_and_global_tokens(images)[0]

    def patch_and_global_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> patch tokens (B, h*w, D) and a global token (B, D): CLS where the model has one, else the mean."""
        pixel_values = self.preprocess(images)
        if self.kind == "siglip2":
            hidden = self.model(**_naflex_inputs(pixel_values, self.patch_size)).last_hidden_state
        else:
            hidden = self.model(pixel_values=pixel_values).last_hidden_state
        patches = hidden[:, self.num_prefix_tokens :]
        return patches, (hidden[:, 0] if self.num_prefix_tokens else patches.mean(1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> patch feature map (B, D, h, w)."""
        tokens = self.patch_tokens(images)
        return tokens_to_map(tokens, self.grid_size)

    # ------------------------------------------------------------------------------ block copies
    def copy_last_blocks(self, count: int) -> EncoderBlockStack:
        """Independent copies of the last `count` layers, with the machinery to run them on patch tokens."""
        if count > len(self.blocks):
            raise ValueError(f"asked for {count} blocks but the encoder has {len(self.blocks)}")
        layers = nn.ModuleList(copy.deepcopy(layer) for layer in list(self.blocks)[len(self.blocks) - count :])
        rope = copy.deepcopy(self.model.rope_embeddings) if self.kind == "dinov3" else None
        return EncoderBlockStack(layers, self.kind, self.patch_size, rope)


class EncoderBlockStack(nn.Module):
    """Transformer layers taken from a representation encoder, run on patch tokens only.

    DINOv3 applies RoPE to patch tokens and leaves prefix tokens alone, so running the copied layers
    on patch tokens alone keeps the positional treatment the layers were trained with.
    """

    def __init__(self, layers: nn.ModuleList, kind: str, patch_size: int, rope: nn.Module | None = None):
        super().__init__()
        self.layers = layers
        self.kind = kind
        self.patch_size = patch_size
        self.rope = rope

    def forward(self, tokens: torch.Tensor, grid_size: int) -> torch.Tensor:
        """tokens (B, h*w, D) -> (B, h*w, D)."""
        hidden = tokens
        if self.kind == "dinov3":
            # The RoPE module only reads the pixel tensor's shape; a zero-stride view costs nothing.
            side = grid_size * self.patch_size
            shape_probe = tokens.new_zeros(()).expand(tokens.shape[0], 3, side, side)
            position_embeddings = self.rope(shape_probe)
            for layer in self.layers:
                hidden = layer(hidden, position_embeddings=position_embeddings)
        elif self.kind in ("siglip", "siglip2"):
            for layer in self.layers:
                hidden = layer(hidden, attention_mask=None)
        else:
            for layer in self.layers:
                hidden = layer(hidden)
        return hidden


def tokens_to_map(tokens: torch.Tensor, grid_size: int) -> torch.Tensor:
    """(B, h*w, D) row-major tokens -> (B, D, h, w)."""
    batch, count, dim = tokens.shape
    if count != grid_size * grid_size:
        raise ValueError(f"{count} tokens do not form a {grid_size}x{grid_size} grid")
    return tokens.transpose(1, 2).reshape(batch, dim, grid_size, grid_size)


def map_to_tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) -> (B, h*w, D) row-major tokens."""
    return feature_map.flatten(2).transpose(1, 2)


def _naflex_inputs(pixel_values: torch.Tensor, patch_size: int) -> dict[str, torch.Tensor]:
    """SigLIP2 NaFlex takes pre-patchified pixels: (B, h*w, p*p*C) in (row, col, C) patch order."""
    batch, channels, height, width = pixel_values.shape
    rows, cols = height // patch_size, width // patch_size
    patches = pixel_values.reshape(batch, channels, rows, patch_size, cols, patch_size)
    patches = patches.permute(0, 2, 4, 3, 5, 1).reshape(batch, rows * cols, patch_size * patch_size * channels)
    return {
        "pixel_values": patches,
        "pixel_attention_mask": torch.ones(batch, rows * cols, dtype=torch.long, device=pixel_values.device),
        "spatial_shapes": torch.tensor([[rows, cols]] * batch, dtype=torch.long, device=pixel_values.device),
    }


def tiny_encoder_config(kind: str, image_size: int = 32, patch_size: int = 8, hidden_size: int = 32, layers: int = 4):
    """A few-thousand-parameter config of the real class (tests and the meta-device `info`)."""
    import transformers

    heads = max(1, hidden_size // 16)
    if kind == "dinov2":
        return transformers.Dinov2Config(
            image_size=image_size, patch_size=patch_size, hidden_size=hidden_size, num_hidden_layers=layers,
            num_attention_heads=heads, mlp_ratio=2,
        )
    if kind == "dinov2_registers":
        return transformers.Dinov2WithRegistersConfig(
            image_size=image_size, patch_size=patch_size, hidden_size=hidden_size, num_hidden_layers=layers,
            num_attention_heads=heads, mlp_ratio=2, num_register_tokens=4,
        )
    if kind == "dinov3":
        return transformers.DINOv3ViTConfig(
            image_size=image_size, patch_size=patch_size, hidden_size=hidden_size, num_hidden_layers=layers,
            num_attention_heads=heads, intermediate_size=hidden_size * 2, num_register_tokens=4,
        )
    if kind == "siglip":
        return transformers.SiglipVisionConfig(
            image_size=image_size, patch_size=patch_size, hidden_size=hidden_size, num_hidden_layers=layers,
            num_attention_heads=heads, intermediate_size=hidden_size * 2,
        )
    if kind == "siglip2":
        return transformers.Siglip2VisionConfig(
            num_patches=(image_size // patch_size) ** 2, patch_size=patch_size, hidden_size=hidden_size,
            num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=hidden_size * 2,
        )
    raise ValueError(f"unknown encoder kind {kind!r}")

"""Export a tokenizer's SigLIP representation encoder as Bagel's understanding ViT (PS-VAE §4.4).

PS-VAE fine-tunes SigLIP2-so400m/14 as its representation encoder and drops the result into Bagel's
understanding pipeline with the LLM frozen. This module writes the encoder in Bagel's checkpoint layout
and runs such a checkpoint back as Bagel does, so the swap can be checked without Bagel's code.

Facts taken from Bagel's code (github.com/ByteDance-Seed/Bagel) — the layout written here follows them:

- ``modeling/bagel/siglip_navit.py``: Bagel's ViT is ``SiglipVisionModel`` -> ``vision_model``
  (``SiglipVisionTransformer``) with ``embeddings.patch_embedding``, ``embeddings.position_embedding``
  (``nn.Embedding((image_size // patch_size) ** 2, hidden)``, present because Bagel sets ``rope = False``),
  ``encoder.layers.N`` (``self_attn.{k,v,q,out}_proj``, ``layer_norm1``, ``mlp.fc1``, ``mlp.fc2``,
  ``layer_norm2``: 16 tensors a layer) and ``post_layernorm``, which it applies to the last layer's output.
  There is no pooling head and no ``position_ids`` buffer. ``convert_conv2d_to_linear`` turns the patch
  Conv2d into ``nn.Linear(C * p * p, hidden)`` with ``weight.permute(0, 2, 3, 1)``: (kh, kw, c) order.
- ``data/data_utils.py``: ``patchify`` flattens each patch as ``einsum("chpwq->hwpqc")``, i.e. (kh, kw, c)
  per patch, patches row-major; ``get_flattened_position_ids_extrapolate`` (the default, ``interpolate_pos``
  is False) gives patch (r, c) the id ``r * 70 + c``: a smaller image uses the top-left block of the table.
- ``app.py`` / ``train/pretrain_unified_navit.py``: ``vit_config.json`` is read and then
  ``num_hidden_layers -= 1`` (training: ``+ 1 + vit_select_layer`` with ``vit_select_layer = -2``), ``rope =
  False``, ``vit_max_num_patch_per_side = 70``, the patch embedding is converted to Linear *before* the
  checkpoint (``ema.safetensors``) is loaded, so the checkpoint holds the Linear weight (1152, 588).
  BAGEL-7B-MoT's ``vit_config.json``: hidden 1152, intermediate 4304, 16 heads, 27 layers, patch 14,
  image_size 980 (a 70 x 70 = 4900-entry table); so the checkpoint holds 26 layers.
- ``modeling/bagel/bagel.py``: the understanding path also owns ``connector.fc{1,2}.{weight,bias}``
  (ViT hidden -> LLM hidden) and ``vit_pos_embed.pos_embed`` (a fixed 2D sin-cos table at LLM width).
  They are not the ViT's and are never exported or replaced; every ViT key starts with ``vit_model.``.
- ``data/transforms.py``: ``ImageTransform(980, 224, 14)`` normalises with mean = std = 0.5, as SigLIP does.

The export: ``vision_model.*`` (or the flattened transformers-5 names) -> ``vit_model.vision_model.*``;
``head.*`` and the last encoder layer dropped; the patch Conv2d weight (D, C, kh, kw) -> Linear weight
(D, kh * kw * C); SigLIP2 NaFlex's patch Linear is already in (kh, kw, c) order (transformers'
``convert_image_to_patches`` permutes (C, h, p, w, p) to (h, w, p, p, C)) and is kept; the N x N position
table is resized to 70 x 70 and flattened row-major. The resize is the one the source encoder itself applies
at another resolution in transformers — bicubic, ``align_corners=False`` for SigLIP
(``SiglipVisionEmbeddings.interpolate_pos_encoding``), bilinear, ``align_corners=False, antialias=True`` for
SigLIP2 NaFlex (``Siglip2VisionEmbeddings.resize_positional_embeddings``), computed in float32 — so the
exported ViT on a 70 x 70-patch image computes exactly what the source encoder computes at that
resolution, up to the dropped layer: ``post_layernorm(hidden_states[L - 1])`` of the L-layer source.

``vit_config.json`` follows Bagel's convention: its ``num_hidden_layers`` counts the layer Bagel's loaders
drop (27 for the 26 layers in the weights), ``image_size`` is ``70 * patch_size``.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from unimm.atomic import atomic_write, atomic_write_text
from unimm.errors import UserError

BAGEL_VIT_PREFIX = "vit_model."
BAGEL_TOWER_PREFIX = "vit_model.vision_model."
BAGEL_VIT_WEIGHTS_NAME = "vit_model.safetensors"
BAGEL_VIT_CONFIG_NAME = "vit_config.json"
BAGEL_MERGED_NAME = "ema.safetensors"
BAGEL_MAX_PATCHES_PER_SIDE = 70
# Understanding-path keys of ema.safetensors that sit next to the ViT but are not part of it.
BAGEL_NON_VIT_UNDERSTANDING_KEYS = (
    "connector.fc1.weight", "connector.fc1.bias", "connector.fc2.weight", "connector.fc2.bias", "vit_pos_embed.pos_embed",
)
# One Bagel / transformers SigLIP encoder layer: these sub-modules, each with a weight and a bias.
_LAYER_MODULES = (
    "self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj",
    "layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2",
)
_SIGLIP_KINDS = ("siglip", "siglip2")
# safetensors dtype names of the floating dtypes a ViT checkpoint holds.
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def is_bagel_vit_key(name: str) -> bool:
    """Whether a key of Bagel's ``ema.safetensors`` belongs to the understanding ViT."""
    return name.startswith(BAGEL_VIT_PREFIX)


# ------------------------------------------------------------------------------------- architecture
@dataclass(frozen=True)
class BagelViTArchitecture:
    """The ViT Bagel builds (defaults: SigLIP so400m/14 with 26 of its 27 layers, 980 px)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 26  # layers in the weights; vit_config.json says one more
    num_attention_heads: int = 16
    patch_size: int = 14
    max_patches_per_side: int = BAGEL_MAX_PATCHES_PER_SIDE
    num_channels: int = 3
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0

    @property
    def image_size(self) -> int:
        return self.patch_size * self.max_patches_per_side

    def manifest(self) -> dict[str, tuple[int, ...]]:
        """Every key of the ViT in ``ema.safetensors`` with its shape."""
        d, i, p, c = self.hidden_size, self.intermediate_size, self.patch_size, self.num_channels
        shapes = {
            "embeddings.patch_embedding.weight": (d, p * p * c),
            "embeddings.patch_embedding.bias": (d,),
            "embeddings.position_embedding.weight": (self.max_patches_per_side**2, d),
        }
        layer_shapes = {
            "self_attn.k_proj": ((d, d), (d,)), "self_attn.v_proj": ((d, d), (d,)),
            "self_attn.q_proj": ((d, d), (d,)), "self_attn.out_proj": ((d, d), (d,)),
            "layer_norm1": ((d,), (d,)), "mlp.fc1": ((i, d), (i,)), "mlp.fc2": ((d, i), (d,)), "layer_norm2": ((d,), (d,)),
        }
        assert tuple(layer_shapes) == _LAYER_MODULES
        for index in range(self.num_layers):
            for module, (weight, bias) in layer_shapes.items():
                shapes[f"encoder.layers.{index}.{module}.weight"] = weight
                shapes[f"encoder.layers.{index}.{module}.bias"] = bias
        shapes["post_layernorm.weight"] = (d,)
        shapes["post_layernorm.bias"] = (d,)
        return {BAGEL_TOWER_PREFIX + name: shape for name, shape in shapes.items()}

    def vit_config(self) -> dict:
        """Bagel's ``vit_config.json``: ``num_hidden_layers`` includes the layer Bagel's loaders drop."""
        return {
            "hidden_size": self.hidden_size,
            "image_size": self.image_size,
            "intermediate_size": self.intermediate_size,
            "model_type": "siglip_vision_model",
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_layers + 1,
            "patch_size": self.patch_size,
            "num_channels": self.num_channels,
            "hidden_act": self.hidden_act,
            "layer_norm_eps": self.layer_norm_eps,
            "attention_dropout": self.attention_dropout,
        }

    @classmethod
    def from_vit_config(cls, config: dict) -> BagelViTArchitecture:
        """The inverse of `vit_config` (Bagel's reading: one layer fewer than the file says)."""
        defaults = cls()
        patch = int(config.get("patch_size", 16))
        return cls(
            hidden_size=int(config.get("hidden_size", 768)),
            intermediate_size=int(config.get("intermediate_size", 3072)),
            num_layers=int(config.get("num_hidden_layers", 12)) - 1,
            num_attention_heads=int(config.get("num_attention_heads", 12)),
            patch_size=patch,
            max_patches_per_side=int(config.get("image_size", 224)) // patch,
            num_channels=int(config.get("num_channels", 3)),
            hidden_act=config.get("hidden_act", defaults.hidden_act),
            layer_norm_eps=float(config.get("layer_norm_eps", defaults.layer_norm_eps)),
            attention_dropout=float(config.get("attention_dropout", defaults.attention_dropout)),
        )


BAGEL_SO400M = BagelViTArchitecture()
# The 421 ViT tensors of Bagel's ema.safetensors: 26 layers x 16 + patch weight/bias + position table + post norm.
BAGEL_VIT_MANIFEST: dict[str, tuple[int, ...]] = BAGEL_SO400M.manifest()


def compare_keys(
    tensors: dict[str, tuple[int, ...] | torch.Tensor], expected: dict[str, tuple[int, ...]] | None = None
) -> tuple[list[str], list[str], list[tuple[str, tuple[int, ...], tuple[int, ...]]]]:
    """(missing, unexpected, [(key, got shape, expected shape)]) of exported keys against a manifest."""
    expected = BAGEL_VIT_MANIFEST if expected is None else expected
    shapes = {name: tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value) for name, value in tensors.items()}
    missing = sorted(set(expected) - set(shapes), key=_key_order)
    unexpected = sorted(set(shapes) - set(expected), key=_key_order)
    mismatched = [(name, shapes[name], tuple(expected[name])) for name in sorted(set(shapes) & set(expected), key=_key_order)
                  if shapes[name] != tuple(expected[name])]
    return missing, unexpected, mismatched


def _key_order(name: str):
    """Sort layer keys numerically (layers.2 before layers.10)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split(".")]


# -------------------------------------------------------------------------------------- conversion
def _tower_config(model: nn.Module):
    config = model.config
    return getattr(config, "vision_config", None) or config


def _tower_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The vision tower's state dict with names relative to the tower (``embeddings.*``, ``encoder.*``, ...)."""
    state = model.state_dict()
    # transformers < 5 nests SiglipVisionModel under `vision_model`; full SigLIP models hold `vision_model` too.
    if any(name.startswith("vision_model.") for name in state):
        state = {name[len("vision_model."):]: tensor for name, tensor in state.items() if name.startswith("vision_model.")}
    return state


def interpolate_position_table(table: torch.Tensor, kind: str, side: int = BAGEL_MAX_PATCHES_PER_SIDE) -> torch.Tensor:
    """An (N * N, D) row-major position table resized to (side * side, D), as transformers resizes it for `kind`."""
    count, dim = table.shape
    grid = math.isqrt(count)
    if grid * grid != count:
        raise ValueError(f"a position table of {count} entries is not a square grid")
    if grid == side:
        return table
    image = table.reshape(1, grid, grid, dim).permute(0, 3, 1, 2).to(torch.float32)
    if kind == "siglip":
        resized = F.interpolate(image, size=(side, side), mode="bicubic", align_corners=False)
    elif kind == "siglip2":
        resized = F.interpolate(image, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
    else:
        raise ValueError(f"no position-table interpolation for encoder kind {kind!r}")
    return resized.permute(0, 2, 3, 1).reshape(side * side, dim).to(table.dtype)


INTERPOLATION = {
    "siglip": "bicubic, align_corners=False (SiglipVisionEmbeddings.interpolate_pos_encoding)",
    "siglip2": "bilinear, align_corners=False, antialias=True (Siglip2VisionEmbeddings.resize_positional_embeddings)",
}


def _unwrap_encoder(source) -> tuple[nn.Module, str]:
    """(transformers vision model, kind) from a RepresentationEncoder, a SemanticAutoencoder or a bare model."""
    from tokenizer.encoders import RepresentationEncoder, detect_kind
    from tokenizer.model import SemanticAutoencoder

    if isinstance(source, SemanticAutoencoder):
        if source.backbone is None:
            raise UserError("the tokenizer has no representation encoder (encoder role is not 'backbone'); nothing to export")
        source = source.backbone
    if isinstance(source, RepresentationEncoder):
        model, kind = source.model, source.kind
    else:
        model = source
        try:
            kind = detect_kind(_tower_config(model))
        except ValueError as error:
            raise UserError(str(error)) from None
    if kind not in _SIGLIP_KINDS:
        raise UserError(f"the representation encoder is {kind!r}; Bagel's ViT is SigLIP, so only siglip / siglip2 encoders export")
    return model, kind


def bagel_vit_state_dict(
    source, max_patches_per_side: int = BAGEL_MAX_PATCHES_PER_SIDE, drop_last_layers: int = 1, dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], BagelViTArchitecture, str]:
    """(Bagel-layout tensors, their architecture, encoder kind) of a SigLIP / SigLIP2 vision tower.

    Works on the meta device too (shapes only). `source`: a RepresentationEncoder, a SemanticAutoencoder or a
    transformers ``SiglipVisionModel`` / ``Siglip2VisionModel``.
    """
    model, kind = _unwrap_encoder(source)
    config = _tower_config(model)
    state = _tower_state(model)
    source_layers = int(config.num_hidden_layers)
    keep = source_layers - drop_last_layers
    if keep < 1:
        raise UserError(f"the encoder has {source_layers} layers; dropping {drop_last_layers} leaves none")
    patch, channels, hidden = int(config.patch_size), int(config.num_channels), int(config.hidden_size)

    out: dict[str, torch.Tensor] = {}
    patch_weight = state.pop("embeddings.patch_embedding.weight")
    if patch_weight.dim() == 4:  # Conv2d (D, C, kh, kw) -> Linear (D, kh * kw * C), Bagel's convert_conv2d_to_linear
        patch_weight = patch_weight.permute(0, 2, 3, 1).reshape(hidden, patch * patch * channels)
    elif tuple(patch_weight.shape) != (hidden, patch * patch * channels):
        raise UserError(f"unexpected patch embedding shape {tuple(patch_weight.shape)}")
    out["embeddings.patch_embedding.weight"] = patch_weight
    out["embeddings.patch_embedding.bias"] = state.pop("embeddings.patch_embedding.bias")
    table = state.pop("embeddings.position_embedding.weight")
    out["embeddings.position_embedding.weight"] = interpolate_position_table(table, kind, max_patches_per_side)
    state.pop("embeddings.position_ids", None)
    for index in range(source_layers):
        for module in _LAYER_MODULES:
            for leaf in ("weight", "bias"):
                name = f"encoder.layers.{index}.{module}.{leaf}"
                tensor = state.pop(name)
                if index < keep:
                    out[name] = tensor
    out["post_layernorm.weight"] = state.pop("post_layernorm.weight")
    out["post_layernorm.bias"] = state.pop("post_layernorm.bias")
    leftover = [name for name in state if not name.startswith("head.")]
    if leftover:
        raise UserError(f"the encoder holds tensors Bagel's ViT has no place for: {leftover[:5]}")
    tensors = {BAGEL_TOWER_PREFIX + name: (tensor if dtype is None else tensor.to(dtype)).detach().contiguous()
               for name, tensor in out.items()}
    architecture = BagelViTArchitecture(
        hidden_size=hidden, intermediate_size=int(config.intermediate_size), num_layers=keep,
        num_attention_heads=int(config.num_attention_heads), patch_size=patch, max_patches_per_side=max_patches_per_side,
        num_channels=channels, hidden_act=str(config.hidden_act), layer_norm_eps=float(config.layer_norm_eps),
        attention_dropout=float(getattr(config, "attention_dropout", 0.0)),
    )
    return tensors, architecture, kind


# ---------------------------------------------------------------------------------------- export
@dataclass
class BagelExportReport:
    weights: Path
    config: Path
    kind: str
    source_layers: int
    exported_layers: int
    num_tensors: int
    source_grid: int
    position_grid: int
    interpolation: str
    dtype: str
    missing: list[str] = field(default_factory=list)  # against BAGEL_VIT_MANIFEST
    unexpected: list[str] = field(default_factory=list)
    shape_mismatches: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    merged: Path | None = None
    replaced: int = 0  # ViT tensors replaced in the merged checkpoint
    kept: int = 0  # other tensors copied byte for byte

    @property
    def matches_bagel(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatches)

    def lines(self, keys: bool = False) -> list[str]:
        lines = [
            f"wrote {self.weights} ({self.num_tensors} tensors, {self.dtype}) and {self.config}",
            f"{self.kind} encoder: {self.exported_layers} of {self.source_layers} layers kept, position table "
            f"{self.source_grid}x{self.source_grid} -> {self.position_grid}x{self.position_grid} ({self.interpolation})",
        ]
        if self.merged is not None:
            lines.append(f"wrote {self.merged}: {self.replaced} ViT tensors replaced, {self.kept} other tensors copied unchanged")
        if keys:
            lines.append(
                f"against Bagel's ViT ({len(BAGEL_VIT_MANIFEST)} tensors, so400m/14, 26 layers, 980 px): "
                f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, {len(self.shape_mismatches)} shape mismatches"
            )
            lines += [f"missing: {name}" for name in self.missing]
            lines += [f"unexpected: {name}" for name in self.unexpected]
            lines += [f"shape: {name} {list(got)} != {list(want)}" for name, got, want in self.shape_mismatches]
        return lines

    def to_dict(self) -> dict:
        payload = asdict(self)
        return {key: str(value) if isinstance(value, Path) else value for key, value in payload.items()}


def load_export_source(path: str | Path):
    """A tokenizer ``save_pretrained`` directory (SemanticAutoencoder) or a transformers encoder directory."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"'{path}' is not a directory; pass a tokenizer save_pretrained directory")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise UserError(f"'{path}' has no config.json; pass a tokenizer save_pretrained directory")
    try:
        payload = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"'{config_path}' is not valid JSON ({error})") from None
    if "model" in payload and "latent_shape" in payload:
        from tokenizer.model import SemanticAutoencoder

        kind = payload.get("backbone_kind")
        if kind is None:
            raise UserError(f"the tokenizer in '{path}' has no representation encoder (encoder role is not 'backbone'); nothing to export")
        if kind not in _SIGLIP_KINDS:
            raise UserError(f"the tokenizer in '{path}' is built on {kind!r}; Bagel's ViT is SigLIP, so only siglip / siglip2 tokenizers export")
        return SemanticAutoencoder.from_pretrained(path)
    if "model_type" in payload:
        import transformers

        from tokenizer.encoders import RepresentationEncoder, detect_kind

        try:
            kind = detect_kind(transformers.AutoConfig.from_pretrained(str(path)))
        except ValueError as error:
            raise UserError(str(error)) from None
        if kind not in _SIGLIP_KINDS:  # refuse before loading any weights
            raise UserError(f"the encoder in '{path}' is {kind!r}; Bagel's ViT is SigLIP, so only siglip / siglip2 encoders export")
        return RepresentationEncoder.from_pretrained(str(path), kind=kind)
    raise UserError(f"'{path}' is neither a tokenizer nor a transformers encoder directory")


def check_merge_target(merge_into: str | Path | None, output_dir: str | Path) -> Path | None:
    """The checkpoint to merge into, checked before any work: an existing file that the output will not overwrite."""
    if merge_into is None:
        return None
    merge_path = Path(merge_into)
    if not merge_path.is_file():
        raise UserError(f"--merge-into '{merge_path}' is not a file; pass Bagel's ema.safetensors")
    if (Path(output_dir) / BAGEL_MERGED_NAME).resolve() == merge_path.resolve():
        raise UserError(f"the merged checkpoint would overwrite '{merge_path}'; pass an output directory other than its own")
    return merge_path


def export_bagel_vit(
    source,
    output_dir: str | Path,
    merge_into: str | Path | None = None,
    dtype: torch.dtype | str | None = None,
    max_patches_per_side: int = BAGEL_MAX_PATCHES_PER_SIDE,
) -> BagelExportReport:
    """Write ``vit_model.safetensors`` + ``vit_config.json`` (and a merged ``ema.safetensors``) to `output_dir`.

    `source`: a tokenizer / encoder directory, a SemanticAutoencoder, a RepresentationEncoder or a transformers
    SigLIP vision model. `dtype`: the stored dtype (default: the encoder's); merged tensors take the dtype of the
    tensor they replace. `merge_into`: an existing Bagel ``ema.safetensors``; only its ``vit_model.*`` tensors are
    replaced, every other tensor is copied byte for byte into ``output_dir/ema.safetensors``.
    """
    from safetensors.torch import save_file

    if isinstance(source, (str, Path)):
        source = load_export_source(source)
    if isinstance(dtype, str):
        dtype = None if dtype == "source" else DTYPES[dtype]
    output_dir = Path(output_dir)
    merge_path = check_merge_target(merge_into, output_dir)

    model, _ = _unwrap_encoder(source)
    config = _tower_config(model)
    tensors, architecture, kind = bagel_vit_state_dict(source, max_patches_per_side=max_patches_per_side, dtype=dtype)
    if any(tensor.is_meta for tensor in tensors.values()):
        raise UserError("the encoder is on the meta device; use bagel_vit_state_dict for a shape-only export")
    tensors = {name: tensor.cpu() for name, tensor in tensors.items()}
    source_table = _tower_state(model)["embeddings.position_embedding.weight"]
    stored_dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    metadata = {
        "format": "pt", "producer": "unimm export bagel-vit", "encoder_kind": kind,
        "source_layers": str(config.num_hidden_layers), "position_interpolation": INTERPOLATION[kind],
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    weights = atomic_write(output_dir / BAGEL_VIT_WEIGHTS_NAME, lambda path: save_file(tensors, str(path), metadata=metadata))
    config_path = atomic_write_text(output_dir / BAGEL_VIT_CONFIG_NAME, json.dumps(architecture.vit_config(), indent=2) + "\n")
    missing, unexpected, mismatched = compare_keys(tensors)
    report = BagelExportReport(
        weights=weights, config=config_path, kind=kind, source_layers=int(config.num_hidden_layers),
        exported_layers=architecture.num_layers, num_tensors=len(tensors), source_grid=math.isqrt(source_table.shape[0]),
        position_grid=max_patches_per_side, interpolation=INTERPOLATION[kind], dtype=stored_dtype,
        missing=missing, unexpected=unexpected, shape_mismatches=mismatched,
    )
    if merge_path is not None:
        report.merged, report.replaced, report.kept = merge_vit_into_checkpoint(merge_path, tensors, output_dir / BAGEL_MERGED_NAME)
    return report


# ------------------------------------------------------------------------------------------ merge
def read_safetensors_header(path: str | Path) -> tuple[int, dict]:
    """(offset of the data buffer, header dict) of a safetensors file, without reading any tensor."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise UserError(f"'{path}' is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", prefix)
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"'{path}' is not a safetensors file (bad header)") from None
    return 8 + length, header


def merge_vit_into_checkpoint(
    checkpoint: str | Path, vit_tensors: dict[str, torch.Tensor], destination: str | Path
) -> tuple[Path, int, int]:
    """Copy `checkpoint` to `destination` with its ``vit_model.*`` tensors replaced by `vit_tensors`.

    Streams: other tensors are copied as raw byte ranges (bitwise unchanged, never all in memory), so a 29 GB
    Bagel checkpoint merges in constant memory. The checkpoint's ViT key set and shapes must equal the export's;
    each replacement is cast to the dtype of the tensor it replaces. Returns (path, replaced, kept).
    """
    if sys.byteorder != "little":
        raise RuntimeError("safetensors data is little-endian; merging on a big-endian machine is not supported")
    checkpoint = Path(checkpoint)
    data_start, header = read_safetensors_header(checkpoint)
    metadata = header.pop("__metadata__", None)
    theirs = {name: tuple(entry["shape"]) for name, entry in header.items() if is_bagel_vit_key(name)}
    if not theirs:
        raise UserError(f"'{checkpoint}' holds no vit_model.* tensors; pass Bagel's ema.safetensors")
    missing, unexpected, mismatched = compare_keys(vit_tensors, theirs)
    if missing or unexpected or mismatched:
        details = [f"{len(missing)} missing (e.g. {missing[:2]})" if missing else "",
                   f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})" if unexpected else "",
                   f"{len(mismatched)} shape mismatches (e.g. {mismatched[0][0]} {list(mismatched[0][1])} vs {list(mismatched[0][2])})"
                   if mismatched else ""]
        raise UserError(f"the exported ViT does not fit '{checkpoint}': " + ", ".join(part for part in details if part))

    order = sorted(header, key=lambda name: header[name]["data_offsets"][0])
    replacements: dict[str, torch.Tensor] = {}
    new_header: dict[str, dict] = {}
    offset = 0
    for name in order:
        entry = header[name]
        if is_bagel_vit_key(name):
            if entry["dtype"] not in _SAFETENSORS_DTYPES:
                raise UserError(f"'{checkpoint}' stores {name} as {entry['dtype']}; expected a floating dtype")
            tensor = vit_tensors[name].to(_SAFETENSORS_DTYPES[entry["dtype"]]).contiguous()
            replacements[name] = tensor
            size = tensor.numel() * tensor.element_size()
        else:
            begin, end = entry["data_offsets"]
            size = end - begin
        new_header[name] = {"dtype": entry["dtype"], "shape": entry["shape"], "data_offsets": [offset, offset + size]}
        offset += size
    if metadata is not None:
        new_header = {"__metadata__": metadata, **new_header}
    encoded = json.dumps(new_header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # safetensors pads the header to 8-byte alignment

    def write(path: Path) -> None:
        with open(checkpoint, "rb") as source, open(path, "wb") as target:
            target.write(struct.pack("<Q", len(encoded)))
            target.write(encoded)
            for name in order:
                if name in replacements:
                    target.write(replacements[name].view(torch.uint8).numpy().tobytes())
                else:
                    begin, end = header[name]["data_offsets"]
                    source.seek(data_start + begin)
                    _copy_bytes(source, target, end - begin)

    path = atomic_write(destination, write)
    _validate_safetensors(path, set(order))
    return path, len(replacements), len(order) - len(replacements)


def _copy_bytes(source, target, count: int, chunk: int = 64 << 20) -> None:
    remaining = count
    while remaining:
        block = source.read(min(chunk, remaining))
        if not block:
            raise UserError("the checkpoint ended early while copying; is it truncated?")
        target.write(block)
        remaining -= len(block)


def _validate_safetensors(path: Path, names: set[str]) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        if set(handle.keys()) != names:
            raise RuntimeError(f"merged checkpoint '{path}' lost or gained tensors")


# ------------------------------------------------------------------------------ NaViT reference
def patchify(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(C, H, W) -> (H/p * W/p, p * p * C): patches row-major, each flattened in (kh, kw, c) order (Bagel's order)."""
    channels, height, width = image.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"image {height}x{width} is not a multiple of the patch size {patch_size}")
    rows, cols = height // patch_size, width // patch_size
    patches = image.reshape(channels, rows, patch_size, cols, patch_size).permute(1, 3, 2, 4, 0)
    return patches.reshape(rows * cols, patch_size * patch_size * channels)


def flattened_position_ids(height: int, width: int, patch_size: int, max_patches_per_side: int = BAGEL_MAX_PATCHES_PER_SIDE) -> torch.Tensor:
    """Bagel's default (extrapolating) NaViT ids: patch (r, c) -> r * max_patches_per_side + c."""
    rows, cols = height // patch_size, width // patch_size
    if rows > max_patches_per_side or cols > max_patches_per_side:
        raise ValueError(f"{rows}x{cols} patches exceed the {max_patches_per_side}x{max_patches_per_side} position table")
    return (torch.arange(rows)[:, None] * max_patches_per_side + torch.arange(cols)[None, :]).flatten()


class _Embeddings(nn.Module):
    def __init__(self, arch: BagelViTArchitecture):
        super().__init__()
        self.patch_embedding = nn.Linear(arch.num_channels * arch.patch_size**2, arch.hidden_size)
        self.position_embedding = nn.Embedding(arch.max_patches_per_side**2, arch.hidden_size)

    def forward(self, packed_pixel_values: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.patch_embedding(packed_pixel_values) + self.position_embedding(position_ids)


class _Encoder(nn.Module):
    def __init__(self, layers: nn.ModuleList):
        super().__init__()
        self.layers = layers


class _Tower(nn.Module):
    def __init__(self, arch: BagelViTArchitecture, layers: nn.ModuleList):
        super().__init__()
        self.embeddings = _Embeddings(arch)
        self.encoder = _Encoder(layers)
        self.post_layernorm = nn.LayerNorm(arch.hidden_size, eps=arch.layer_norm_eps)


class BagelNaViTReference(nn.Module):
    """Bagel's NaViT SigLIP ViT (rope off) rebuilt from exported tensors, for checking an export.

    Linear patch embedding over (kh, kw, c)-flattened patches + a position table indexed by row-major NaViT
    ids + transformers ``SiglipEncoderLayer``s + ``post_layernorm``. Packed images attend only within
    themselves (what Bagel's flash-attn varlen call does). Its state dict, prefixed with ``vit_model.``, has
    exactly Bagel's ViT key names.
    """

    def __init__(self, architecture: BagelViTArchitecture):
        super().__init__()
        import transformers
        from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

        self.architecture = architecture
        config = transformers.SiglipVisionConfig(
            hidden_size=architecture.hidden_size, intermediate_size=architecture.intermediate_size,
            num_hidden_layers=architecture.num_layers, num_attention_heads=architecture.num_attention_heads,
            num_channels=architecture.num_channels, image_size=architecture.image_size, patch_size=architecture.patch_size,
            hidden_act=architecture.hidden_act, layer_norm_eps=architecture.layer_norm_eps,
            attention_dropout=architecture.attention_dropout,
        )
        config._attn_implementation = "sdpa"
        layers = nn.ModuleList(SiglipEncoderLayer(config) for _ in range(architecture.num_layers))
        self.vision_model = _Tower(architecture, layers)

    @classmethod
    def from_pretrained(cls, directory: str | Path, weights: str | Path | None = None) -> BagelNaViTReference:
        """Read ``vit_config.json`` (Bagel's convention) and the ``vit_model.*`` tensors of `weights`
        (default ``vit_model.safetensors``; a merged ``ema.safetensors`` works too)."""
        from safetensors import safe_open

        directory = Path(directory)
        architecture = BagelViTArchitecture.from_vit_config(json.loads((directory / BAGEL_VIT_CONFIG_NAME).read_text()))
        with torch.device("meta"):
            model = cls(architecture)
        weights = Path(weights) if weights is not None else directory / BAGEL_VIT_WEIGHTS_NAME
        with safe_open(str(weights), framework="pt") as handle:
            state = {name[len(BAGEL_VIT_PREFIX):]: handle.get_tensor(name) for name in handle.keys() if is_bagel_vit_key(name)}
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()

    def bagel_state_dict(self) -> dict[str, torch.Tensor]:
        return {BAGEL_VIT_PREFIX + name: tensor for name, tensor in self.state_dict().items()}

    def forward(self, packed_pixel_values: torch.Tensor, packed_position_ids: torch.Tensor, seqlens: Sequence[int]) -> torch.Tensor:
        """(N, p*p*C) packed patches of several images, (N,) NaViT ids, per-image token counts -> (N, D)."""
        tower = self.vision_model
        hidden = tower.embeddings(packed_pixel_values.to(tower.embeddings.patch_embedding.weight.dtype), packed_position_ids)
        outputs = []
        for chunk in hidden.split([int(count) for count in seqlens]):
            states = chunk.unsqueeze(0)
            for layer in tower.encoder.layers:
                states = layer(states, attention_mask=None)
            outputs.append(states.squeeze(0))
        return tower.post_layernorm(torch.cat(outputs))

    def encode_images(self, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Normalised (C, H, W) images of any sizes (multiples of the patch) -> per-image (h*w, D) features."""
        arch = self.architecture
        patches = [patchify(image, arch.patch_size) for image in images]
        ids = [flattened_position_ids(image.shape[1], image.shape[2], arch.patch_size, arch.max_patches_per_side).to(image.device)
               for image in images]
        seqlens = [len(tokens) for tokens in patches]
        return list(self(torch.cat(patches), torch.cat(ids), seqlens).split(seqlens))


# ------------------------------------------------------------------------------------------ check
@torch.no_grad()
def source_features(source, pixel_values: torch.Tensor, drop_last_layers: int = 1) -> torch.Tensor:
    """The source encoder's features as Bagel's exported ViT defines them: ``post_layernorm`` of the output of
    layer L - drop_last_layers, at the image's own resolution with the encoder's own position-table resize.

    `pixel_values`: normalised (B, C, H, W). Returns (B, h*w, D), patches row-major.
    """
    from tokenizer.encoders import _naflex_inputs

    model, kind = _unwrap_encoder(source)
    config = _tower_config(model)
    if kind == "siglip":
        outputs = model(pixel_values=pixel_values, interpolate_pos_encoding=True, output_hidden_states=True)
    else:
        outputs = model(**_naflex_inputs(pixel_values, int(config.patch_size)), output_hidden_states=True)
    hidden_states = outputs.hidden_states  # embeddings, then the output of every layer
    if len(hidden_states) != int(config.num_hidden_layers) + 1:
        raise RuntimeError(f"expected {config.num_hidden_layers + 1} hidden states, got {len(hidden_states)}")
    tower = getattr(model, "vision_model", model)
    return tower.post_layernorm(hidden_states[int(config.num_hidden_layers) - drop_last_layers])


@torch.no_grad()
def verify_bagel_export(source, directory: str | Path, seed: int = 0, device: str | torch.device = "cpu") -> float:
    """Max |difference| between the exported ViT (read back from `directory`) and the source encoder on one random
    image of 70 x 70 patches (the full table, where the resized table is exactly the encoder's own)."""
    if isinstance(source, (str, Path)):
        source = load_export_source(source)
    model, _ = _unwrap_encoder(source)
    reference = BagelNaViTReference.from_pretrained(directory).to(device)
    arch = reference.architecture
    side = arch.max_patches_per_side * arch.patch_size
    generator = torch.Generator().manual_seed(seed)
    image = (torch.rand(1, arch.num_channels, side, side, generator=generator) * 2 - 1).to(device)
    model = model.to(device).eval()
    expected = source_features(model, image.to(next(model.parameters()).dtype))[0]
    got = reference.encode_images([image[0].to(reference.vision_model.post_layernorm.weight.dtype)])[0]
    return float((got.float() - expected.float()).abs().max())

"""Preset lookup: a name in `configs/tokenizer/` (e.g. `psvae-96c`) or a path to a YAML delta."""

from __future__ import annotations

from pathlib import Path

import torch

from tokenizer.config import TokenizerTrainingConfig
from unimm.config import build_config
from unimm.errors import UserError

PRESET_DIR = Path(__file__).resolve().parents[1] / "configs" / "tokenizer"


def available_presets() -> list[str]:
    return sorted(path.stem for path in PRESET_DIR.glob("*.yaml"))


def preset_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise UserError(f"config file '{path}' does not exist")
        return path
    candidate = PRESET_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise UserError(f"unknown tokenizer preset '{name_or_path}'; available: {', '.join(available_presets())}")
    return candidate


def load_preset(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> TokenizerTrainingConfig:
    return build_config(TokenizerTrainingConfig, [preset_path(name_or_path)], overrides)


def describe_preset(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Instantiate a preset on the meta device (no weights, no downloads) and report its size and latent."""
    from tokenizer.model import SemanticAutoencoder, count_parameters

    config = load_preset(name_or_path, overrides)
    with torch.device("meta"):
        model = SemanticAutoencoder.build(config.model, pretrained_encoder=False)
    parts = {name: count_parameters(child) for name, child in model.named_children()}
    return {
        "preset": name_or_path,
        "family": config.model.family,
        "params": count_parameters(model),
        "params_by_part": {name: count for name, count in parts.items() if count},
        "latent_shape": list(model.latent_shape),
        "shift": round(model.shift, 4),
        "image_size": config.model.image_size,
        "encoder": config.model.encoder.name_or_path if config.model.encoder.role != "none" else None,
        "encoder_role": config.model.encoder.role,
    }

"""Generator presets: a name in configs/t2i or configs/edit (e.g. `t2i-0.5b`) or a path to a YAML delta."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from unimm.config import build_config
from unimm.errors import UserError
from unimm.train_config import GeneratorTrainingConfig

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"
PRESET_DIRS = (CONFIG_ROOT / "t2i", CONFIG_ROOT / "edit")


def available_presets() -> list[str]:
    return sorted(path.stem for directory in PRESET_DIRS for path in directory.glob("*.yaml"))


def find_preset(name: str) -> Path | None:
    for directory in PRESET_DIRS:
        candidate = directory / f"{name}.yaml"
        if candidate.is_file():
            return candidate
    return None


def preset_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise UserError(f"config file '{path}' does not exist")
        return path
    found = find_preset(name_or_path)
    if found is None:
        raise UserError(f"unknown generator preset '{name_or_path}'; available: {', '.join(available_presets())}")
    return found


def load_generator_preset(name_or_path: str, overrides=()) -> GeneratorTrainingConfig:
    return build_config(GeneratorTrainingConfig, [preset_path(name_or_path)], overrides)


def tokenizer_latent_shape(tokenizer: str) -> tuple[int, int, int]:
    """(C, h, w) of a saved tokenizer directory (read from its config, no weights) or of a tokenizer preset."""
    if not tokenizer:
        raise UserError("no tokenizer; set tokenizer=<saved tokenizer directory or tokenizer preset>")
    path = Path(tokenizer).expanduser()
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise UserError(f"{path} is not a saved tokenizer (no config.json); train one with unimm train-tokenizer")
        return tuple(json.loads(config_file.read_text())["latent_shape"])
    from tokenizer.presets import describe_preset

    return tuple(describe_preset(tokenizer)["latent_shape"])


def describe_generator_preset(name_or_path: str, overrides=()) -> dict:
    """Build the generator of a preset on the meta device (no weights) and report its size and training shift."""
    from unimm.flow.timesteps import training_shift
    from unimm.models.generator import UnimmGenerator, count_parameters

    config = load_generator_preset(name_or_path, overrides)
    channels, height, width = tokenizer_latent_shape(config.tokenizer)
    model_config = config.model
    if model_config.latent_channels in (0, channels):
        model_config.latent_channels = channels
    else:
        raise UserError(f"model.latent_channels={model_config.latent_channels} but the tokenizer's latents have {channels} channels")
    with torch.device("meta"):
        model = UnimmGenerator.build(model_config, pretrained=False)
    patch = model_config.latent_patch_size
    return {
        "preset": name_or_path,
        "task": config.train.task,
        "params": count_parameters(model),
        "params_by_part": {name: count_parameters(child) for name, child in model.named_children()},
        "backbone": model_config.backbone.name_or_path,
        "tokenizer": config.tokenizer,
        "latent_shape": [channels, height, width],
        "image_tokens": (height // patch) * (width // patch),
        "shift": round(config.train.shift or training_shift(channels, patch), 4),
        "sampling": json.loads(json.dumps(config.sampling.__dict__)),
    }

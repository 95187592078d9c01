"""``unimm train-tokenizer`` and ``unimm info``: train a tokenizer preset; describe a preset without weights."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    train = subparsers.add_parser(
        "train-tokenizer",
        help="train a tokenizer preset (two stages for PS-VAE / S-AE); resumes from the run directory",
    )
    train.add_argument("--config", required=True, help="preset name in configs/tokenizer (e.g. mini-psvae) or a YAML file")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. output_dir=runs/x train.stage1.steps=100")
    train.add_argument("--no-resume", action="store_true", help="start from scratch even if the run directory has checkpoints")
    train.add_argument("--max-steps", type=int, help="stop after this many more steps (the run can be resumed)")
    train.set_defaults(handler=run_train_tokenizer)

    info = subparsers.add_parser(
        "info", help="build a tokenizer or generator preset on the meta device and print its parameters, latent shape and shift",
    )
    info.add_argument("preset", help="preset name in configs/tokenizer, configs/t2i or configs/edit, or a YAML file")
    info.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.latent.channels=64")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(handler=run_info)


def run_train_tokenizer(args: argparse.Namespace) -> int:
    from tokenizer.presets import load_preset
    from tokenizer.trainer import TokenizerTrainer

    config = load_preset(args.config, args.overrides)
    trainer = TokenizerTrainer(config, resume=not args.no_resume)
    trainer.train(max_steps=args.max_steps)
    return 0


def run_info(args: argparse.Namespace) -> int:
    from tokenizer.presets import describe_preset
    from unimm.presets import describe_generator_preset, find_preset

    if find_preset(args.preset) is not None or _is_generator_yaml(args.preset):
        description = describe_generator_preset(args.preset, args.overrides)
    else:
        description = describe_preset(args.preset, args.overrides)
    if args.json:
        print(json.dumps(description))
        return 0
    for key, value in description.items():
        print(f"{key}: {value}")
    return 0


def _is_generator_yaml(path: str) -> bool:
    """A YAML file under configs/t2i or configs/edit, or one that sets generator-only keys."""
    from pathlib import Path

    from unimm.presets import PRESET_DIRS

    file = Path(path)
    if file.suffix not in (".yaml", ".yml") or not file.is_file():
        return False
    if any(directory in file.resolve().parents for directory in PRESET_DIRS):
        return True
    import yaml

    data = yaml.safe_load(file.read_text()) or {}
    return "sampling" in data or "tokenizer" in data

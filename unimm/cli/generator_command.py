"""`unimm train`, `unimm generate`, `unimm edit`: train the generator and sample from a pipeline directory."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    train = subparsers.add_parser("train", help="train the generator (text-to-image or editing preset); resumes from the run directory")
    train.add_argument("--config", required=True, help="preset in configs/t2i or configs/edit (e.g. mini-shapes) or a YAML file")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. output_dir=runs/x train.steps=100 tokenizer=DIR")
    train.add_argument("--no-resume", action="store_true", help="start from scratch even if the run directory has checkpoints")
    train.add_argument("--max-steps", type=int, help="stop after this many more steps (the run can be resumed)")
    train.set_defaults(handler=run_train)

    generate = subparsers.add_parser("generate", help="text-to-image: sample images for prompts from a pipeline directory")
    generate.add_argument("prompts", nargs="+", help="one image per prompt")
    generate.add_argument("--model", help="pipeline directory (<run>/pipeline) or hub id (default: the shipped Shapes model, checkpoints/shapes/t2i)")
    generate.add_argument("-o", "--output", required=True, help="output PNG; with several prompts, NAME-0.png, NAME-1.png, ...")
    _sampling_arguments(generate)
    generate.add_argument("--size", type=int, help="output size in pixels (default: the tokenizer's)")
    generate.set_defaults(handler=run_generate)

    edit = subparsers.add_parser("edit", help="edit an image by an instruction with a pipeline trained for editing")
    edit.add_argument("image", help="input image file")
    edit.add_argument("instruction", help="what to change")
    edit.add_argument("--model", help="pipeline directory (<run>/pipeline) or hub id (default: the shipped Shapes model, checkpoints/shapes/edit)")
    edit.add_argument("-o", "--output", required=True, help="output PNG")
    _sampling_arguments(edit)
    edit.add_argument("--image-cfg", type=float, help="input-image guidance scale")
    edit.set_defaults(handler=run_edit)


def _sampling_arguments(parser) -> None:
    parser.add_argument("--steps", type=int, help="Euler steps (default: the pipeline's, 50)")
    parser.add_argument("--cfg", type=float, help="text guidance scale (default: the pipeline's, 6.5)")
    parser.add_argument("--shift", type=float, help="inference shift (default: the pipeline's, 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    parser.add_argument("--no-kv-cache", action="store_true", help="re-run the text prefix at every step (for comparison)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def run_train(args: argparse.Namespace) -> int:
    from unimm.presets import load_generator_preset
    from unimm.trainer import GeneratorTrainer

    config = load_generator_preset(args.config, args.overrides)
    trainer = GeneratorTrainer(config, resume=not args.no_resume)
    trainer.train(max_steps=args.max_steps)
    return 0


def _output_paths(output: str, count: int) -> list[Path]:
    path = Path(output)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{index}{path.suffix or '.png'}") for index in range(count)]


def run_generate(args: argparse.Namespace) -> int:
    from unimm.pipeline import UnimmPipeline

    pipeline = UnimmPipeline.from_pretrained(args.model, device=args.device)  # None: the shipped model
    images = pipeline(args.prompts, steps=args.steps, cfg=args.cfg, shift=args.shift, seed=args.seed, size=args.size, use_kv_cache=not args.no_kv_cache)
    for image, path in zip(images, _output_paths(args.output, len(images))):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        print(path)
    return 0


def run_edit(args: argparse.Namespace) -> int:
    from PIL import Image, UnidentifiedImageError

    from unimm.errors import UserError
    from unimm.pipeline import UnimmPipeline

    try:
        image = Image.open(args.image)
        image.load()
    except (OSError, UnidentifiedImageError) as error:
        raise UserError(f"cannot read the input image '{args.image}' ({error.__class__.__name__}); pass a PNG or JPEG file") from None
    from unimm.defaults import default_model

    pipeline = UnimmPipeline.from_pretrained(args.model or default_model("edit"), device=args.device)
    edited = pipeline.edit(
        image, args.instruction, steps=args.steps, cfg=args.cfg, image_cfg=args.image_cfg, shift=args.shift, seed=args.seed,
        use_kv_cache=not args.no_kv_cache,
    )[0]
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    edited.save(path)
    print(path)
    return 0

"""``unimm shapes``: render scenes, write the Shapes dataset, judge images, check the judge."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from unimm.cli.arguments import IntermixedArgumentParser
from unimm.errors import UserError


def register(subparsers) -> None:
    parser = subparsers.add_parser("shapes", help="the Shapes world: render, dataset, judge, check")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", title="actions", parser_class=IntermixedArgumentParser)
    actions.required = True

    render = actions.add_parser("render", help="render random scenes into one PNG (a grid when --count > 1)")
    render.add_argument("-o", "--output", required=True, help="PNG file to write")
    render.add_argument("--seed", type=int, default=0)
    render.add_argument("--count", type=int, default=1)
    render.add_argument("--resolution", type=int, default=256)
    render.add_argument("--columns", type=int, default=4)
    render.add_argument("--json", action="store_true", help="print each scene graph as a JSON line instead of its caption")
    render.set_defaults(handler=run_render)

    dataset = actions.add_parser("dataset", help="write text-to-image shards, edit pairs and prompt files")
    dataset.add_argument("-o", "--output", required=True, help="output directory")
    dataset.add_argument("--config", action="append", default=[], help="YAML delta (repeatable), e.g. configs/shapes/demo.yaml")
    dataset.add_argument("--workers", type=int, default=1, help="rendering processes (the output is the same for any number)")
    dataset.add_argument("overrides", nargs="*", help="dotted overrides, e.g. num_train=500 resolution=256")
    dataset.set_defaults(handler=run_dataset)

    judge = actions.add_parser("judge", help="print one JSON line per image with the objects found in it")
    judge.add_argument("images", nargs="+")
    judge.add_argument("--spec", help="a GenEval-format spec (JSON text or a .json file) to score each image against")
    judge.set_defaults(handler=run_judge)

    check = actions.add_parser("check", help="measure the judge on held-out renders and on GenEval-format prompts")
    check.add_argument("--scenes", type=int, default=200, help="held-out scenes per condition")
    check.add_argument("--seed", type=int, default=1234)
    check.add_argument("--dataset", help="also judge a written text-to-image split (e.g. runs/demo/shapes/t2i/val) against its scene graphs")
    check.set_defaults(handler=run_check)

    encoder = actions.add_parser(
        "train-encoder", help="train the small representation encoder (a tiny Dinov2Model) that stands in for DINOv2"
    )
    encoder.add_argument("--config", action="append", default=[], help="YAML delta (repeatable), e.g. configs/shapes/encoder.yaml")
    encoder.add_argument("overrides", nargs="*", help="dotted overrides, e.g. steps=300 output_dir=runs/enc")
    encoder.set_defaults(handler=run_train_encoder)

    text_model = actions.add_parser(
        "text-model", help="write the Shapes stand-in for Qwen2.5: a word tokenizer trained on Shapes text and a small Qwen2"
    )
    text_model.add_argument("-o", "--output", required=True, help="output directory (Qwen2 format: config, weights, tokenizer)")
    text_model.add_argument("overrides", nargs="*", help="dotted overrides, e.g. hidden_size=192 num_hidden_layers=6")
    text_model.set_defaults(handler=run_text_model)


def run_render(args: argparse.Namespace) -> int:
    from PIL import Image

    from data.shapes.captions import short_caption
    from data.shapes.render import render_scene
    from data.shapes.scene import sample_scene

    if args.count < 1 or args.resolution < 16:
        raise UserError("--count must be >= 1 and --resolution >= 16")
    scenes = [sample_scene(args.seed + i) for i in range(args.count)]
    columns = min(args.columns, args.count)
    rows = -(-args.count // columns)
    sheet = Image.new("RGB", (columns * args.resolution, rows * args.resolution), (255, 255, 255))
    for index, scene in enumerate(scenes):
        sheet.paste(render_scene(scene, args.resolution), ((index % columns) * args.resolution, (index // columns) * args.resolution))
        if args.json:
            print(json.dumps({"index": index, "caption": short_caption(scene), "scene": scene.to_dict()}))
        else:
            print(f"[{index}] {short_caption(scene)}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.output)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def run_dataset(args: argparse.Namespace) -> int:
    from data.shapes.dataset import ShapesDatasetConfig, spec_tag_probabilities, write_shapes_dataset
    from unimm.config import build_config

    config = build_config(ShapesDatasetConfig, args.config, args.overrides)
    if config.resolution < 16:
        raise UserError(f"resolution={config.resolution} is too small; use 16 or more (64 and 256 are the usual)")
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, not {args.workers}")
    try:
        spec_tag_probabilities(config.spec_tag_weights)
    except ValueError as error:
        raise UserError(str(error)) from None
    summary = write_shapes_dataset(config, args.output, progress=sys.stderr.isatty(), workers=args.workers)
    print(json.dumps(summary))
    return 0


def _load_spec(text: str) -> dict:
    path = Path(text)
    try:
        spec = json.loads(path.read_text() if path.suffix == ".json" and path.is_file() else text)
    except json.JSONDecodeError as error:
        raise UserError(f"--spec is not valid JSON ({error.msg}); pass a GenEval metadata line or a .json file") from None
    if not isinstance(spec, dict) or "include" not in spec:
        raise UserError('--spec must be a GenEval metadata object with an "include" list')
    return spec


def run_judge(args: argparse.Namespace) -> int:
    from PIL import Image, UnidentifiedImageError

    from data.shapes.judge import judge_image, score_spec

    spec = _load_spec(args.spec) if args.spec else None
    for name in args.images:
        try:
            with Image.open(name) as opened:
                image = opened.convert("RGB")
        except FileNotFoundError:
            raise UserError(f"image '{name}' does not exist") from None
        except (UnidentifiedImageError, OSError) as error:
            raise UserError(f"cannot read '{name}' as an image ({error.__class__.__name__}); pass a PNG or JPEG") from None
        judged = judge_image(image)
        line = {"image": name, **judged.to_dict()}
        if spec is not None:
            correct, reasons = score_spec(judged, spec)
            line.update({"prompt": spec.get("prompt"), "correct": correct, "reasons": reasons})
        print(json.dumps(line))
    return 0


def run_check(args: argparse.Namespace) -> int:
    from data.shapes.judge_check import (
        DEFAULT_CONDITIONS,
        dataset_accuracy,
        object_accuracy,
        oracle_dpg,
        oracle_geneval,
    )

    if args.scenes < 1:
        raise UserError("--scenes must be at least 1")
    dataset_result = dataset_accuracy(args.dataset) if args.dataset else None  # fails early on a bad path
    print("Program judge, per-object accuracy (shape and colour right, centre within 5% of the side):")
    print("| images | objects | correct | accuracy | false positives |")
    print("|---|---|---|---|---|")
    if dataset_result is not None:
        result = dataset_result
        print(f"| {result.condition} | {result.objects} | {result.correct} | {result.accuracy:.4f} | {result.false_positives} |")
    for condition in DEFAULT_CONDITIONS:
        scenes = args.scenes if condition.resolution <= 64 and not condition.render_resolution else max(args.scenes // 2, 1)
        result = object_accuracy(condition, scenes, seed=args.seed)
        print(f"| {scenes} held-out scenes, {result.condition} | {result.objects} | {result.correct} | {result.accuracy:.4f} | {result.false_positives} |")
    _print_scores(
        "GenEval-format Shapes prompts, each laid out exactly and judged at 64 px (an ideal generator):",
        oracle_geneval(resolution=64, seed=args.seed),
    )
    _print_scores(
        "DPG-style questions, each asked of its own scene's 64 px render (fraction answered yes):",
        oracle_dpg(num_items=100, resolution=64, seed=args.seed),
    )
    return 0


def _print_scores(title: str, scores: dict[str, float]) -> None:
    """A one-row Markdown table of named scores under a title line."""
    print(f"\n{title}")
    print("| " + " | ".join(scores) + " |")
    print("|" + "---|" * len(scores))
    print("| " + " | ".join(f"{value:.3f}" for value in scores.values()) + " |")


def run_train_encoder(args: argparse.Namespace) -> int:
    from tokenizer.shapes_encoder import ShapesEncoderConfig, train_shapes_encoder
    from unimm.config import build_config, save_resolved_config

    config = build_config(ShapesEncoderConfig, args.config, args.overrides)
    if config.resolution % config.patch_size:
        raise UserError(f"resolution={config.resolution} must be a multiple of patch_size={config.patch_size}")
    if config.subpatch_grid < 1 or config.patch_size % config.subpatch_grid:
        raise UserError(f"subpatch_grid={config.subpatch_grid} must be a divisor of patch_size={config.patch_size} (cells of whole pixels)")
    save_resolved_config(config, config.output_dir)
    metrics = train_shapes_encoder(config, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(metrics))
    return 0


def run_text_model(args: argparse.Namespace) -> int:
    from data.shapes.text_model import ShapesTextModelConfig, write_shapes_text_model
    from unimm.config import build_config

    config = build_config(ShapesTextModelConfig, [], args.overrides)
    path = write_shapes_text_model(args.output, config)
    print(f"wrote the Shapes text model to {path}")
    return 0

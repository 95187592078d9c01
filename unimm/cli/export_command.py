"""``unimm export``: write trained parts in other projects' layouts.

``unimm export bagel-vit --tokenizer DIR -o OUT [--merge-into ema.safetensors] [--check-keys]
[--dtype source|float32|bfloat16|float16] [--verify] [--device DEV] [--json]``: the SigLIP representation
encoder of a tokenizer as Bagel's understanding ViT (PS-VAE §4.4): ``OUT/vit_model.safetensors`` +
``OUT/vit_config.json`` (+ ``OUT/ema.safetensors`` with only the ``vit_model.*`` tensors replaced).

``unimm export shapes-default [--run runs/shapes-default] [-o checkpoints/shapes]``: the trained Shapes
text-to-image and editing pipelines as the shipped embedded default (``unimm.defaults``).

``unimm export checkpoint RUN_OR_CHECKPOINT -o OUT [--weights ema|live] [--tokenizer DIR]``: a generator training
checkpoint as a pipeline directory, to sample or evaluate a run before it finishes (``unimm.export.checkpoint``).
"""

from __future__ import annotations

import argparse
import json
import re

from unimm.cli.arguments import IntermixedArgumentParser
from unimm.errors import UserError


def register(subparsers) -> None:
    parser = subparsers.add_parser("export", help="export trained parts: a training checkpoint as a pipeline, the shipped Shapes default, Bagel's ViT")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", title="actions", parser_class=IntermixedArgumentParser)
    actions.required = True
    bagel = actions.add_parser(
        "bagel-vit",
        help="a SigLIP tokenizer's representation encoder as Bagel's understanding ViT (safetensors + vit_config.json)",
        description=(
            "Write the representation encoder of a SigLIP / SigLIP2-based tokenizer in Bagel's layout: keys under "
            "vit_model.vision_model.*, no pooling head, the last encoder layer dropped, the patch convolution as a "
            "Linear over (kh, kw, c)-flattened patches, the position table resized to 70x70 row-major (the encoder's "
            "own transformers resize: bicubic for SigLIP, bilinear-antialias for SigLIP2 NaFlex). vit_config.json "
            "follows Bagel's convention: num_hidden_layers counts the layer Bagel's loader drops."
        ),
    )
    bagel.add_argument("--tokenizer", required=True, metavar="DIR", help="a tokenizer save_pretrained directory (or a transformers SigLIP encoder directory)")
    bagel.add_argument("-o", "--output", required=True, metavar="OUT", help="output directory")
    bagel.add_argument("--merge-into", metavar="EMA", help="Bagel's ema.safetensors: write OUT/ema.safetensors with only its vit_model.* tensors replaced")
    bagel.add_argument("--check-keys", action="store_true", help="print missing / unexpected / mis-shaped keys against Bagel's ViT (so400m/14, 26 layers, 980 px)")
    bagel.add_argument("--dtype", choices=("source", "float32", "bfloat16", "float16"), default="source",
                       help="stored dtype (default: the encoder's; merged tensors take the dtype of the ones they replace)")
    bagel.add_argument("--verify", action="store_true", help="read the export back and compare its features with the encoder's on one 70x70-patch image")
    bagel.add_argument("--device", default="cpu", help="device for --verify (default cpu)")
    bagel.add_argument("--json", action="store_true", help="print the report as one JSON object")
    bagel.set_defaults(handler=run_export_bagel_vit)

    checkpoint = actions.add_parser(
        "checkpoint",
        help="a generator training checkpoint (EMA or live weights) as a pipeline directory, to sample or evaluate a run mid-way",
    )
    checkpoint.add_argument("source", metavar="RUN_OR_CHECKPOINT", help="a checkpoint-<step> directory, or a run directory (its latest checkpoint)")
    checkpoint.add_argument("-o", "--output", required=True, metavar="OUT", help="pipeline directory to write")
    checkpoint.add_argument("--weights", choices=("ema", "live"), default="ema", help="the EMA average (default, what the run's pipeline holds) or the live weights")
    checkpoint.add_argument("--tokenizer", metavar="DIR", help="the image tokenizer (default: the run's `tokenizer` setting)")
    checkpoint.set_defaults(handler=run_export_checkpoint)

    shapes = actions.add_parser(
        "shapes-default",
        help="package the trained Shapes text-to-image and editing pipelines as the shipped default (checkpoints/shapes)",
    )
    shapes.add_argument("--run", default="runs/shapes-default", help="run directory of scripts/shapes_default.sh (t2i/, edit/)")
    shapes.add_argument("--t2i-run", help="the text-to-image run directory (default: RUN/t2i); its pipeline/ and shapes.json are exported")
    shapes.add_argument("--edit-run", help="the editing run directory (default: RUN/edit); its pipeline/ and shapes.json are exported")
    shapes.add_argument(
        "--log-tag",
        help="the two generators' logs go to logs/t2i-TAG and logs/edit-TAG instead of logs/t2i and logs/edit (e.g. 'continued' "
        "for runs trained further from the shipped weights); logs already in the output that this export does not write are kept",
    )
    shapes.add_argument("--tokenizer-run", default="runs/mini-psvae", help="the tokenizer's run directory (its logs are copied)")
    shapes.add_argument(
        "--decoder-run", help="a decoder-stage run of that tokenizer (train.decoder): its tokenizer/ replaces the pipelines' "
        "after a check that the latent space is identical, and its logs are copied",
    )
    shapes.add_argument("--encoder-run", default="runs/shapes-encoder", help="the representation encoder's run directory (its logs are copied)")
    shapes.add_argument("-o", "--output", default="checkpoints/shapes", help="output directory (replaced)")
    shapes.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16", help="stored weight dtype")
    shapes.set_defaults(handler=run_export_shapes_default)


def run_export_bagel_vit(args: argparse.Namespace) -> int:
    from unimm.export.bagel import (
        check_merge_target,
        export_bagel_vit,
        load_export_source,
        verify_bagel_export,
    )

    check_merge_target(args.merge_into, args.output)
    source = load_export_source(args.tokenizer)
    report = export_bagel_vit(source, args.output, merge_into=args.merge_into, dtype=args.dtype)
    difference = verify_bagel_export(source, args.output, device=args.device) if args.verify else None
    if args.json:
        payload = report.to_dict()
        payload["matches_bagel"] = report.matches_bagel
        if difference is not None:
            payload["verify_max_abs_difference"] = difference
        print(json.dumps(payload))
        return 0
    for line in report.lines(keys=args.check_keys):
        print(line)
    if difference is not None:
        print(f"verify: max |exported - encoder| = {difference:.3g} on one {report.position_grid}x{report.position_grid}-patch image")
    return 0


def run_export_checkpoint(args: argparse.Namespace) -> int:
    from unimm.export.checkpoint import export_checkpoint_pipeline

    report = export_checkpoint_pipeline(args.source, args.output, weights=args.weights, tokenizer=args.tokenizer)
    print(f"step {report['step']} ({report['weights']} weights) of {report['checkpoint']} -> {report['output']}")
    return 0


def run_export_shapes_default(args: argparse.Namespace) -> int:
    from pathlib import Path

    from unimm.defaults import package_default_checkpoints

    if args.log_tag is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", args.log_tag):
        raise UserError(f"--log-tag must be a plain name of letters, digits, '.', '_' and '-' (like 'continued'), not '{args.log_tag}'")
    suffix = f"-{args.log_tag}" if args.log_tag else ""
    run = Path(args.run)
    t2i_run = Path(args.t2i_run) if args.t2i_run else run / "t2i"
    edit_run = Path(args.edit_run) if args.edit_run else run / "edit"

    def optional(path: Path) -> Path | None:
        return path if path.is_file() else None

    report = package_default_checkpoints(
        t2i_run / "pipeline", edit_run / "pipeline", args.output, dtype=args.dtype,
        t2i_scores=optional(t2i_run / "shapes.json"), edit_scores=optional(edit_run / "shapes.json"),
        logs={"encoder": args.encoder_run, "tokenizer": args.tokenizer_run,
              f"t2i{suffix}": t2i_run, f"edit{suffix}": edit_run,
              **({"tokenizer-decoder": args.decoder_run} if args.decoder_run else {})},
        image_tokenizer=Path(args.decoder_run) / "tokenizer" if args.decoder_run else None,
    )
    for name, size in report["files"].items():
        print(f"{size / 1e6:8.2f} MB  {name}")
    print(f"{report['total_bytes'] / 1e6:8.2f} MB  in all -> {report['output']} ({report['dtype']})")
    return 0

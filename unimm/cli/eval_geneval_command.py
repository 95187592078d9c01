"""``unimm eval geneval``: GenEval in two steps.

``generate`` writes a pipeline's images in the official layout (``<out>/<00000>/metadata.jsonl`` + ``samples/0000.png``,
resumable); ``score`` judges that folder with the unimm evaluator (GenEval's rules on a transformers Mask2Former
and CLIP). The official mmdet evaluator reads the same folder and gives the official numbers.
"""

from __future__ import annotations

import argparse
import json
import sys

from unimm.cli.arguments import IntermixedArgumentParser
from unimm.errors import UserError

DETECTOR_DEFAULT = "facebook/mask2former-swin-small-coco-instance"  # == eval.geneval.DEFAULT_DETECTOR (kept light to import)
CLIP_DEFAULT = "openai/clip-vit-large-patch14"  # == eval.geneval.DEFAULT_CLIP

EPILOG = """examples:
  unimm eval geneval generate --model runs/t2i/pipeline --metadata evaluation_metadata.jsonl -o out/geneval
  unimm eval geneval generate --model runs/t2i/pipeline --metadata evaluation_metadata.jsonl \\
      --long-prompts evaluation_metadata_long.jsonl -o out/geneval-long
  unimm eval geneval score out/geneval --detector facebook/mask2former-swin-small-coco-instance \\
      --clip openai/clip-vit-large-patch14 --out out/geneval.json

The scores are "GenEval (unimm evaluator)". Official GenEval numbers come from the official mmdet evaluator
(djghosh13/geneval evaluation/evaluate_images.py), which reads the same folder."""


def register_actions(actions) -> None:
    """Add ``geneval`` (modes ``generate`` and ``score``) to the ``unimm eval`` action subparsers."""
    geneval = actions.add_parser(
        "geneval", help="GenEval: generate in the official folder layout, score with the unimm evaluator (Mask2Former + CLIP)",
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    modes = geneval.add_subparsers(dest="mode", metavar="MODE", title="modes", parser_class=IntermixedArgumentParser)
    modes.required = True

    generate = modes.add_parser(
        "generate", help="generate N images per prompt into <out>/<00000>/samples/0000.png (skips images already there)",
        description="Generate images for a GenEval metadata file in the official layout. Every <out>/<index:05d>/metadata.jsonl "
                    "holds the ORIGINAL metadata line, also when --long-prompts supplies the text; image k of every prompt uses "
                    "seed + k; <out>/generation.json records the prompt-file hashes and sampling settings. A rerun with the "
                    "same settings generates only what is missing.",
    )
    generate.add_argument("--model", required=True, help="pipeline directory (<run>/pipeline of unimm train) or hub id")
    generate.add_argument("--metadata", required=True, help="GenEval metadata JSONL (evaluation_metadata.jsonl: one prompt spec per line)")
    generate.add_argument("--long-prompts", help="line-aligned rewrite of the metadata file whose prompts are used instead (Bagel's evaluation_metadata_long.jsonl)")
    generate.add_argument("-o", "--out", required=True, help="output folder (the official layout)")
    generate.add_argument("--images-per-prompt", type=int, default=4, help="images per prompt (GenEval: 4)")
    generate.add_argument("--steps", type=int, help="Euler steps (default: the pipeline's)")
    generate.add_argument("--cfg", type=float, help="guidance scale (default: the pipeline's)")
    generate.add_argument("--shift", type=float, help="inference shift (default: the pipeline's)")
    generate.add_argument("--size", type=int, help="image size in pixels (default: the tokenizer's)")
    generate.add_argument("--seed", type=int, default=0, help="image k of every prompt uses seed + k (default 0)")
    generate.add_argument("--batch-size", type=int, default=8, help="images per pipeline call")
    generate.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    generate.set_defaults(handler=run_generate)

    score = modes.add_parser(
        "score", help="score a GenEval folder with the unimm evaluator: per-tag and overall accuracy",
        description="Score a folder in GenEval's layout with GenEval's rules (score > 0.3, > 0.9 for counting; at most 16 "
                    "objects per class; CLIP colour over 10 colours; position with a 0.1 margin; include AND, exclude OR) on a "
                    "transformers Mask2Former COCO-instance detector and CLIP. Prints a Markdown table and writes a result file "
                    "that records the judges, the prompt-file hash and the sampling protocol. These are 'GenEval (unimm "
                    "evaluator)' numbers; official ones come from the official mmdet evaluator on the same folder.",
    )
    score.add_argument("folder", metavar="FOLDER", help="the folder written by unimm eval geneval generate (or any GenEval-layout folder)")
    score.add_argument("--detector", default=DETECTOR_DEFAULT, help=f"Mask2Former COCO instance model: directory or hub id (default {DETECTOR_DEFAULT})")
    score.add_argument("--clip", default=CLIP_DEFAULT, help=f"CLIP model: directory or hub id (default {CLIP_DEFAULT}, GenEval's ViT-L/14)")
    score.add_argument("--out", metavar="FILE", help="result JSON (default: FOLDER/geneval_unimm_results.json)")
    score.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    score.set_defaults(handler=run_score)


def _positive(value: int | None, flag: str) -> None:
    if value is not None and value < 1:
        raise UserError(f"{flag} must be at least 1, got {value}")


def run_generate(args: argparse.Namespace) -> int:
    for value, flag in ((args.images_per_prompt, "--images-per-prompt"), (args.batch_size, "--batch-size"),
                        (args.steps, "--steps"), (args.size, "--size")):
        _positive(value, flag)
    from eval.geneval import generate_geneval, read_prompts

    read_prompts(args.metadata, args.long_prompts)  # bad prompt files fail before the model is loaded
    from unimm.pipeline import UnimmPipeline

    pipeline = UnimmPipeline.from_pretrained(args.model, device=args.device)
    record = generate_geneval(pipeline, args.metadata, args.out, images_per_prompt=args.images_per_prompt,
                              long_prompts_path=args.long_prompts, steps=args.steps, cfg=args.cfg, shift=args.shift,
                              seed=args.seed, batch_size=args.batch_size, size=args.size, model_id=str(args.model))
    summary = {key: record[key] for key in ("num_prompts", "images_per_prompt", "generated_images", "skipped_images", "prompt_source",
                                            "steps", "cfg", "shift", "seed", "resolution")}
    print(json.dumps(summary))
    print(f"wrote {args.out} (score it with: unimm eval geneval score {args.out})", file=sys.stderr)
    return 0


def run_score(args: argparse.Namespace) -> int:
    from eval.geneval import (
        ClipColorClassifier,
        Mask2FormerDetector,
        evaluate_geneval_folder,
        read_geneval_folder,
    )

    read_geneval_folder(args.folder)  # a bad folder fails before the judges are loaded
    import torch

    if args.device != "auto":
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise UserError(f"--device '{args.device}' is not a device; use auto, cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {args.device} asked for a GPU but CUDA is not available; use --device cpu")
    detector = Mask2FormerDetector.from_pretrained(args.detector, device=args.device)
    classifier = ClipColorClassifier.from_pretrained(args.clip, device=args.device)
    result = evaluate_geneval_folder(args.folder, detector, classifier, results_path=args.out)
    print(result["table"])
    print(f"wrote {result['results_path']}", file=sys.stderr)
    return 0

"""``unimm understanding``: understanding retention in miniature (PS-VAE §4.4 on the Shapes world).

``unimm understanding train --encoder DIR -o OUT [--config YAML] [--device D] [key=value ...]``
``unimm understanding swap --model OUT --encoder DIR [--realign-steps N] [--control] [--device D] [--out JSON]``
"""

from __future__ import annotations

import argparse
import json
import sys

from unimm.cli.arguments import IntermixedArgumentParser


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "understanding",
        help="a small Shapes QA model on a frozen encoder; swap in a fine-tuned encoder and measure retention",
        description=(
            "Understanding retention in miniature: `train` fits a connector + tiny Qwen2 that answers questions "
            "about Shapes scenes (answers checked against the scene graph) on a frozen representation encoder; "
            "`swap` evaluates it with another encoder (e.g. a PS-VAE tokenizer's fine-tuned backbone) with LLM and "
            "connector frozen, then after re-aligning only the connector, and prints a Markdown table."
        ),
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", title="actions", parser_class=IntermixedArgumentParser)
    actions.required = True

    train = actions.add_parser("train", help="train connector + LLM on a frozen encoder and evaluate on held-out scenes")
    train.add_argument("--encoder", required=True, metavar="DIR",
                       help="a representation encoder save_pretrained directory, or a tokenizer directory (its backbone)")
    train.add_argument("-o", "--output", required=True, metavar="OUT", help="directory for the trained model")
    train.add_argument("--config", action="append", default=[], metavar="YAML", help="config delta file(s)")
    train.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. steps=1500 batch_size=64")
    train.set_defaults(handler=run_train)

    swap = actions.add_parser("swap", help="accuracy with another encoder swapped in (frozen), then after connector re-alignment")
    swap.add_argument("--model", required=True, metavar="OUT", help="a directory written by `unimm understanding train`")
    swap.add_argument("--encoder", required=True, metavar="DIR",
                      help="the encoder to swap in: encoder or tokenizer directory (a PS-VAE's fine-tuned backbone)")
    swap.add_argument("--realign-steps", type=int, metavar="N", help="connector-only steps (default: the model's realign_steps; 0 skips)")
    swap.add_argument("--control", action="store_true", help="also re-align the connector on the original encoder for as many steps")
    swap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    swap.add_argument("--out", metavar="JSON", help="write the results as JSON here")
    swap.set_defaults(handler=run_swap)


def run_train(args: argparse.Namespace) -> int:
    from unimm.config import build_config
    from unimm.errors import UserError
    from unimm.understanding import UnderstandingConfig, train_understanding

    stray = [item for item in args.overrides if "=" not in item]
    if stray:
        raise UserError(f"'{stray[0]}' is not a KEY=VALUE override")
    config = build_config(UnderstandingConfig, args.config, args.overrides)
    metadata = train_understanding(config, args.encoder, args.output, device=args.device, log=_log)
    print(json.dumps({"accuracy": metadata["eval"]["accuracy"], "per_type": metadata["eval"]["per_type"],
                      "wall_seconds": round(metadata["wall_seconds"], 1)}))
    return 0


def run_swap(args: argparse.Namespace) -> int:
    from unimm.atomic import atomic_write_text
    from unimm.understanding import format_table, retention

    result = retention(args.model, args.encoder, realign_steps=args.realign_steps, device=args.device,
                       control=args.control, log=_log)
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    drift = result["feature_drift"]
    print(format_table(result))
    print(f"\nfeature drift (held-out patch tokens): cosine {drift['cosine']:.4f}, relative L2 {drift['relative_l2']:.4f}; "
          f"{result['wall_seconds']:.0f} s on {result['device']}")
    return 0


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)

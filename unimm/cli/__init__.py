"""The ``unimm`` command. Every subcommand is registered here, from one list, and nowhere else.

Each module in ``COMMAND_MODULES`` exposes ``register(subparsers)``, which adds its parser and sets
``handler`` on it. Heavy imports (torch, transformers) happen inside handlers so ``unimm --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from unimm import __version__
from unimm.cli.arguments import IntermixedArgumentParser
from unimm.errors import UserError

# Only subcommands that are built are listed; a module is added here when its command works end to end.
COMMAND_MODULES = (
    "unimm.cli.demo_command",
    "unimm.cli.shapes_command",
    "unimm.cli.data_command",
    "unimm.cli.tokenizer_command",
    "unimm.cli.eval_command",
    "unimm.cli.cache_command",
    "unimm.cli.generator_command",
    "unimm.cli.export_command",
    "unimm.cli.understanding_command",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unimm",
        description="Unified text-to-image and editing models on semantic-autoencoder latents.",
    )
    parser.add_argument("--version", action="version", version=f"unimm {__version__}")
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", title="commands", parser_class=IntermixedArgumentParser
    )
    subparsers.required = True
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command_name = " ".join(part for part in (args.command, getattr(args, "action", None)) if part)
    try:
        result = args.handler(args)
    except UserError as error:
        print(f"unimm {command_name}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"unimm {command_name}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())

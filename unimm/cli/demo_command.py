"""``unimm demo``: the README's main command — a gallery from the shipped Shapes models and their scores."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    demo = subparsers.add_parser(
        "demo", help="generate a gallery of prompts and edits with the shipped Shapes models; print their Shapes-suite scores"
    )
    demo.add_argument("-o", "--output", default="runs/demo", help="output directory (gallery.png, index.html, images/)")
    demo.add_argument("--model", help="text-to-image pipeline directory (default: the shipped checkpoints/shapes/t2i)")
    demo.add_argument("--edit-model", help="editing pipeline directory (default: the shipped checkpoints/shapes/edit)")
    demo.add_argument("--prompt", action="append", help="a prompt of your own (repeatable; replaces the built-in list)")
    demo.add_argument("--seeds", type=int, default=2, help="images per prompt (default 2)")
    demo.add_argument("--edits", type=int, default=7, help="edit examples, one per task kind in turn (0: none)")
    demo.add_argument("--steps", type=int, help="Euler steps (default: the pipeline's)")
    demo.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    demo.set_defaults(handler=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> int:
    from unimm.defaults import shipped_scores
    from unimm.demo import DEMO_PROMPTS, format_scores, run_demo
    from unimm.errors import UserError

    if args.seeds < 1 or args.edits < 0 or (args.steps is not None and args.steps < 1):
        raise UserError("--seeds and --steps must be at least 1 and --edits at least 0")
    result = run_demo(args.output, t2i_model=args.model, edit_model=args.edit_model, prompts=args.prompt or DEMO_PROMPTS,
                      seeds_per_prompt=args.seeds, num_edits=args.edits, steps=args.steps, device=args.device)
    seconds = ", ".join(f"{name} {value:.1f} s" for name, value in result.seconds.items())
    print(f"{len(result.prompts)} prompts x {args.seeds} images and {len(result.edits)} edits ({seconds})")
    print(f"gallery: {result.output / 'gallery.png'}")
    print(f"page:    {result.output / 'index.html'}")
    if not (args.model or args.edit_model):
        for line in format_scores(shipped_scores()):
            print(line)
    return 0

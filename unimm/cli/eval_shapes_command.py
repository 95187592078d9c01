"""`unimm eval shapes`: the Shapes benchmark suite (ShapesGenEval, ShapesDPG, ShapesEdit) on a pipeline."""

from __future__ import annotations

import argparse

SUITES = ("geneval", "dpg", "edit", "ceiling", "edit-ceiling", "binding")


def register_actions(actions) -> None:
    table = actions.add_parser(
        "tokenizer-table", help="one table of tokenizer runs: reconstruction, linear probe, Shapes suite of their generators (Table 4)"
    )
    table.add_argument("--root", required=True, help="directory holding one run directory per tokenizer (scripts/mini_table4.sh)")
    table.add_argument("names", nargs="+", help="run directory names, in row order (e.g. mini-vae mini-rae mini-svae mini-psvae)")
    table.set_defaults(handler=run_tokenizer_table)

    shapes = actions.add_parser(
        "shapes", help="the Shapes suite: GenEval tags, dense-prompt questions, edits; scored exactly by the program judge"
    )
    shapes.add_argument("--model", help="pipeline directory (<run>/pipeline of unimm train)")
    shapes.add_argument(
        "--tokenizer",
        help="a tokenizer save_pretrained directory, for --suites ceiling / edit-ceiling without a generator (default: the model's)",
    )
    shapes.add_argument(
        "--suites", default="geneval,dpg",
        help="comma list of geneval, dpg, edit (edit needs a model trained for editing), ceiling (ShapesGenEval of true "
        "scenes as the judge reads them, and after the tokenizer's encode/decode: the best a generator can score), "
        "edit-ceiling (the same for ShapesEdit: the target scenes of the --edit-pairs pairs, and their round trips), "
        "binding (no sampling: the model's flow loss on true position / colour-binding scenes under the prompt against "
        "the prompt with its relation reversed or colours traded; a margin near 0 means the words are read as a bag)",
    )
    shapes.add_argument("--samples", type=int, default=4, help="images per GenEval prompt / DPG item (GenEval and DPG use 4)")
    shapes.add_argument("--tags", help="GenEval tags to keep (default: all six)")
    shapes.add_argument("--dpg-items", type=int, default=50, help="dense prompts in ShapesDPG")
    shapes.add_argument("--edit-pairs", type=int, default=70, help="edit pairs in ShapesEdit (balanced over the 7 tasks)")
    shapes.add_argument("--seed", type=int, default=0, help="seed of the first image of each prompt: image k uses seed + k (edit pair k too), so a check held out from the reported seed-0 run needs a start beyond its images, e.g. --seed 1000")
    shapes.add_argument("--steps", type=int, help="Euler steps (default: the pipeline's)")
    shapes.add_argument("--cfg", type=float, help="text guidance scale (default: the pipeline's)")
    shapes.add_argument("--image-cfg", type=float, help="editing: input-image guidance scale (default: the pipeline's)")
    shapes.add_argument("--shift", type=float, help="inference shift (default: the pipeline's)")
    shapes.add_argument("--batch-size", type=int, default=32)
    shapes.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    shapes.add_argument("--out", help="write scores, protocol and per-item details as JSON here")
    shapes.set_defaults(handler=run_shapes)


def run_shapes(args: argparse.Namespace) -> int:
    from eval.results import markdown_table, write_results
    from eval.shapes_generation import evaluate_geneval, evaluate_geneval_ceilings, load_prompts
    from eval.shapes_suite import evaluate_shapes_dpg, evaluate_shapes_edit, evaluate_shapes_edit_ceilings
    from unimm.errors import UserError
    from unimm.pipeline import UnimmPipeline

    suites = [suite for suite in args.suites.split(",") if suite]
    unknown = [suite for suite in suites if suite not in SUITES]
    if unknown or not suites:
        raise UserError(f"unknown suite(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(SUITES)}")
    if args.samples < 1 or args.dpg_items < 1 or args.edit_pairs < 1:
        raise UserError("--samples, --dpg-items and --edit-pairs must be at least 1")
    ceilings = [suite for suite in suites if suite in ("ceiling", "edit-ceiling")]
    generating = [suite for suite in suites if suite not in ceilings]
    if generating and not args.model:
        raise UserError(f"--suites {','.join(generating)} needs --model <pipeline directory>")
    if ceilings and not (args.model or args.tokenizer):
        raise UserError(f"--suites {','.join(ceilings)} needs --tokenizer <tokenizer directory> or --model <pipeline directory>")
    tags = [tag for tag in (args.tags or "").split(",") if tag] or None
    prompts = load_prompts(None, tags) if {"geneval", "ceiling", "binding"} & set(suites) else []
    pipeline = UnimmPipeline.from_pretrained(args.model, device=args.device) if args.model else None
    sampling = {key: value for key, value in (("steps", args.steps), ("cfg", args.cfg), ("shift", args.shift)) if value is not None}
    scores, details, rows = {}, {}, []
    if "geneval" in suites:
        result = evaluate_geneval(pipeline, prompts, args.samples, args.seed, args.batch_size, **sampling)
        scores["shapes_geneval"] = result["overall"]
        scores["shapes_geneval_by_tag"] = result["by_tag"]
        details["geneval"] = result["records"]
        rows += [("ShapesGenEval", tag, value) for tag, value in result["by_tag"].items()] + [("ShapesGenEval", "overall", result["overall"])]
    if "dpg" in suites:
        result = evaluate_shapes_dpg(pipeline, args.dpg_items, args.samples, args.seed, batch_size=args.batch_size, **sampling)
        scores["shapes_dpg"] = result["score"]
        scores["shapes_dpg_by_category"] = result["by_category"]
        details["dpg"] = result["item_scores"]
        rows += [("ShapesDPG", category, value) for category, value in result["by_category"].items()] + [("ShapesDPG", "overall", result["score"])]
    if "edit" in suites:
        edit_sampling = dict(sampling, **({"image_cfg": args.image_cfg} if args.image_cfg is not None else {}))
        result = evaluate_shapes_edit(pipeline, args.edit_pairs, args.seed, batch_size=args.batch_size, **edit_sampling)
        scores["shapes_edit_adherence"] = result["adherence"]
        scores["shapes_edit_adherence_by_task"] = result["adherence_by_task"]
        scores["shapes_edit_consistency_psnr"] = result["consistency_psnr"]
        rows += [("ShapesEdit adherence", task, value) for task, value in result["adherence_by_task"].items()]
        rows += [("ShapesEdit adherence", "overall", result["adherence"]), ("ShapesEdit consistency (dB)", "overall", result["consistency_psnr"])]
    if "binding" in suites:
        from eval.shapes_binding import evaluate_binding

        try:
            result = evaluate_binding(pipeline, prompts, args.samples, args.seed, batch_size=args.batch_size)
        except ValueError as error:
            raise UserError(f"--suites binding: {error}; keep the position or color_attr tags") from None
        scores["shapes_binding"] = result
        for tag, outcome in result.items():
            rows.append((f"binding: prefers the prompt over its negative ({outcome['scenes']} scenes)", tag, outcome["prefers_prompt"]))
            rows.append(("binding response: prediction change, negative / empty caption", tag, outcome["binding_response"]))
            rows += [(f"binding at t={t}: margin L(negative) - L(prompt); caption gain L(empty) - L(prompt); response", tag,
                      f"{values['margin']:+.5f}; {values['caption_gain']:+.5f}; {values['binding_response']:.4f}")
                     for t, values in outcome["by_t"].items()]
    if ceilings:
        from unimm.cli.eval_command import _load_tokenizer  # here: eval_command imports this module

        if args.tokenizer:
            tokenizer = _load_tokenizer(args.tokenizer)
            tokenizer = tokenizer.to(args.device) if args.device else tokenizer
        else:
            tokenizer = pipeline.image_tokenizer
    if "ceiling" in suites:
        result = evaluate_geneval_ceilings(tokenizer, prompts, args.samples, args.seed, args.batch_size)
        for reader, outcome in result.items():
            scores[f"shapes_geneval_ceiling_{reader}"] = outcome["overall"]
            scores[f"shapes_geneval_ceiling_{reader}_by_tag"] = outcome["by_tag"]
            details[f"ceiling_{reader}"] = outcome["records"]
            label = "ceiling: true scenes" if reader == "judge" else "ceiling: true scenes through the tokenizer"
            rows += [(label, tag, value) for tag, value in outcome["by_tag"].items()] + [(label, "overall", outcome["overall"])]
    if "edit-ceiling" in suites:
        result = evaluate_shapes_edit_ceilings(tokenizer, args.edit_pairs, batch_size=args.batch_size)
        for reader, outcome in result.items():
            scores[f"shapes_edit_ceiling_{reader}_adherence"] = outcome["adherence"]
            scores[f"shapes_edit_ceiling_{reader}_adherence_by_task"] = outcome["adherence_by_task"]
            scores[f"shapes_edit_ceiling_{reader}_consistency_psnr"] = outcome["consistency_psnr"]
            label = "edit ceiling: target scenes" if reader == "judge" else "edit ceiling: target scenes through the tokenizer"
            rows += [(f"{label}, adherence", task, value) for task, value in outcome["adherence_by_task"].items()]
            rows += [(f"{label}, adherence", "overall", outcome["adherence"]),
                     (f"{label}, consistency (dB)", "overall", outcome["consistency_psnr"])]
    print(markdown_table(("suite", "tag / category / task", "score"), rows))
    if args.out:
        sampler = pipeline.sampling if pipeline is not None else None
        protocol = {
            "judge": "Shapes program judge (data.shapes.judge)",
            "model": args.model,
            "tokenizer": args.tokenizer,
            "resolution": (pipeline.image_tokenizer if pipeline is not None else tokenizer).config.image_size,
            "steps": sampling.get("steps", sampler.steps) if sampler else None,
            "cfg": sampling.get("cfg", sampler.cfg) if sampler else None,
            "image_cfg": (args.image_cfg if args.image_cfg is not None else sampler.image_cfg) if sampler else None,
            "shift": sampling.get("shift", sampler.shift) if sampler else None,
            "seed": args.seed,
            "samples": args.samples,
            "suites": suites,
            "dpg_items": args.dpg_items,
            "edit_pairs": args.edit_pairs,
            "prompt_sets": "built-in Shapes GenEval prompts (seed 0), dpg_questions(seed 0), shapes_edit_pairs(seed 0)",
        }
        write_results(args.out, scores, protocol, details)
    return 0


def run_tokenizer_table(args: argparse.Namespace) -> int:
    from pathlib import Path

    from eval.tokenizer_comparison import comparison_table
    from unimm.errors import UserError

    if not Path(args.root).is_dir():
        raise UserError(f"--root {args.root} is not a directory; run scripts/mini_table4.sh first")
    print(comparison_table(args.root, args.names))
    return 0

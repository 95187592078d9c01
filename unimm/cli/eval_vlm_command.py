"""``unimm eval dpg | gedit | editreward``: benchmarks judged by vision-language models.

Each action generates with a unimm pipeline (``--model``) and/or scores what is on disk, and writes one JSON
result file (``eval.results.write_results``: scores + a ``protocol`` block with the judge, the prompt/data
file hashes, resolution, steps, cfg, seed and flags) and prints a Markdown summary.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import Any

from unimm.errors import UserError

JUDGE_HELP = """judges: --judge transformers --judge-model DIR_OR_HUB_ID runs a local VLM (Qwen2.5-VL via transformers,
greedy); --judge openai --judge-model NAME --judge-url http://HOST:PORT/v1 calls an OpenAI-compatible
/chat/completions server (vLLM, SGLang, OpenAI; API key read from the variable named by --judge-api-key-env)."""


def register_actions(actions) -> None:
    formatter = argparse.RawDescriptionHelpFormatter

    dpg = actions.add_parser(
        "dpg", help="DPG-Bench: generate 2x2 grids per dense prompt and/or score them with a yes/no VQA judge",
        formatter_class=formatter,
        description="DPG-Bench. With --model: generate the missing <item_id>.png grids (4 images, seeds seed..seed+3) into\n"
                    "--images, then score them (unless --no-score). Without --model: score the grids already in --images.\n"
                    "Score = 100 x mean over items; a question scores 0 when a parent question failed; missing images,\n"
                    "unparsed answers and judge errors score 0 and are counted.\n\n" + JUDGE_HELP,
    )
    dpg.add_argument("--images", required=True, help="directory of <item_id>.png 2x2 grids (written by --model, read for scoring)")
    dpg.add_argument("--questions", help="DPG-Bench question CSV (dpg_bench.csv format); required for scoring")
    dpg.add_argument("--prompts", help="prompts for generation: a directory of <item_id>.txt files or a question CSV (default: --questions)")
    dpg.add_argument("--model", help="pipeline directory (<run>/pipeline of unimm train): generate before scoring")
    dpg.add_argument("--no-score", action="store_true", help="only generate")
    dpg.add_argument("--resolution", type=int, help="tile size in pixels (generation: image size, default the pipeline's; "
                                                    "scoring: default the generation manifest's, else half the grid width)")
    dpg.add_argument("--tiles", type=int, default=4, help="tiles of each grid to score, official order TL, TR, BL, BR (default 4)")
    _add_sampling_arguments(dpg, image_cfg=False)
    dpg.add_argument("--limit", type=int, help="only the first N prompts (smoke runs; recorded in the results)")
    dpg.add_argument("--overwrite", action="store_true", help="regenerate grids that already exist")
    _add_judge_arguments(dpg, max_new_tokens=16)
    dpg.add_argument("--out", help="result JSON (default: <images>/dpg_results.json)")
    dpg.set_defaults(handler=run_dpg)

    gedit = actions.add_parser(
        "gedit", help="GEdit-Bench: generate edits in the official layout and/or score them with VIEScore",
        formatter_class=formatter,
        description="GEdit-Bench. With --model: write <root>/fullset/<task_type>/<lang>/<key>.png (+ <key>_SRCIMG.png)\n"
                    "for every selected row, then score (unless --no-score). Without --model: score what is under --root.\n"
                    "VIEScore: SC = min(success, overediting), PQ = min(naturalness, artifacts), O = sqrt(SC*PQ); per\n"
                    "task type then averaged over task types, per language, full set and Intersection_exist subset.\n"
                    "An unparseable answer is asked again --retries times, then the item fails and scores 0 (counted).\n\n"
                    + JUDGE_HELP,
    )
    gedit.add_argument("--data", required=True, nargs="+", help="GEdit-Bench parquet files, a directory holding them, or a datasets save_to_disk directory")
    gedit.add_argument("--root", required=True, help="output root of the official layout (results/<model>)")
    gedit.add_argument("--model", help="pipeline directory of an editing run: generate before scoring")
    gedit.add_argument("--no-score", action="store_true", help="only generate")
    gedit.add_argument("--languages", default="en,cn", help="comma list of en, cn (default both)")
    gedit.add_argument("--task-types", default="all", help="all (11), psvae (the 8 PS-VAE reports) or a comma list")
    gedit.add_argument("--limit", type=int, help="only the first N selected rows (smoke runs; recorded in the results)")
    gedit.add_argument("--fit", choices=("squash", "crop"), default="squash",
                       help="pipeline input: squash = resize to its square size (default), crop = its own center crop")
    _add_sampling_arguments(gedit, image_cfg=True)
    gedit.add_argument("--overwrite", action="store_true", help="regenerate edits that already exist")
    gedit.add_argument("--retries", type=int, default=2, help="re-asks of an unparseable VIEScore answer before the item fails (default 2)")
    _add_judge_arguments(gedit, max_new_tokens=512)
    gedit.add_argument("--out", help="result JSON (default: <root>/gedit_results.json)")
    gedit.set_defaults(handler=run_gedit)

    reward = actions.add_parser(
        "editreward", help="EditReward: score (instruction, source, edited) triples with TIGER-Lab's reward model",
        formatter_class=formatter,
        description="EditReward (Qwen2.5-VL + <|Reward|> token + two MLP heads; score = mean of the heads' predicted means).\n"
                    "--checkpoint holds model.safetensors or model.pth (the full state_dict); config and processor come\n"
                    "from --base (default: the checkpoint directory). Inputs: --triples JSONL ({instruction, source, edited}\n"
                    "paths) or a GEdit-Bench layout (--gedit-root with --data). Unreadable images are counted as failures.",
    )
    reward.add_argument("--checkpoint", required=True, help="directory with model.safetensors or model.pth")
    reward.add_argument("--base", help="base Qwen2.5-VL directory or hub id for config and processor (default: --checkpoint)")
    inputs = reward.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--triples", help="JSONL of {instruction, source, edited[, id]}; paths relative to the file")
    inputs.add_argument("--gedit-root", help="a GEdit-Bench output root (<root>/fullset/...); needs --data")
    reward.add_argument("--data", nargs="+", help="GEdit-Bench rows for --gedit-root (instructions and keys)")
    reward.add_argument("--languages", default="en,cn", help="with --gedit-root: comma list of en, cn")
    reward.add_argument("--task-types", default="all", help="with --gedit-root: all, psvae or a comma list")
    reward.add_argument("--limit", type=int, help="only the first N triples")
    reward.add_argument("--image-pixels", type=int, default=256 * 28 * 28, help="pixels per image after resizing (EditReward: 200704)")
    reward.add_argument("--batch-size", type=int, default=4)
    reward.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    reward.add_argument("--dtype", default="auto", help="backbone dtype: auto (bfloat16 on GPU, else float32), float32, bfloat16")
    reward.add_argument("--out", help="write the results JSON here")
    reward.set_defaults(handler=run_editreward)


def _add_sampling_arguments(parser, image_cfg: bool) -> None:
    group = parser.add_argument_group("generation (with --model)")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--steps", type=int, help="Euler steps (default: the pipeline's)")
    group.add_argument("--cfg", type=float, help="text guidance scale (default: the pipeline's)")
    if image_cfg:
        group.add_argument("--image-cfg", type=float, help="image guidance scale (default: the pipeline's)")
    group.add_argument("--shift", type=float, help="inference shift (default: the pipeline's)")
    group.add_argument("--batch-size", type=int, default=8, help="images per pipeline call")
    group.add_argument("--device", help="pipeline device (default: cuda when available)")


def _add_judge_arguments(parser, max_new_tokens: int) -> None:
    group = parser.add_argument_group("judge (for scoring)")
    group.add_argument("--judge", choices=("transformers", "openai"), default="transformers", help="judge backend (default transformers)")
    group.add_argument("--judge-model", help="transformers: directory or hub id (e.g. Qwen/Qwen2.5-VL-72B-Instruct); openai: served model name")
    group.add_argument("--judge-url", help="openai: server base URL, e.g. http://localhost:8000/v1")
    group.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key (default OPENAI_API_KEY)")
    group.add_argument("--judge-device", default="auto", help="transformers: auto, cpu, cuda, cuda:N")
    group.add_argument("--judge-dtype", default="auto", help="transformers: auto (bfloat16 on GPU), float32, bfloat16, float16")
    group.add_argument("--judge-batch-size", type=int, default=8, help="transformers: requests per generate call")
    group.add_argument("--judge-workers", type=int, default=8, help="openai: concurrent requests")
    group.add_argument("--judge-timeout", type=float, default=120.0, help="openai: seconds per request")
    group.add_argument("--judge-retries", type=int, default=3, help="openai: retries of a failed request")
    group.add_argument("--judge-max-new-tokens", type=int, default=max_new_tokens, help=f"answer length limit (default {max_new_tokens})")


# ----------------------------------------------------------------------------------------------------
# shared pieces
# ----------------------------------------------------------------------------------------------------
def _check_positive(**values) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def _build_judge(args):
    from eval.judges import build_judge

    if not args.judge_model:
        raise UserError("scoring needs --judge-model (a VLM directory/hub id, or the served model name with --judge openai); or pass --no-score")
    _check_positive(judge_batch_size=args.judge_batch_size, judge_workers=args.judge_workers, judge_max_new_tokens=args.judge_max_new_tokens)
    return build_judge(args.judge, args.judge_model, url=args.judge_url, api_key_env=args.judge_api_key_env, device=args.judge_device,
                       dtype=args.judge_dtype, batch_size=args.judge_batch_size, timeout=args.judge_timeout, retries=args.judge_retries,
                       workers=args.judge_workers)


def _load_pipeline(args):
    from unimm.pipeline import UnimmPipeline

    return UnimmPipeline.from_pretrained(args.model, device=args.device)


def _sampling_record(pipeline, args, image_cfg: bool) -> dict[str, Any]:
    """The sampling settings actually used (flags, else the pipeline's defaults)."""
    defaults = pipeline.sampling
    record = {
        "model": str(args.model),
        "steps": args.steps or defaults.steps,
        "cfg": defaults.cfg if args.cfg is None else args.cfg,
        "shift": defaults.shift if args.shift is None else args.shift,
        "seed": args.seed,
    }
    if image_cfg:
        record["image_cfg"] = defaults.image_cfg if args.image_cfg is None else args.image_cfg
    return record


def sources_sha256(paths: list[str]) -> str:
    """One SHA-256 over the files of ``paths`` (files, directories, globs), in sorted path order."""
    import glob

    from eval.results import file_sha256

    files: list[Path] = []
    for name in paths:
        path = Path(name).expanduser()
        if path.is_dir():
            files.extend(file for file in path.rglob("*") if file.is_file() and not file.name.endswith(".lock"))
        elif path.is_file():
            files.append(path)
        else:
            files.extend(Path(match) for match in glob.glob(str(path)) if Path(match).is_file())
    digest = hashlib.sha256()
    for file in sorted(set(files)):
        digest.update(f"{file.name}:{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def _split(text: str, allowed: tuple[str, ...] | None, flag: str) -> list[str]:
    items = list(dict.fromkeys(item.strip() for item in text.split(",") if item.strip()))
    if not items or (allowed and any(item not in allowed for item in items)):
        raise UserError(f"{flag} takes a comma list of {', '.join(allowed or ('names',))}; got '{text}'")
    return items


def _task_types(text: str) -> list[str] | None:
    from eval.gedit import PSVAE_TASK_TYPES

    if text.strip() == "all":
        return None
    if text.strip() == "psvae":
        return list(PSVAE_TASK_TYPES)
    return _split(text, None, "--task-types")


def _finish(out: str | Path, scores: dict, protocol: dict, details: Any, table: str) -> None:
    from eval.results import write_results

    path = write_results(out, scores, protocol, details)
    print(table)
    print(f"wrote {path}", file=sys.stderr)


def _fmt(value: Any) -> Any:
    return "-" if value is None else value


# ----------------------------------------------------------------------------------------------------
# dpg
# ----------------------------------------------------------------------------------------------------
def run_dpg(args: argparse.Namespace) -> int:
    from eval.dpg import (
        ANSWER_TOKENS,
        QUESTION_SUFFIX,
        generate_dpg_images,
        prompts_fingerprint,
        read_manifest,
        read_prompts,
        read_questions,
        write_manifest,
    )
    from eval.results import file_sha256, markdown_table

    _check_positive(limit=args.limit, resolution=args.resolution, batch_size=args.batch_size)
    if not 1 <= args.tiles <= 4:
        raise UserError(f"--tiles must be 1..4, got {args.tiles}")
    if args.no_score and not args.model:
        raise UserError("--no-score without --model does nothing; pass --model to generate")
    scoring = not args.no_score
    if scoring and not args.questions:
        raise UserError("scoring needs --questions (the DPG-Bench question CSV)")
    items = read_questions(args.questions) if args.questions else None
    if items is not None and args.limit:
        items = items[:args.limit]
    images_dir = Path(args.images)

    if args.model:
        prompt_source = args.prompts or args.questions
        if not prompt_source:
            raise UserError("generation needs --prompts (a directory of <item_id>.txt files or a question CSV) or --questions")
        prompts = read_prompts(prompt_source)
        if items is not None:
            missing = [item.item_id for item in items if item.item_id not in prompts]
            if missing:
                raise UserError(f"{len(missing)} question item(s) have no prompt in {prompt_source} (first: {missing[0]})")
            prompts = {item.item_id: prompts[item.item_id] for item in items}
        elif args.limit:
            prompts = dict(list(prompts.items())[:args.limit])
        pipeline = _load_pipeline(args)
        resolution = args.resolution or int(pipeline.image_tokenizer.config.image_size)
        report = generate_dpg_images(pipeline, prompts, images_dir, seed=args.seed, batch_size=args.batch_size, resolution=resolution,
                                     steps=args.steps, cfg=args.cfg, shift=args.shift, overwrite=args.overwrite)
        manifest = {"benchmark": "DPG-Bench", **_sampling_record(pipeline, args, image_cfg=False), "resolution": resolution,
                    "grid": "2x2, tiles TL TR BL BR = seeds seed..seed+3", "seeds": report["seeds"], "prompts": str(prompt_source),
                    "prompts_sha256": prompts_fingerprint(prompt_source), "prompts_count": len(prompts), "limit": args.limit}
        write_manifest(images_dir, manifest)
        print(f"generated {report['generated']} grids, kept {report['kept']} existing, in {images_dir}", file=sys.stderr)
        del pipeline
    if not scoring:
        return 0
    if not images_dir.is_dir():
        raise UserError(f"image directory '{images_dir}' does not exist; generate with --model or pass the directory of <item_id>.png grids")

    from eval.dpg import score_dpg

    manifest = read_manifest(images_dir)
    resolution = args.resolution or (manifest or {}).get("resolution")
    judge = _build_judge(args)
    result = score_dpg(judge, items, images_dir, resolution=resolution, tiles=args.tiles,
                       max_new_tokens=args.judge_max_new_tokens or ANSWER_TOKENS)
    scores = {**result["scores"], "failures": result["failures"]}
    generation = manifest or {}
    protocol = {
        "benchmark": "DPG-Bench",
        "judge": judge.describe(),
        "questions": str(args.questions),
        "questions_sha256": file_sha256(args.questions),
        "prompts_sha256": generation.get("prompts_sha256"),
        "images": str(images_dir),
        "resolution": resolution or "half the grid width",
        "tiles": args.tiles,
        "steps": generation.get("steps"),
        "cfg": generation.get("cfg"),
        "shift": generation.get("shift"),
        "seed": generation.get("seed"),
        "generation": manifest or "unknown (no generation.json in the image directory)",
        "limit": args.limit,
        "flags": {
            "question_suffix": QUESTION_SUFFIX,
            "answer_rule": "yes when the answer starts with yes (case/punctuation ignored); other answers are unparsed and score 0",
            "dependency_rule": "in file order, a question scores 0 when a parent scores 0 (cascading)",
            "failures": "missing/unreadable images, unparsed answers and judge errors score 0 and stay in the denominator",
            "categories": "per-question answers before the dependency rule, over all scored tiles",
            "max_new_tokens": args.judge_max_new_tokens,
        },
    }
    failures = result["failures"]
    table = markdown_table(
        ["DPG-Bench", "items", "scored items", "failed items", "unparsed answers", "judge errors"],
        [[scores["dpg_bench"], scores["items"], scores["items_scored"], failures["failed_items"], failures["unparsed_answers"], failures["judge_errors"]]],
    )
    if scores["l1"]:
        table += "\n\n" + markdown_table(["category", "score"], [[name, value] for name, value in scores["l1"].items()])
    _finish(args.out or images_dir / "dpg_results.json", scores, protocol, result["details"], table)
    return 0


# ----------------------------------------------------------------------------------------------------
# gedit
# ----------------------------------------------------------------------------------------------------
def run_gedit(args: argparse.Namespace) -> int:
    from eval.dpg import read_manifest, write_manifest
    from eval.gedit import LANGUAGES, PQ_PROMPT, SC_PROMPT_TEMPLATE, generate_gedit, read_gedit, score_gedit
    from eval.results import markdown_table

    _check_positive(limit=args.limit, batch_size=args.batch_size)
    if args.no_score and not args.model:
        raise UserError("--no-score without --model does nothing; pass --model to generate")
    if args.retries < 0:
        raise UserError(f"--retries must be >= 0, got {args.retries}")
    languages = _split(args.languages, LANGUAGES, "--languages")
    task_types = _task_types(args.task_types)
    root = Path(args.root)
    columns = ("input_image", "input_image_raw") if args.model else ("input_image",)
    items = read_gedit(args.data, languages, task_types, args.limit, image_columns=columns)
    data_sha256 = sources_sha256(args.data)

    if args.model:
        pipeline = _load_pipeline(args)
        input_size = int(pipeline.image_tokenizer.config.image_size)
        report = generate_gedit(pipeline, items, root, seed=args.seed, batch_size=args.batch_size, steps=args.steps, cfg=args.cfg,
                                image_cfg=args.image_cfg, shift=args.shift, fit=args.fit, input_size=input_size, overwrite=args.overwrite)
        manifest = {"benchmark": "GEdit-Bench", **_sampling_record(pipeline, args, image_cfg=True), "resolution": input_size,
                    "fit": args.fit, "input_column": report["input_column"], "seed_rule": report["seed_rule"],
                    "data_sha256": data_sha256, "languages": languages, "task_types": task_types or "all", "limit": args.limit}
        write_manifest(root, manifest)
        print(f"generated {report['generated']} edits, kept {report['kept']} existing, under {root}", file=sys.stderr)
        del pipeline
    if args.no_score:
        return 0

    manifest = read_manifest(root) or {}
    judge = _build_judge(args)
    result = score_gedit(judge, items, root, retries=args.retries, max_new_tokens=args.judge_max_new_tokens)
    scores = {**result["scores"], "failures": result["failures"], "items": len(items)}
    protocol = {
        "benchmark": "GEdit-Bench",
        "judge": judge.describe(),
        "data": [str(path) for path in args.data],
        "data_sha256": data_sha256,
        "root": str(root),
        "languages": languages,
        "task_types": task_types or "all",
        "limit": args.limit,
        "resolution": manifest.get("resolution"),
        "steps": manifest.get("steps"),
        "cfg": manifest.get("cfg"),
        "image_cfg": manifest.get("image_cfg"),
        "shift": manifest.get("shift"),
        "seed": manifest.get("seed"),
        "generation": manifest or "unknown (no generation.json under the root)",
        "flags": {
            "metric": "VIEScore tie 0-shot: SC = min(success, overediting), PQ = min(naturalness, artifacts), O = sqrt(SC*PQ), 0..10",
            "prompts_sha256": hashlib.sha256((SC_PROMPT_TEMPLATE + "\0" + PQ_PROMPT).encode()).hexdigest(),
            "aggregation": "per language: mean per task type, then the plain average over task types; fullset and Intersection_exist subset",
            "edited_resize": "edited image resized to the source image's size before judging",
            "retries": args.retries,
            "failures": "unparseable after retries, judge errors, missing/unreadable images: SC=PQ=O=0, counted, never dropped or guessed",
            "max_new_tokens": args.judge_max_new_tokens,
        },
    }
    rows = []
    for language, subsets in result["scores"].items():
        for subset, block in subsets.items():
            if block["average"] is None:
                continue
            count = sum(task["n"] for task in block["tasks"].values())
            failed = sum(task["failed"] for task in block["tasks"].values())
            rows.append([language, subset, block["average"]["SC"], block["average"]["PQ"], block["average"]["O"], count, failed])
    table = markdown_table(["language", "subset", "SC", "PQ", "O", "items", "failed"], rows)
    task_rows = [[language, task, values["SC"], values["PQ"], values["O"], values["n"]]
                 for language, subsets in result["scores"].items() for task, values in subsets["fullset"]["tasks"].items()]
    if task_rows:
        table += "\n\n" + markdown_table(["language", "task type", "SC", "PQ", "O", "items"], task_rows)
    _finish(args.out or root / "gedit_results.json", scores, protocol, result["details"], table)
    return 0


# ----------------------------------------------------------------------------------------------------
# editreward
# ----------------------------------------------------------------------------------------------------
def run_editreward(args: argparse.Namespace) -> int:
    from eval.editreward import EditRewardScorer, read_triples, score_triples
    from eval.results import file_sha256, markdown_table

    _check_positive(limit=args.limit, batch_size=args.batch_size)
    if args.triples:
        rows = read_triples(args.triples)
        inputs = {"triples": str(args.triples), "triples_sha256": file_sha256(args.triples), "generation": "unknown (triples scored as given)",
                  "steps": None, "cfg": None, "image_cfg": None, "shift": None, "seed": None}
    else:
        from eval.gedit import LANGUAGES, output_paths, read_gedit

        if not args.data:
            raise UserError("--gedit-root needs --data (the GEdit-Bench rows: instructions and keys)")
        items = read_gedit(args.data, _split(args.languages, LANGUAGES, "--languages"), _task_types(args.task_types), args.limit)
        rows = []
        for item in items:
            source, edited = output_paths(args.gedit_root, item)
            row = {"id": f"{item.language}/{item.key}", "key": item.key, "task_type": item.task_type, "language": item.language,
                   "instruction": item.instruction, "source": str(source), "edited": str(edited)}
            if not source.is_file():
                row["source_image"] = item.image("input_image")
            rows.append(row)
        from eval.dpg import read_manifest

        generation = read_manifest(args.gedit_root)
        inputs = {"gedit_root": str(args.gedit_root), "data_sha256": sources_sha256(args.data),
                  "generation": generation or "unknown (no generation.json under the root)"}
        inputs.update({key: (generation or {}).get(key) for key in ("steps", "cfg", "image_cfg", "shift", "seed")})
    if args.limit:
        rows = rows[:args.limit]
    scorer = EditRewardScorer.from_checkpoint(args.checkpoint, args.base, device=args.device, dtype=args.dtype,
                                              image_pixels=args.image_pixels, batch_size=args.batch_size)
    result = score_triples(scorer, rows)
    scores = {**result["scores"], "failures": result["failures"]}
    by_language: dict[str, list[float]] = {}
    for record in result["details"]:
        if record.get("status") == "ok" and "language" in record:
            by_language.setdefault(record["language"], []).append(record["score"])
    if by_language:
        scores["by_language"] = {language: sum(values) / len(values) for language, values in by_language.items()}
    protocol = {
        "benchmark": "EditReward",
        "judge": scorer.describe(),
        **inputs,
        "resolution": f"{args.image_pixels} pixels per image (smart_resize, factor 28, bicubic)",
        "limit": args.limit,
        "flags": {"failures": "missing/unreadable images are counted and left out of the mean (an unbounded reward has no neutral value)"},
    }
    table = markdown_table(["triples", "scored", "failed", "mean EditReward"],
                           [[scores["triples"], scores["scored"], result["failures"]["failed"], _fmt(scores["editreward_mean"])]])
    if args.out:
        _finish(args.out, scores, protocol, result["details"], table)
    else:
        print(table)
    return 0

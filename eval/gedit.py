"""GEdit-Bench (``stepfun-ai/GEdit-Bench``): generate the edits in the official layout and score them with VIEScore.

Data: the benchmark's rows (parquet files, a directory of them such as a hub snapshot, or a ``datasets``
``save_to_disk`` directory) with ``key, task_type, instruction, instruction_language, input_image,
input_image_raw, Intersection_exist``: 606 edits x {en, cn}, 11 task types.

Layout (Step1X-Edit's GEdit-Bench scripts): ``<root>/fullset/<task_type>/<language>/<key>.png`` is the edited
image and ``<key>_SRCIMG.png`` next to it the source (the row's ``input_image``).

VIEScore (the ``tie`` task, 0-shot prompts of TIGER-AI-Lab/VIEScore, as GEdit-Bench runs it): the judge sees
[source, edited] with the semantic-consistency prompt and answers ``{"score": [success, overediting]}``; it
sees the edited image alone with the perceptual-quality prompt and answers ``[naturalness, artifacts]``.
SC = min of the first pair, PQ = min of the second, O = sqrt(SC * PQ), each on 0..10. The edited image is
resized to the source's size before judging (as the official scorer does). Statistics (the official
``calculate_statistics.py``): per language, the mean of SC, PQ and O over the items of each task type, then
the plain average over task types; the same over the ``Intersection_exist`` subset.

Failures: the official scorer re-asks once and then *guesses a random score* when it cannot parse an answer,
and skips an item whose images are missing. Here an answer that does not hold exactly two numbers in 0..10 is
asked again ``retries`` times and then recorded as a failure; a failed item (unparseable answer, judge error,
missing or unreadable image) scores SC = PQ = O = 0 and is counted in ``failures`` -- never dropped, never
guessed.
"""

from __future__ import annotations

import glob
import io
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from unimm.errors import UserError

GEDIT_TASK_TYPES = (
    "background_change", "color_alter", "material_alter", "motion_change", "ps_human", "style_change",
    "subject-add", "subject-remove", "subject-replace", "text_change", "tone_transfer",
)
# The eight task types PS-VAE reports (its Table: background, color, material, style, subject add/remove/replace, tone).
PSVAE_TASK_TYPES = (
    "background_change", "color_alter", "material_alter", "style_change", "subject-add", "subject-remove",
    "subject-replace", "tone_transfer",
)
LANGUAGES = ("en", "cn")
METADATA_COLUMNS = ("key", "task_type", "instruction", "instruction_language")
IMAGE_COLUMNS = ("input_image", "input_image_raw")
SOURCE_SUFFIX = "_SRCIMG"
SCORE_TOKENS = 512  # the official Qwen2.5-VL backbone's max_new_tokens
DEFAULT_RETRIES = 2

# ----------------------------------------------------------------------------------------------------
# VIEScore prompts (TIGER-AI-Lab/VIEScore viescore/vie_prompts.py, verbatim: the 0-shot "tie" task)
# ----------------------------------------------------------------------------------------------------
_CONTEXT = (
    'You are a professional digital artist. You will have to evaluate the effectiveness of the AI-generated image(s) based on given rules.\n'
    'All the input images are AI-generated. All human in the images are AI-generated too. so you need not worry about the privacy confidentials.\n'
    '\n'
    'You will have to give your output in this way (Keep your reasoning concise and short.):\n'
    '{\n'
    '"score" : [...],\n'
    '"reasoning" : "..."\n'
    '}'
)

_TWO_IMAGE_EDIT_RULE = (
    'RULES:\n'
    '\n'
    'Two images will be provided: The first being the original AI-generated image and the second being an edited version of the first.\n'
    'The objective is to evaluate how successfully the editing instruction has been executed in the second image.\n'
    '\n'
    'Note that sometimes the two images might look identical due to the failure of image edit.\n'
)

_TIE_RULE_SC = (
    '\n'
    'From scale 0 to 10: \n'
    'A score from 0 to 10 will be given based on the success of the editing. (0 indicates that the scene in the edited image does not follow the editing instruction at all. 10 indicates that the scene in the edited image follow the editing instruction text perfectly.)\n'
    'A second score from 0 to 10 will rate the degree of overediting in the second image. (0 indicates that the scene in the edited image is completely different from the original. 10 indicates that the edited image can be recognized as a minimal edited yet effective version of original.)\n'
    "Put the score in a list such that output score = [score1, score2], where 'score1' evaluates the editing success and 'score2' evaluates the degree of overediting.\n"
    '\n'
    'Editing instruction: <instruction>\n'
)

_RULE_PQ = (
    'RULES:\n'
    '\n'
    'The image is an AI-generated image.\n'
    'The objective is to evaluate how successfully the image has been generated.\n'
    '\n'
    'From scale 0 to 10: \n'
    'A score from 0 to 10 will be given based on image naturalness. \n'
    '(\n'
    '    0 indicates that the scene in the image does not look natural at all or give a unnatural feeling such as wrong sense of distance, or wrong shadow, or wrong lighting. \n'
    '    10 indicates that the image looks natural.\n'
    ')\n'
    'A second score from 0 to 10 will rate the image artifacts. \n'
    '(\n'
    '    0 indicates that the image contains a large portion of distortion, or watermark, or scratches, or blurred faces, or unusual body parts, or subjects not harmonized. \n'
    '    10 indicates the image has no artifacts.\n'
    ')\n'
    'Put the score in a list such that output score = [naturalness, artifacts]\n'
)

SC_PROMPT_TEMPLATE = "\n".join([_CONTEXT, _TWO_IMAGE_EDIT_RULE, _TIE_RULE_SC])
PQ_PROMPT = "\n".join([_CONTEXT, _RULE_PQ])


def sc_prompt(instruction: str) -> str:
    """The semantic-consistency prompt for one instruction (asked with [source, edited])."""
    return SC_PROMPT_TEMPLATE.replace("<instruction>", instruction)


_DELIMITER = "||V^=^V||"
_SCORE_LIST = re.compile(r"""["']?score["']?\s*:\s*\[([^\]]*)\]""", re.IGNORECASE)


def parse_viescore(answer: str | None, expected: int = 2) -> list[float] | None:
    """The ``score`` list of a VIEScore answer, or ``None`` when it cannot be read.

    Accepts the JSON the prompt asks for, optionally between ``||V^=^V||`` delimiters or inside a Markdown
    code fence, and loose variants (unquoted keys, trailing text). The list must hold exactly ``expected``
    numbers, each in 0..10; anything else is unparseable (the caller re-asks, then records a failure)."""
    if not answer:
        return None
    text = answer
    if text.count(_DELIMITER) == 2:
        text = text.split(_DELIMITER)[1]
    values = None
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        try:
            parsed = json.loads(text[start:end + 1])
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict) and isinstance(parsed.get("score"), list):
            values = parsed["score"]
    if values is None:
        match = _SCORE_LIST.search(text)
        if match is None:
            return None
        try:
            values = [float(part) for part in match.group(1).split(",") if part.strip()]
        except ValueError:
            return None
    if len(values) != expected or not all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in values):
        return None
    numbers = [float(value) for value in values]
    if not all(0.0 <= value <= 10.0 for value in numbers):
        return None
    return numbers


def viescore(sc_scores: Sequence[float], pq_scores: Sequence[float]) -> dict[str, float]:
    """SC = min(success, overediting), PQ = min(naturalness, artifacts), O = sqrt(SC * PQ)."""
    sc, pq = min(sc_scores), min(pq_scores)
    return {"SC": sc, "PQ": pq, "O": math.sqrt(sc * pq)}


# ----------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------
@dataclass
class GEditItem:
    index: int  # row position in the benchmark file(s), before filtering (seeds use it)
    key: str
    task_type: str
    instruction: str
    language: str
    intersection_exist: bool
    images: dict[str, Any] = field(default_factory=dict, repr=False)  # column -> PIL image | bytes | {"bytes", "path"}

    def image(self, column: str = "input_image") -> Image.Image:
        """A source image column as RGB; ``input_image_raw`` falls back to ``input_image`` when absent."""
        value = self.images.get(column)
        if value is None and column == "input_image_raw":
            value = self.images.get("input_image")
        if value is None:
            raise KeyError(f"GEdit-Bench item {self.key} has no {column} (read with image_columns including it)")
        if isinstance(value, Image.Image):
            return value.convert("RGB")
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
            value = data if data is not None else path
        if isinstance(value, (bytes, bytearray)):
            with Image.open(io.BytesIO(value)) as image:
                return image.convert("RGB")
        with Image.open(value) as image:
            return image.convert("RGB")


def _parquet_files(sources: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            files.extend(sorted(path.rglob("*.parquet")))
        elif path.is_file():
            files.append(path)
        else:
            files.extend(Path(match) for match in sorted(glob.glob(str(path))))
    return files


def _rows_from_disk(directory: Path, columns: Sequence[str]) -> Iterable[dict]:
    import datasets

    loaded = datasets.load_from_disk(str(directory))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise UserError(f"{directory} holds splits {', '.join(loaded)}; GEdit-Bench's rows are in 'train'")
        loaded = loaded["train"]
    keep = [column for column in columns if column in loaded.column_names]
    loaded = loaded.select_columns(keep)
    for column in IMAGE_COLUMNS:  # keep the encoded bytes; decode one image at a time when it is used
        if column in keep and isinstance(loaded.features[column], datasets.Image):
            loaded = loaded.cast_column(column, datasets.Image(decode=False))
    yield from loaded


def _rows_from_parquet(files: Sequence[Path], columns: Sequence[str]) -> Iterable[dict]:
    import pyarrow.parquet as pq

    for file in files:
        handle = pq.ParquetFile(file)
        keep = [column for column in columns if column in handle.schema_arrow.names]
        for batch in handle.iter_batches(batch_size=64, columns=keep):
            yield from batch.to_pylist()


def read_gedit(sources: str | Sequence[str], languages: Sequence[str] | None = None, task_types: Sequence[str] | None = None,
               limit: int | None = None, image_columns: Sequence[str] = ("input_image",)) -> list[GEditItem]:
    """The benchmark rows, in file order, filtered by language and task type, at most ``limit`` of them.

    Only ``image_columns`` are kept in memory (``input_image`` for scoring; generation also reads
    ``input_image_raw``)."""
    sources = [sources] if isinstance(sources, (str, Path)) else list(sources)
    intersection_columns = ("Intersection_exist", "intersection_exist")
    columns = [*METADATA_COLUMNS, *intersection_columns, *image_columns]
    first = Path(sources[0]).expanduser() if sources else None
    if len(sources) == 1 and first.is_dir() and any((first / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
        rows = _rows_from_disk(first, columns)
        where = f"datasets directory {first}"
    else:
        files = _parquet_files(sources)
        if not files:
            raise UserError(f"no GEdit-Bench parquet files or datasets directory at {' '.join(map(str, sources))}; "
                            "pass the benchmark's parquet files, a directory holding them, or a save_to_disk directory")
        rows = _rows_from_parquet(files, columns)
        where = f"{len(files)} parquet file(s)"
    wanted_languages = set(languages) if languages else None
    wanted_tasks = set(task_types) if task_types else None
    seen_languages: set[str] = set()
    seen_tasks: set[str] = set()
    items: list[GEditItem] = []
    for index, row in enumerate(rows):
        missing = [column for column in METADATA_COLUMNS if row.get(column) is None]
        if missing:
            raise UserError(f"{where}: row {index} lacks {', '.join(missing)}; expected the GEdit-Bench columns "
                            f"{', '.join(METADATA_COLUMNS)}, Intersection_exist, input_image")
        language, task = str(row["instruction_language"]), str(row["task_type"])
        seen_languages.add(language)
        seen_tasks.add(task)
        if (wanted_languages and language not in wanted_languages) or (wanted_tasks and task not in wanted_tasks):
            continue
        if limit is not None and len(items) >= limit:
            continue
        intersection = next((row[name] for name in intersection_columns if row.get(name) is not None), False)
        items.append(GEditItem(index, str(row["key"]), task, str(row["instruction"]), language, bool(intersection),
                               {column: row.get(column) for column in image_columns if row.get(column) is not None}))
    for wanted, seen, flag in ((wanted_languages, seen_languages, "language"), (wanted_tasks, seen_tasks, "task type")):
        unknown = sorted((wanted or set()) - seen)
        if unknown:
            raise UserError(f"unknown {flag}(s) {', '.join(unknown)}; the benchmark has {', '.join(sorted(seen))}")
    if not items:
        raise UserError(f"{where}: no GEdit-Bench rows left after filtering")
    return items


def output_paths(root: str | Path, item: GEditItem) -> tuple[Path, Path]:
    """(source, edited) image paths of an item in the official layout."""
    directory = Path(root) / "fullset" / item.task_type / item.language
    return directory / f"{item.key}{SOURCE_SUFFIX}.png", directory / f"{item.key}.png"


# ----------------------------------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------------------------------
def _save_png(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    image.save(temporary, format="PNG")
    os.replace(temporary, path)


def generate_gedit(pipeline, items: Sequence[GEditItem], root: str | Path, *, seed: int = 0, batch_size: int = 4,
                   steps: int | None = None, cfg: float | None = None, image_cfg: float | None = None, shift: float | None = None,
                   fit: str = "squash", input_size: int | None = None, input_column: str = "input_image_raw",
                   overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Edit every item (seed = ``seed`` + the item's row index) and write ``<key>.png`` + ``<key>_SRCIMG.png``.

    The pipeline sees ``input_column`` (``input_image_raw``, as Step1X-Edit's example feeds the model; it falls
    back to ``input_image``). ``fit="squash"`` resizes it to the pipeline's square ``input_size`` first (the whole
    picture is edited, aspect ratio distorted); ``fit="crop"`` leaves the pipeline's own shorter-side resize and
    center crop (the border outside the crop is lost, which the judge sees as over-editing). The edited image is
    saved as the pipeline returns it; the scorer resizes it to the source's size. Existing edits are kept
    unless ``overwrite``."""
    from tqdm import tqdm

    if fit not in ("squash", "crop"):
        raise UserError(f"fit must be squash or crop, got '{fit}'")
    if fit == "squash" and not input_size:
        raise UserError("fit=squash needs the pipeline's input size")
    todo = [item for item in items if overwrite or not output_paths(root, item)[1].is_file()]
    sampling = {key: value for key, value in (("steps", steps), ("cfg", cfg), ("image_cfg", image_cfg), ("shift", shift)) if value is not None}
    with tqdm(total=len(todo), desc="gedit generate", unit="edit", disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            inputs = []
            for item in chunk:
                image = item.image(input_column)
                inputs.append(image.resize((input_size, input_size), Image.BICUBIC) if fit == "squash" else image)
            edited = pipeline.edit(inputs, [item.instruction for item in chunk], seed=[seed + item.index for item in chunk], **sampling)
            for item, image in zip(chunk, edited):
                source_path, edited_path = output_paths(root, item)
                _save_png(item.image("input_image"), source_path)
                _save_png(image, edited_path)
            bar.update(len(chunk))
    return {"generated": len(todo), "kept": len(items) - len(todo), "fit": fit, "input_column": input_column,
            "seed_rule": "seed + row index of the item in the benchmark file"}


# ----------------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------------
def _load_pair(root: Path, item: GEditItem) -> tuple[Image.Image, Image.Image] | str:
    source_path, edited_path = output_paths(root, item)
    if not edited_path.is_file():
        return "missing_image"
    try:
        if source_path.is_file():
            with Image.open(source_path) as image:
                source = image.convert("RGB")
        else:  # edits written by another tool: the benchmark's own input image is the source
            source = item.image("input_image")
        with Image.open(edited_path) as image:
            edited = image.convert("RGB").resize(source.size)
    except (OSError, ValueError, KeyError):
        return "unreadable_image"
    return source, edited


def _ask_until_parsed(judge, requests: list[tuple[Any, str]], retries: int, max_new_tokens: int, failures: dict) -> list[tuple[list[float] | None, list]]:
    """Ask every request; re-ask the unparsed ones up to ``retries`` times. Returns (scores or None, answers)."""
    from eval.judges import JudgeError

    results: list[tuple[list[float] | None, list]] = [(None, []) for _ in requests]
    pending = list(range(len(requests)))
    for _attempt in range(retries + 1):
        if not pending:
            break
        answers = judge.ask_many([requests[index] for index in pending], max_new_tokens=max_new_tokens)
        still = []
        for index, answer in zip(pending, answers):
            history = results[index][1]
            if isinstance(answer, JudgeError):
                failures["judge_errors"] += 1
                history.append({"error": str(answer)})
                still.append(index)
                continue
            history.append(answer)
            parsed = parse_viescore(answer)
            if parsed is None:
                failures["unparsed_answers"] += 1
                still.append(index)
            else:
                results[index] = (parsed, history)
        pending = still
    return results


def score_gedit(judge, items: Sequence[GEditItem], root: str | Path, *, retries: int = DEFAULT_RETRIES,
                max_new_tokens: int = SCORE_TOKENS, chunk_size: int = 8, progress: bool = True) -> dict[str, Any]:
    """VIEScore every item of ``items`` from the images under ``root``; returns ``{"scores", "failures", "details"}``.

    ``failures`` counts failed items by cause (``missing_image``, ``unreadable_image``, ``unparsed``: still
    unparseable after the retries, ``judge_error``) and every unparseable answer / judge error seen on the way
    (``unparsed_answers``, ``judge_errors``). Failed items score 0 and stay in every average."""
    from tqdm import tqdm

    if retries < 0:
        raise UserError(f"retries must be >= 0, got {retries}")
    root = Path(root)
    failures = {"missing_image": 0, "unreadable_image": 0, "unparsed": 0, "judge_error": 0, "unparsed_answers": 0, "judge_errors": 0}
    records: list[dict[str, Any]] = []
    with tqdm(total=len(items), desc="gedit score", unit="edit", disable=not progress) as bar:
        for start in range(0, len(items), chunk_size):
            chunk = items[start:start + chunk_size]
            pairs = [_load_pair(root, item) for item in chunk]
            ready = [(item, pair) for item, pair in zip(chunk, pairs) if not isinstance(pair, str)]
            requests = []
            for item, (source, edited) in ready:
                requests += [([source, edited], sc_prompt(item.instruction)), (edited, PQ_PROMPT)]
            results = _ask_until_parsed(judge, requests, retries, max_new_tokens, failures) if requests else []
            by_key = {id(item): (results[2 * n], results[2 * n + 1]) for n, (item, _) in enumerate(ready)}
            for item, pair in zip(chunk, pairs):
                record = {"key": item.key, "task_type": item.task_type, "language": item.language,
                          "intersection_exist": item.intersection_exist, "SC": 0.0, "PQ": 0.0, "O": 0.0}
                if isinstance(pair, str):
                    record["status"] = pair
                    failures[pair] += 1
                else:
                    (sc_scores, sc_answers), (pq_scores, pq_answers) = by_key[id(item)]
                    record["answers"] = {"SC": sc_answers, "PQ": pq_answers}
                    if sc_scores is None or pq_scores is None:
                        gave_up = [answers for scores, answers in ((sc_scores, sc_answers), (pq_scores, pq_answers)) if scores is None]
                        status = "judge_error" if all(isinstance(answer, dict) for answers in gave_up for answer in answers[-1:]) else "unparsed"
                        record["status"] = status
                        failures[status] += 1
                    else:
                        record.update(viescore(sc_scores, pq_scores), status="ok", sc_scores=sc_scores, pq_scores=pq_scores)
                records.append(record)
            bar.update(len(chunk))
    failures["failed_items"] = sum(failures[key] for key in ("missing_image", "unreadable_image", "unparsed", "judge_error"))
    return {"scores": aggregate(records), "failures": failures, "details": records}


def _ordered(values: Iterable[str], order: Sequence[str]) -> list[str]:
    values = set(values)
    return [value for value in order if value in values] + sorted(values - set(order))


def aggregate(records: Sequence[dict]) -> dict[str, Any]:
    """Per language, for the full set and the ``Intersection_exist`` subset: the mean SC, PQ and O of each task
    type (``n`` items, ``failed`` of them scored 0) and their plain average over the task types present."""
    result: dict[str, Any] = {}
    for language in _ordered((record["language"] for record in records), LANGUAGES):
        in_language = [record for record in records if record["language"] == language]
        result[language] = {}
        for subset, chosen in (("fullset", in_language), ("intersection", [r for r in in_language if r["intersection_exist"]])):
            tasks = {}
            for task in _ordered((record["task_type"] for record in chosen), GEDIT_TASK_TYPES):
                rows = [record for record in chosen if record["task_type"] == task]
                tasks[task] = {metric: sum(row[metric] for row in rows) / len(rows) for metric in ("SC", "PQ", "O")}
                tasks[task].update(n=len(rows), failed=sum(row.get("status") != "ok" for row in rows))
            average = {metric: sum(task[metric] for task in tasks.values()) / len(tasks) for metric in ("SC", "PQ", "O")} if tasks else None
            result[language][subset] = {"tasks": tasks, "average": average}
    return result

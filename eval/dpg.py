"""DPG-Bench: dense prompts, a 2x2 grid of four images per prompt, yes/no questions asked of every tile.

The protocol of ELLA's ``dpg_bench/compute_dpg_bench.py``:

* the question file is a CSV with the columns ``item_id, text, keywords, proposition_id, dependency,
  category_broad, category_detailed, tuple, question_natural_language`` (one row per question; ``dependency``
  is a comma list of parent proposition ids, ``0`` for none);
* the images are ``<item_id>.png``, one 2x2 grid per prompt; tile ``k`` of ``--tiles`` (the official
  ``PIC_NUM``, 4) is cropped in the order top-left, top-right, bottom-left, bottom-right at ``resolution``
  pixels per tile;
* every question is asked of every tile; an answer scores 1 when it is "yes"; then, walking the questions in
  file order, a question scores 0 when any of its parents scores 0 (parents already zeroed count, so a
  failure cascades down a chain); a tile scores the mean over its questions, an item the mean over its tiles;
* the DPG-Bench score is 100 x the mean over items; category scores (L1 = ``entity``, L2 = ``entity - whole``
  from the ``tuple`` column) average the per-question answers before the dependency rule, as the official
  script does.

Differences from the official script, all on purpose: the original judge is mPLUG-large answering free text
compared with ``== 'yes'``; here any ``VQAJudge`` answers, and ``parse_yes_no`` reads answers that start with
yes/no (case and punctuation ignored), anything else is *unparsed* and scores 0. The official script skips the
first data row of the CSV (``if i == 0: continue``) and drops an item whose image is missing or fails; here
every question is read, and a missing or unreadable image, an unparsed answer or a judge error scores 0 and
is counted under ``failures`` -- the denominator is always the number of items in the file (after
``limit``). The official category scores use the last tile only; here they use every scored tile.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from unimm.errors import UserError

DPG_CSV_COLUMNS = ("item_id", "text", "keywords", "proposition_id", "dependency", "category_broad", "category_detailed",
                   "tuple", "question_natural_language")
REQUIRED_COLUMNS = ("item_id", "proposition_id", "dependency", "question_natural_language")
GRID_SAMPLES = 4
QUESTION_SUFFIX = " Please answer yes or no."
ANSWER_TOKENS = 16
GENERATION_MANIFEST = "generation.json"


@dataclass(frozen=True)
class DPGQuestion:
    proposition_id: int
    question: str
    dependencies: tuple[int, ...]  # parent proposition ids (the file's 0 = "no parent" is dropped)
    category: str = ""  # L2, e.g. "entity - whole"

    @property
    def category_broad(self) -> str:  # L1, e.g. "entity"
        return self.category.split("-")[0].strip()


@dataclass
class DPGItem:
    item_id: str
    text: str
    questions: list[DPGQuestion] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------
def _category(row: Mapping[str, str]) -> str:
    tuple_text = (row.get("tuple") or "").strip()
    if tuple_text:
        return tuple_text.split("(")[0].strip()
    broad, detailed = (row.get("category_broad") or "").strip(), (row.get("category_detailed") or "").strip()
    return f"{broad} - {detailed}" if broad and detailed else broad


def read_questions(path: str | Path) -> list[DPGItem]:
    """The items of a DPG-Bench question CSV, in file order, each with its questions in file order.

    Every row is validated: integer proposition ids unique within an item, a ``dependency`` of integers
    naming questions of the same item (or 0). A bad row is a ``UserError`` naming its line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"question file '{path}' does not exist; pass DPG-Bench's dpg_bench.csv (or a file in its format)")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in REQUIRED_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{path} lacks the column(s) {', '.join(missing)}; expected the DPG-Bench columns {', '.join(DPG_CSV_COLUMNS)}")
        items: dict[str, DPGItem] = {}
        for line, row in enumerate(reader, start=2):
            item_id = (row["item_id"] or "").strip()
            if not item_id:
                raise UserError(f"{path} line {line}: empty item_id")
            try:
                proposition = int(str(row["proposition_id"]).strip())
                parents = tuple(int(part) for part in str(row["dependency"]).split(",") if part.strip())
            except ValueError:
                raise UserError(f"{path} line {line}: proposition_id and dependency must be integers "
                                f"(got {row['proposition_id']!r}, {row['dependency']!r})") from None
            item = items.setdefault(item_id, DPGItem(item_id, (row.get("text") or "").strip()))
            if any(question.proposition_id == proposition for question in item.questions):
                raise UserError(f"{path} line {line}: item {item_id} repeats proposition_id {proposition}")
            question = (row["question_natural_language"] or "").strip()
            if not question:
                raise UserError(f"{path} line {line}: empty question_natural_language")
            item.questions.append(DPGQuestion(proposition, question, tuple(p for p in parents if p != 0), _category(row)))
    if not items:
        raise UserError(f"{path} has no questions")
    for item in items.values():
        known = {question.proposition_id for question in item.questions}
        for question in item.questions:
            unknown = [parent for parent in question.dependencies if parent not in known]
            if unknown:
                raise UserError(f"{path}: item {item.item_id} question {question.proposition_id} depends on unknown proposition(s) "
                                f"{', '.join(map(str, unknown))}")
    return list(items.values())


def read_prompts(path: str | Path) -> dict[str, str]:
    """{item_id: prompt}: a directory of ``<item_id>.txt`` files (DPG-Bench's ``prompts/``) or a question CSV
    (its ``text`` column, first row of each item)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise UserError(f"prompt directory '{path}' has no <item_id>.txt files")
        return {file.stem: file.read_text(encoding="utf-8").strip() for file in files}
    if path.is_file():
        prompts = {item.item_id: item.text for item in read_questions(path)}
        empty = [item_id for item_id, text in prompts.items() if not text]
        if empty:
            raise UserError(f"{path}: item(s) {', '.join(empty[:5])} have no text; pass the prompt directory instead")
        return prompts
    raise UserError(f"prompts '{path}' is neither a directory of <item_id>.txt files nor a question CSV")


def prompts_fingerprint(path: str | Path) -> str:
    """SHA-256 of a prompt file, or of a prompt directory's (name, content) pairs in name order."""
    import hashlib

    from eval.results import file_sha256

    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(path.glob("*.txt")):
        digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------
# grids
# ----------------------------------------------------------------------------------------------------
def tile_boxes(resolution: int) -> list[tuple[int, int, int, int]]:
    """The official crop order: top-left, top-right, bottom-left, bottom-right."""
    r = resolution
    return [(0, 0, r, r), (r, 0, 2 * r, r), (0, r, r, 2 * r), (r, r, 2 * r, 2 * r)]


def make_grid(images: Sequence[Image.Image]) -> Image.Image:
    """Four equal square images -> one 2x2 grid (tiles in ``tile_boxes`` order)."""
    if len(images) != GRID_SAMPLES:
        raise ValueError(f"a DPG-Bench grid takes {GRID_SAMPLES} images, got {len(images)}")
    size = images[0].size
    if size[0] != size[1] or any(image.size != size for image in images):
        raise ValueError(f"grid images must be equal squares, got sizes {[image.size for image in images]}")
    grid = Image.new("RGB", (2 * size[0], 2 * size[0]))
    for image, box in zip(images, tile_boxes(size[0])):
        grid.paste(image.convert("RGB"), box[:2])
    return grid


def split_grid(grid: Image.Image, resolution: int | None = None, tiles: int = GRID_SAMPLES) -> list[Image.Image]:
    """The first ``tiles`` tiles of a grid; ``resolution`` defaults to half the grid's width."""
    resolution = resolution or grid.size[0] // 2
    if resolution < 1 or grid.size[0] < 2 * resolution or grid.size[1] < 2 * resolution:
        raise ValueError(f"a {grid.size[0]}x{grid.size[1]} image is not a 2x2 grid of {resolution} px tiles")
    return [grid.crop(box) for box in tile_boxes(resolution)[:tiles]]


def _save_png(image: Image.Image, path: Path) -> None:
    temporary = path.with_name(path.name + ".tmp")
    image.save(temporary, format="PNG")
    os.replace(temporary, path)


def generate_dpg_images(pipeline, prompts: Mapping[str, str], out_dir: str | Path, *, seed: int = 0, batch_size: int = 8,
                        resolution: int | None = None, steps: int | None = None, cfg: float | None = None,
                        shift: float | None = None, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Four images per prompt (seeds ``seed .. seed+3``, the same for every prompt), saved as the 2x2 grid
    ``<out_dir>/<item_id>.png``. Existing grids are kept unless ``overwrite`` (a run can be resumed)."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [item_id for item_id in prompts if overwrite or not (out_dir / f"{item_id}.png").is_file()]
    jobs = [(item_id, sample) for item_id in todo for sample in range(GRID_SAMPLES)]
    sampling = {key: value for key, value in (("steps", steps), ("cfg", cfg), ("shift", shift), ("size", resolution)) if value is not None}
    pending: dict[str, dict[int, Image.Image]] = defaultdict(dict)
    with tqdm(total=len(todo), desc="dpg generate", unit="prompt", disable=not progress) as bar:
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            images = pipeline([prompts[item_id] for item_id, _ in chunk], seed=[seed + sample for _, sample in chunk], **sampling)
            for (item_id, sample), image in zip(chunk, images):
                pending[item_id][sample] = image
                if len(pending[item_id]) == GRID_SAMPLES:
                    tiles = pending.pop(item_id)
                    _save_png(make_grid([tiles[k] for k in range(GRID_SAMPLES)]), out_dir / f"{item_id}.png")
                    bar.update(1)
    return {"generated": len(todo), "kept": len(prompts) - len(todo), "seeds": [seed + k for k in range(GRID_SAMPLES)]}


# ----------------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------------
def apply_dependencies(scores: Mapping[int, float], questions: Sequence[DPGQuestion]) -> dict[int, float]:
    """The dependency rule: walking ``questions`` in order, a question scores 0 when a parent scores 0.

    Scores already zeroed by this walk count, so a failed root zeroes a whole chain whose questions come after
    their parents (the official loop mutates the same dict it reads)."""
    final = dict(scores)
    for question in questions:
        if any(final[parent] == 0 for parent in question.dependencies):
            final[question.proposition_id] = 0.0
    return final


def score_answers(item: DPGItem, answers: Mapping[int, bool | None]) -> tuple[float, dict[int, float], dict[int, float]]:
    """(tile score, raw per-question scores, per-question scores after the dependency rule) for one tile.

    ``answers`` maps proposition id -> parsed yes (True) / no (False) / unparsed or failed (None -> 0)."""
    raw = {question.proposition_id: 1.0 if answers.get(question.proposition_id) is True else 0.0 for question in item.questions}
    final = apply_dependencies(raw, item.questions)
    return sum(final.values()) / len(final), raw, final


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def score_dpg(judge, items: Sequence[DPGItem], image_dir: str | Path, *, resolution: int | None = None, tiles: int = GRID_SAMPLES,
              question_suffix: str = QUESTION_SUFFIX, max_new_tokens: int = ANSWER_TOKENS, progress: bool = True) -> dict[str, Any]:
    """Ask every question of every tile of ``<image_dir>/<item_id>.png`` and apply the DPG-Bench rules.

    Returns ``{"scores", "failures", "details"}``: ``scores["dpg_bench"]`` is 100 x the mean item score over
    *all* ``items`` (a failed item scores 0), ``scores["l1"]``/``["l2"]`` the category scores (x100)."""
    from tqdm import tqdm

    from eval.judges import JudgeError, parse_yes_no

    if not 1 <= tiles <= GRID_SAMPLES:
        raise UserError(f"tiles must be 1..{GRID_SAMPLES}, got {tiles}")
    image_dir = Path(image_dir)
    failures = {"missing_image": 0, "unreadable_image": 0, "bad_image_size": 0, "unparsed_answers": 0, "judge_errors": 0}
    category_scores: dict[str, list[float]] = defaultdict(list)
    details, item_scores, questions_asked = [], [], 0
    for item in tqdm(items, desc="dpg score", unit="prompt", disable=not progress):
        record: dict[str, Any] = {"item_id": item.item_id, "score": 0.0, "status": "ok"}
        path = image_dir / f"{item.item_id}.png"
        crops = None
        if not path.is_file():
            record["status"] = "missing_image"
        else:
            try:
                with Image.open(path) as opened:
                    grid = opened.convert("RGB")
            except (OSError, ValueError):
                record["status"] = "unreadable_image"
            else:
                try:
                    crops = split_grid(grid, resolution, tiles)
                except ValueError as error:
                    record["status"], record["error"] = "bad_image_size", str(error)
        if crops is None:
            failures[record["status"]] += 1
            item_scores.append(0.0)
            details.append(record)
            continue
        requests = [(crop, question.question + question_suffix) for crop in crops for question in item.questions]
        answers = judge.ask_many(requests, max_new_tokens=max_new_tokens)
        questions_asked += len(requests)
        tile_scores, tile_answers = [], []
        count = len(item.questions)
        for tile in range(len(crops)):
            parsed: dict[int, bool | None] = {}
            texts = []
            for question, answer in zip(item.questions, answers[tile * count:(tile + 1) * count]):
                if isinstance(answer, JudgeError):
                    failures["judge_errors"] += 1
                    parsed[question.proposition_id] = None
                    texts.append(None)
                    continue
                value = parse_yes_no(answer)
                if value is None:
                    failures["unparsed_answers"] += 1
                parsed[question.proposition_id] = value
                texts.append(answer)
            score, raw, _final = score_answers(item, parsed)
            tile_scores.append(score)
            tile_answers.append(texts)
            for question in item.questions:
                category_scores[question.category].append(raw[question.proposition_id])
        record["score"] = sum(tile_scores) / len(tile_scores)
        record["tile_scores"] = tile_scores
        record["answers"] = tile_answers
        item_scores.append(record["score"])
        details.append(record)

    l1: dict[str, list[float]] = defaultdict(list)
    for category, values in category_scores.items():
        l1[category.split("-")[0].strip()].extend(values)
    failed_items = sum(failures[key] for key in ("missing_image", "unreadable_image", "bad_image_size"))
    scored = [record["score"] for record in details if record["status"] == "ok"]
    scores = {
        "dpg_bench": 100.0 * _mean(item_scores) if item_scores else math.nan,
        "items": len(items),
        "items_scored": len(items) - failed_items,
        "dpg_bench_scored_items_only": 100.0 * _mean(scored) if scored else None,
        "l1": {key: 100.0 * _mean(values) for key, values in sorted(l1.items())},
        "l2": {key: 100.0 * _mean(values) for key, values in sorted(category_scores.items())},
    }
    failures["failed_items"] = failed_items
    failures["questions_asked"] = questions_asked
    return {"scores": scores, "failures": failures, "details": details}


def read_manifest(directory: str | Path) -> dict | None:
    """The generation settings written next to generated images (``generation.json``), if any."""
    path = Path(directory) / GENERATION_MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def write_manifest(directory: str | Path, manifest: Mapping[str, Any]) -> Path:
    from unimm.atomic import atomic_write_text

    path = Path(directory) / GENERATION_MANIFEST
    atomic_write_text(path, json.dumps(dict(manifest), indent=1, default=str) + "\n")
    return path

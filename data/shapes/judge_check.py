"""Measure the program judge against ground truth on held-out renders (also what the tests assert).

An object counts as correct when a detection lies within 5% of the image side of its centre (one-to-one
Hungarian matching) with the right shape and colour; extra detections are counted as false positives.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy.optimize import linear_sum_assignment

from data.shapes.dataset import sample_rng
from data.shapes.judge import judge_image, score_spec
from data.shapes.prompts import geneval_prompts, scene_for_spec
from data.shapes.render import render_scene
from data.shapes.scene import sample_scene
from eval.geneval_rules import summarize


@dataclass(frozen=True)
class Condition:
    """How a held-out render is degraded before judging."""

    resolution: int
    render_resolution: int | None = None  # render here, then resize (bicubic) to ``resolution``
    jpeg_quality: int | None = None

    @property
    def name(self) -> str:
        parts = [f"{self.resolution}px"]
        if self.render_resolution:
            parts.append(f"resized from {self.render_resolution}px")
        if self.jpeg_quality:
            parts.append(f"JPEG q{self.jpeg_quality}")
        return ", ".join(parts)


DEFAULT_CONDITIONS = (
    Condition(64), Condition(64, jpeg_quality=75), Condition(256), Condition(256, jpeg_quality=75),
    Condition(64, render_resolution=256), Condition(64, render_resolution=256, jpeg_quality=75),
)


def degrade(image: Image.Image, condition: Condition) -> Image.Image:
    if condition.render_resolution:
        image = image.resize((condition.resolution, condition.resolution), Image.BICUBIC)
    if condition.jpeg_quality:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=condition.jpeg_quality)
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return image


@dataclass
class JudgeAccuracy:
    condition: str
    objects: int
    correct: int
    false_positives: int

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.objects, 1)


def _match(scene, detected, size: int) -> tuple[int, int, int]:
    """(objects, correctly found objects, false positives) for one image."""
    distances = np.array(
        [[np.hypot(o.x * size - d.center[0], o.y * size - d.center[1]) for d in detected] for o in scene.objects]
    ).reshape(len(scene.objects), len(detected))
    rows, cols = linear_sum_assignment(distances) if detected else ((), ())
    correct = sum(
        1
        for row, col in zip(rows, cols)
        if distances[row, col] < 0.05 * size
        and (scene.objects[row].shape, scene.objects[row].color) == (detected[col].shape, detected[col].color)
    )
    return len(scene.objects), correct, max(len(detected) - len(scene.objects), 0)


def object_accuracy(condition: Condition, num_scenes: int, seed: int = 0) -> JudgeAccuracy:
    objects = correct = false_positives = 0
    for index in range(num_scenes):
        scene = sample_scene(sample_rng(seed, "judge-check", index))
        image = degrade(render_scene(scene, condition.render_resolution or condition.resolution), condition)
        result = _match(scene, judge_image(image).objects, condition.resolution)
        objects, correct, false_positives = objects + result[0], correct + result[1], false_positives + result[2]
    return JudgeAccuracy(condition.name, objects, correct, false_positives)


def oracle_geneval(resolution: int = 64, seed: int = 0) -> dict[str, float]:
    """GenEval-format prompts laid out exactly (an ideal generator), scored by the judge: should be 1.0."""
    results = []
    for index, spec in enumerate(geneval_prompts(seed=seed)):
        scene = scene_for_spec(spec, sample_rng(seed, "judge-check", 10**6 + index))
        correct, _ = score_spec(render_scene(scene, resolution), spec)
        results.append({"tag": spec["tag"], "correct": correct})
    return summarize(results)


def oracle_dpg(num_items: int = 100, resolution: int = 64, seed: int = 0) -> dict[str, float]:
    """Each DPG-style question asked of its own scene's render: every answer should be "yes".

    Returns the fraction answered yes per broad category and overall; below 1.0 means a question
    or the judge is wrong."""
    from data.shapes.judge import answer_question
    from data.shapes.prompts import dpg_items, dpg_scenes

    answers: dict[str, list[bool]] = {}
    for item, scene in enumerate(dpg_scenes(num_items, seed)):
        judged = judge_image(render_scene(scene, resolution))
        for row in dpg_items(scene, f"shapes{item:04d}"):
            answers.setdefault(row["category_broad"], []).append(answer_question(judged, json.loads(row["program"])))
    scores = {category: float(np.mean(values)) for category, values in sorted(answers.items())}
    scores["all questions"] = float(np.mean([v for values in answers.values() for v in values]))
    return scores


def dataset_accuracy(shards: str, limit: int | None = None) -> JudgeAccuracy:
    """Judge the images of a written Shapes text-to-image split against the scene graphs stored with them.

    Reads the shards through the project's own index (the loader's path), so it also checks the data."""
    from data.config import DataConfig
    from data.index import ShardIndex
    from data.shapes.scene import Scene

    index = ShardIndex.build(DataConfig(format="webdataset", shards=[shards]))
    objects = correct = false_positives = 0
    resolution = None
    count = index.num_samples if limit is None else min(limit, index.num_samples)
    for sample_id in range(count):
        record = index.read_record(sample_id)
        image = Image.open(io.BytesIO(record["png"])).convert("RGB")
        resolution = image.size[0]
        scene = Scene.from_dict(json.loads(record["json"])["scene"])
        result = _match(scene, judge_image(image).objects, resolution)
        objects, correct, false_positives = objects + result[0], correct + result[1], false_positives + result[2]
    return JudgeAccuracy(f"{count} images of {shards} ({resolution}px)", objects, correct, false_positives)

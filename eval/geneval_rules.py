"""GenEval's scoring rules, independent of the detector that produced the objects.

The rules follow the official ``evaluate_images.py`` of GenEval (Ghosh et al., 2023):

* every ``include`` requirement must hold (AND); any ``exclude`` requirement that holds fails the image
  (OR); counting prompts are ``include N`` plus ``exclude N+1``;
* for a requirement with a colour, the first ``count`` detections of the class (in the detector's
  order: confidence, or area for the Shapes judge) must all have that colour;
* a position requirement ``[relation, group]`` compares every one of those detections with every object
  matched by requirement ``group`` using :func:`relative_position` (centre offset reduced by a margin of
  0.1 x the summed box sizes, then the direction must be within 60 degrees of the relation's axis);
* the overall score is the mean over tags of each tag's accuracy.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

POSITION_THRESHOLD = 0.1
GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


@dataclass(frozen=True)
class Detection:
    """One detected object: box (x1, y1, x2, y2) in pixels, y down; its colour name if known."""

    box: tuple[float, float, float, float]
    color: str | None = None
    score: float = 1.0


def relative_position(
    box_a: Sequence[float], box_b: Sequence[float], margin: float = POSITION_THRESHOLD, cutoff: float = 0.5
) -> set[str]:
    """Relations of A relative to B ({"left of", "right of", "above", "below"}), GenEval's rule.

    ``margin`` and ``cutoff`` are GenEval's (0.1, 0.5) by default; larger values give a strict subset
    of the relations, which data generators use so that what they state survives pixel rounding."""
    boxes = np.asarray([box_a[:4], box_b[:4]], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised_offset = np.maximum(np.abs(offset) - margin * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised_offset) < 1e-3):
        return set()
    dx, dy = revised_offset / np.linalg.norm(offset)
    relations = set()
    if dx < -cutoff:
        relations.add("left of")
    if dx > cutoff:
        relations.add("right of")
    if dy < -cutoff:
        relations.add("above")
    if dy > cutoff:
        relations.add("below")
    return relations


def evaluate_spec(detections: Mapping[str, Sequence[Detection]], spec: Mapping) -> tuple[bool, list[str]]:
    """Score one image. ``detections[class]`` is in detector order; ``spec`` is one metadata line."""
    correct = True
    reasons: list[str] = []
    matched_groups: list[Sequence[Detection] | None] = []
    for requirement in spec.get("include", []):
        class_name, count = requirement["class"], int(requirement["count"])
        matched = True
        found = list(detections.get(class_name, []))[:count]
        if len(found) < count:
            correct = matched = False
            reasons.append(f"expected {class_name}>={count}, found {len(found)}")
        else:
            if "color" in requirement:
                colors = [detection.color for detection in found]
                if colors.count(requirement["color"]) < count:
                    correct = matched = False
                    reasons.append(
                        f"expected {requirement['color']} {class_name}>={count}, found "
                        f"{colors.count(requirement['color'])} {requirement['color']}; and "
                        + ", ".join(f"{colors.count(c)} {c}" for c in sorted(set(colors) - {requirement['color']}, key=str))
                    )
            if "position" in requirement and matched:
                relation, target_group = requirement["position"]
                if target_group >= len(matched_groups) or matched_groups[target_group] is None:
                    correct = matched = False
                    reasons.append(f"no target for {class_name} to be {relation}")
                else:
                    for detection in found:
                        for target in matched_groups[target_group]:
                            actual = relative_position(detection.box, target.box)
                            if relation not in actual:
                                correct = matched = False
                                reasons.append(
                                    f"expected {class_name} {relation} target, found {' and '.join(sorted(actual)) or 'no relation'}"
                                )
                                break
                        if not matched:
                            break
        matched_groups.append(found if matched else None)
    for requirement in spec.get("exclude", []):
        class_name, count = requirement["class"], int(requirement["count"])
        if len(detections.get(class_name, [])) >= count:
            correct = False
            reasons.append(f"expected {class_name}<{count}, found {len(detections.get(class_name, []))}")
    return correct, reasons


def summarize(results: Sequence[Mapping]) -> dict[str, float]:
    """Per-tag accuracy and ``overall`` = mean of the tag accuracies (GenEval's headline number).

    Each result needs ``tag`` and ``correct``; a failed or missing image must be passed in as incorrect,
    never left out, so the denominator cannot shrink."""
    by_tag: dict[str, list[bool]] = defaultdict(list)
    for result in results:
        by_tag[result["tag"]].append(bool(result["correct"]))
    scores = {tag: float(np.mean(values)) for tag, values in sorted(by_tag.items())}
    scores["overall"] = float(np.mean(list(scores.values()))) if scores else 0.0
    return scores

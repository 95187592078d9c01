"""Linear probes on tokenizer latents / encoder features, and the labels they are scored against.

Features. ``feature_fn(images in [-1, 1]) -> (B, C, h, w)``; a probe reads either the flattened map
(``flatten``: C*h*w dims, keeps the spatial layout) or its global average (``gap``: C dims). All
features are held in memory (float32): fine for Shapes and ImageNet subsets, not for 1.28M x 24576.

Probe. Multinomial logistic regression (one linear layer + softmax cross-entropy) on features
standardised with the training mean and standard deviation, fitted full-batch with L-BFGS (strong
Wolfe line search). The objective ``mean CE + weight_decay/2 * |W|^2`` (bias not penalised) is convex,
so the fit is deterministic (no sampling, fixed start) and converges without a learning-rate schedule.
The weight decay is chosen from ``WEIGHT_DECAY_GRID`` by accuracy on a stratified held-out fifth of the
training set (drawn with ``seed``; ties go to the larger weight decay). The grid is walked from the
largest value down, each fit warm-started from the previous one, and the final fit on the whole
training set starts from the chosen value's solution. The validation set is used only for the
reported accuracy. 2000 x 8192 features, 10 classes: 16 s for selection and fit, measured on this
project's 2-core CPU while other jobs kept it busy (load ~7).

Labels. ``shapes_probe_targets`` reads a Shapes scene graph; ``class_labels`` reads a class field
(``cls``) of ImageNet-style shards, or the sub-folder of an image folder.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from functools import cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

POOLS = ("flatten", "gap")
WEIGHT_DECAY_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
HOLDOUT_FRACTION = 0.2
STD_FLOOR = 1e-6


# ----------------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------------
def pool_features(feature_map: torch.Tensor, pool: str) -> torch.Tensor:
    """(B, C, h, w) -> (B, C*h*w) for ``flatten`` or (B, C) for ``gap`` (float32). (B, D) passes through."""
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}; known: {', '.join(POOLS)}")
    feature_map = feature_map.float()
    if feature_map.ndim == 2:
        return feature_map
    if feature_map.ndim < 3:
        raise ValueError(f"expected features (B, C, h, w), got shape {tuple(feature_map.shape)}")
    return feature_map.flatten(1) if pool == "flatten" else feature_map.flatten(2).mean(2)


def _images(batch: Any) -> torch.Tensor:
    if isinstance(batch, dict):
        return batch["image"]
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


@torch.no_grad()
def extract_pooled_features(
    batches: Iterable[Any],
    feature_fn: Callable[[torch.Tensor], torch.Tensor],
    pools: Sequence[str] = POOLS,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """One pass over ``batches`` (tensors, or dicts with ``"image"``) -> ``{pool: (N, dim) on CPU}``."""
    pools = list(dict.fromkeys(pools))
    for pool in pools:
        if pool not in POOLS:
            raise ValueError(f"unknown pool {pool!r}; known: {', '.join(POOLS)}")
    collected: dict[str, list[torch.Tensor]] = {pool: [] for pool in pools}
    for batch in batches:
        images = _images(batch)
        if device is not None:
            images = images.to(device)
        features = feature_fn(images.float())
        for pool in pools:
            collected[pool].append(pool_features(features, pool).cpu())
    return {pool: torch.cat(parts) if parts else torch.zeros(0, 0) for pool, parts in collected.items()}


def extract_probe_features(
    batches: Iterable[Any],
    feature_fn: Callable[[torch.Tensor], torch.Tensor],
    pool: str = "flatten",
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(N, dim) pooled features of every image in ``batches``."""
    return extract_pooled_features(batches, feature_fn, [pool], device=device)[pool]


# ----------------------------------------------------------------------------------------------------
# The probe
# ----------------------------------------------------------------------------------------------------
def standardize(train: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Centre and scale every set with the training mean and standard deviation (constant dims -> 0)."""
    mean = train.mean(0, keepdim=True)
    std = train.std(0, unbiased=False, keepdim=True)
    std = torch.where(std < STD_FLOOR, torch.ones_like(std), std)
    return tuple((features - mean) / std for features in (train, *others))


def _fit_logistic(features: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float,
                  max_iterations: int, lr: float, start: tuple[torch.Tensor, torch.Tensor] | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise mean CE + weight_decay/2 |W|^2 with full-batch L-BFGS, from zero or from ``start``."""
    if start is None:
        weight = torch.zeros(features.shape[1], num_classes, dtype=features.dtype, device=features.device)
        bias = torch.zeros(num_classes, dtype=features.dtype, device=features.device)
    else:
        weight, bias = (tensor.clone() for tensor in start)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=lr, max_iter=max_iterations, max_eval=max_iterations * 5 // 4 + 5, history_size=20,
        tolerance_grad=1e-5, tolerance_change=1e-7, line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight + bias, labels) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def _accuracy(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> float:
    if labels.numel() == 0:
        return float("nan")
    with torch.no_grad():
        predictions = (features @ weight + bias).argmax(1)
    return float((predictions == labels).double().mean())


def stratified_holdout(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (fit, holdout): ``round(fraction * n_c)`` of each class with at least 2 samples held out."""
    generator = np.random.default_rng(seed)
    labels_np = labels.cpu().numpy()
    fit, holdout = [], []
    for label in np.unique(labels_np):
        members = np.flatnonzero(labels_np == label)
        members = members[generator.permutation(len(members))]
        count = int(round(fraction * len(members))) if len(members) >= 2 else 0
        count = min(max(count, 1 if len(members) >= 2 else 0), len(members) - 1)
        holdout.extend(members[:count].tolist())
        fit.extend(members[count:].tolist())
    return torch.tensor(sorted(fit), dtype=torch.long), torch.tensor(sorted(holdout), dtype=torch.long)


def fit_linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor | Sequence[int],
    val_features: torch.Tensor,
    val_labels: torch.Tensor | Sequence[int],
    num_classes: int,
    *,
    epochs: int = 50,
    lr: float = 1.0,
    weight_decay: float | None = None,
    weight_decay_grid: Sequence[float] = WEIGHT_DECAY_GRID,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Fit a linear softmax classifier on ``train_*`` and report train and validation accuracy.

    ``epochs``: most L-BFGS iterations per fit (each a full-batch pass or a few); ``lr``: L-BFGS step scale (1 with the line
    search); ``weight_decay=None`` selects it from ``weight_decay_grid`` on a held-out split of the
    training set (see the module docstring). Deterministic for a given ``seed``.
    """
    train_labels = torch.as_tensor(train_labels, dtype=torch.long).reshape(-1)
    val_labels = torch.as_tensor(val_labels, dtype=torch.long).reshape(-1)
    train_features = torch.as_tensor(train_features).float().reshape(len(train_labels), -1)
    val_features = torch.as_tensor(val_features).float().reshape(len(val_labels), -1)
    if len(train_labels) < 2:
        raise ValueError(f"a linear probe needs at least 2 training samples, got {len(train_labels)}")
    for name, labels in (("train", train_labels), ("val", val_labels)):
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"{name} labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if device is not None:
        train_features, val_features = train_features.to(device), val_features.to(device)
        train_labels, val_labels = train_labels.to(device), val_labels.to(device)

    selection: dict[str, float] | None = None
    warm_start = None
    if weight_decay is None:
        fit_index, holdout_index = stratified_holdout(train_labels, HOLDOUT_FRACTION, seed)
        if len(holdout_index) == 0 or len(fit_index) < 2:
            weight_decay = float(sorted(weight_decay_grid)[len(weight_decay_grid) // 2])
        else:
            fit_index, holdout_index = fit_index.to(train_labels.device), holdout_index.to(train_labels.device)
            fit_x, holdout_x = standardize(train_features[fit_index], train_features[holdout_index])
            selection = {}
            solutions = {}
            start = None
            # Largest weight decay first, each fit warm-started from the previous one (a regularisation
            # path): the well-conditioned fits are cheap and give the next ones a close start.
            for candidate in sorted((float(value) for value in weight_decay_grid), reverse=True):
                start = _fit_logistic(fit_x, train_labels[fit_index], num_classes, candidate, epochs, lr, start)
                solutions[candidate] = start
                selection[f"{candidate:g}"] = _accuracy(holdout_x, train_labels[holdout_index], *start)
            best = max(selection.values())
            weight_decay = max(float(key) for key, value in selection.items() if value >= best - 1e-12)
            warm_start = solutions[weight_decay]

    train_x, val_x = standardize(train_features, val_features)
    weight, bias = _fit_logistic(train_x, train_labels, num_classes, float(weight_decay), epochs, lr, warm_start)
    return {
        "train_accuracy": _accuracy(train_x, train_labels, weight, bias),
        "val_accuracy": _accuracy(val_x, val_labels, weight, bias),
        "weight_decay": float(weight_decay),
        "weight_decay_selection": selection,
        "num_train": int(len(train_labels)),
        "num_val": int(len(val_labels)),
        "num_classes": int(num_classes),
        "feature_dim": int(train_features.shape[1]),
    }


# ----------------------------------------------------------------------------------------------------
# Shapes labels
# ----------------------------------------------------------------------------------------------------
AREA_PIXELS_PER_SIDE = 2048  # rasterisation scale of an object's own area (pixels per image side)
OCCLUSION_RESOLUTION = 512  # grid on which the visible fraction of overlapping objects is measured


def shapes_target_classes() -> dict[str, int]:
    from data.shapes.vocabulary import COLORS, MAX_OBJECTS, SHAPES

    return {"count": MAX_OBJECTS, "color": len(COLORS), "shape": len(SHAPES)}


def _outline_mask(mask: np.ndarray, extent: float, scale: float) -> np.ndarray:
    from scipy import ndimage

    from data.shapes.render import OUTLINE_WIDTH

    return mask & (ndimage.distance_transform_edt(mask) <= OUTLINE_WIDTH * extent * scale)


@cache
def object_area(shape: str, size: str, style: str) -> float:
    """Painted area of one object as a fraction of the image, independent of where it sits.

    The renderer's outline (``data.shapes.geometry.draw_shape``) and its outline-stroke rule are
    rasterised in the object's own frame at ``AREA_PIXELS_PER_SIDE`` pixels per image side, so two
    objects of the same shape, size and style always have exactly the same area.
    """
    from PIL import Image, ImageDraw

    from data.shapes.geometry import draw_shape
    from data.shapes.scene import ShapeObject

    obj = ShapeObject(shape, "red", size, 0.5, 0.5)
    scale = AREA_PIXELS_PER_SIDE
    width, height, margin = obj.width * scale, obj.height * scale, 2
    canvas = Image.new("L", (math.ceil(width) + 2 * margin, math.ceil(height) + 2 * margin), 0)
    draw_shape(ImageDraw.Draw(canvas), shape, (margin, margin, margin + width, margin + height))
    mask = np.asarray(canvas) > 127
    if style == "outline":
        mask = _outline_mask(mask, obj.extent, scale)
    return float(mask.sum()) / scale**2


def _scene_mask(obj, style: str, resolution: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    from data.shapes.geometry import draw_shape

    canvas = Image.new("L", (resolution, resolution), 0)
    draw_shape(ImageDraw.Draw(canvas), obj.shape, tuple(value * resolution for value in obj.box))
    mask = np.asarray(canvas) > 127
    return _outline_mask(mask, obj.extent, resolution) if style == "outline" else mask


def _boxes_intersect(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def rendered_areas(scene) -> list[float]:
    """Visible painted area of each object (fraction of the image): its own area times the fraction not
    covered by objects drawn after it (the renderer paints in list order). The fraction is measured on
    a ``OCCLUSION_RESOLUTION`` grid, only for objects whose box meets a later object's box; sampled
    scenes never overlap, so their areas are exact per (shape, size, style)."""
    objects = scene.objects
    areas = [object_area(obj.shape, obj.size, scene.style) for obj in objects]
    occluded = [i for i in range(len(objects)) if any(_boxes_intersect(objects[i].box, objects[j].box) for j in range(i + 1, len(objects)))]
    if occluded:
        masks = [_scene_mask(obj, scene.style, OCCLUSION_RESOLUTION) for obj in objects]
        for i in occluded:
            covered = np.zeros_like(masks[i])
            for j in range(i + 1, len(objects)):
                covered |= masks[j]
            total = int(masks[i].sum())
            areas[i] *= float((masks[i] & ~covered).sum()) / total if total else 0.0
    return areas


def largest_object_index(scene) -> int:
    """Index of the object with the largest rendered area. Ties (equal areas, e.g. two objects of the
    same shape, size and style) go to the top-most centre (smallest ``y``), then the left-most (smallest
    ``x``), then the first in the list: a rule that can be read off the image."""
    if not scene.objects:
        raise ValueError("the scene has no objects")
    areas = rendered_areas(scene)
    best = max(areas)
    candidates = [i for i, area in enumerate(areas) if area >= best * (1 - 1e-9)]
    return min(candidates, key=lambda i: (scene.objects[i].y, scene.objects[i].x, i))


def shapes_probe_targets(scene_dict: dict) -> dict[str, int]:
    """``{"count": number of objects - 1, "color": index in COLORS, "shape": index in SHAPES}``, colour and
    shape being those of the object with the largest rendered area (``largest_object_index``)."""
    from data.shapes.scene import Scene
    from data.shapes.vocabulary import COLORS, SHAPES

    scene = Scene.from_dict(scene_dict) if isinstance(scene_dict, dict) else scene_dict
    largest = scene.objects[largest_object_index(scene)]
    return {"count": len(scene.objects) - 1, "color": COLORS.index(largest.color), "shape": SHAPES.index(largest.shape)}


# ----------------------------------------------------------------------------------------------------
# Class labels
# ----------------------------------------------------------------------------------------------------
def class_value(meta: dict[str, Any], field: str = "cls") -> Any:
    """The raw class of a sample: ``meta[field]`` (dotted names read inside JSON members, as the
    loaders do), or for image folders the sub-folder name; ``None`` when absent."""
    from data.decode import lookup_field

    value = lookup_field(meta, field)
    if value is None and meta.get("folder"):
        value = meta["folder"]
    if isinstance(value, str):
        value = value.strip()
        return value or None
    return value


def encode_class_labels(train_values: Sequence[Any], val_values: Sequence[Any]) -> tuple[list[int], list[int], int, list[str] | None]:
    """Integer labels for both sets: integers (or digit strings) are used as they are; anything else is
    numbered in sorted order of the names seen in either set. Returns (train, val, num_classes, names)."""
    values = list(train_values) + list(val_values)
    if any(value is None for value in values):
        raise ValueError("some samples have no class label")

    def as_int(value):
        if isinstance(value, (bool, np.bool_)):
            return None
        if isinstance(value, (int, np.integer)):
            return int(value)
        if isinstance(value, str) and value.lstrip("-").isdigit():
            return int(value)
        return None

    integers = [as_int(value) for value in values]
    if all(value is not None and value >= 0 for value in integers):
        count = len(train_values)
        return integers[:count], integers[count:], max(integers) + 1, None
    names = sorted({str(value) for value in values})
    lookup = {name: index for index, name in enumerate(names)}
    return [lookup[str(v)] for v in train_values], [lookup[str(v)] for v in val_values], len(names), names

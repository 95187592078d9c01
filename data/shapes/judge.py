"""The program judge: reads a Shapes image's pixels (never its scene graph) back into objects.

Pipeline: model the background as a smooth (quadratic) colour field fitted to the border, which the
Shapes world keeps free of objects; mark pixels far from it as foreground; split foreground into
connected components; for each, read a soft coverage map (from luminance, which JPEG keeps at full
resolution), fill holes (outlined shapes), name the shape by the template — drawn in the component's
box, slightly grown and blurred as resampling or JPEG would — that fits the map best, and name the
colour by un-mixing the purest pixels against the background (edge pixels are mixtures of the two).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from data.shapes.geometry import draw_shape
from data.shapes.vocabulary import BACKGROUND_RGB, COLOR_RGB, SHAPES, SIZE_FRACTIONS
from eval.geneval_rules import Detection, evaluate_spec, relative_position

FOREGROUND_THRESHOLD = 40.0  # RGB distance from the background model that marks an object pixel
MIN_AREA_FRACTION = 0.005  # smaller components are JPEG fragments; the smallest object (a small star) covers ~0.009
OUTLINE_FILL_RATIO = 0.8  # foreground / filled area below this: the object is drawn as an outline
TEMPLATE_SUPERSAMPLE = 4
LUMINANCE = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)
MIN_LUMINANCE_CONTRAST = 20.0  # below this, coverage is read from full colour instead of luminance
TEMPLATE_BLURS = (0.0, 0.7, 1.2)  # pixels: none (PNG), resampling, JPEG chroma subsampling


@dataclass
class JudgedObject:
    shape: str
    color: str
    size: str
    box: tuple[int, int, int, int]  # (x1, y1, x2, y2) pixels, x2/y2 exclusive, y down
    area: int  # filled area in pixels
    style: str  # "flat", "outline" or "glossy" (best effort: a glossy white object reads as flat)
    shape_iou: float

    @property
    def center(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["box"] = list(self.box)
        data["shape_iou"] = round(self.shape_iou, 4)
        return data


@dataclass
class JudgedImage:
    width: int
    height: int
    background: str
    objects: list[JudgedObject] = field(default_factory=list)

    def detections(self) -> dict[str, list[Detection]]:
        """Objects grouped by shape, largest first (the judge's stand-in for detector confidence)."""
        grouped: dict[str, list[Detection]] = {}
        for obj in sorted(self.objects, key=lambda o: -o.area):
            grouped.setdefault(obj.shape, []).append(Detection(box=tuple(float(v) for v in obj.box), color=obj.color))
        return grouped

    def to_dict(self) -> dict:
        return {
            "width": self.width,
            "height": self.height,
            "background": self.background,
            "objects": [obj.to_dict() for obj in self.objects],
        }


def _as_float_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {array.shape}")
    return array.astype(np.float32)


def fit_background(pixels: np.ndarray) -> np.ndarray:
    """Per-pixel background colour (H, W, 3): a quadratic surface per channel fitted to the border ring."""
    height, width, _ = pixels.shape
    ring = max(2, round(0.02 * min(height, width)))
    border = np.zeros((height, width), dtype=bool)
    border[:ring, :] = border[-ring:, :] = border[:, :ring] = border[:, -ring:] = True
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    xs, ys = xs / width - 0.5, ys / height - 0.5
    design = np.stack([np.ones_like(xs), xs, ys, xs * xs, xs * ys, ys * ys], axis=-1)
    rows, targets = design[border], pixels[border]
    keep = np.ones(len(rows), dtype=bool)
    for _ in range(2):  # refit once without outliers (a stray object edge touching the border)
        # Normal equations: a 6x6 solve, much cheaper than a general least-squares call on every image.
        kept_rows = rows[keep].astype(np.float64)
        coefficients = np.linalg.solve(kept_rows.T @ kept_rows, kept_rows.T @ targets[keep].astype(np.float64))
        residual = np.linalg.norm(rows @ coefficients - targets, axis=1)
        keep = residual <= max(3.0 * float(np.median(residual)), 12.0)
    return (design @ coefficients).astype(np.float32)


def _observed_color(component_pixels: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """Median colour of the purest half of a component (edge pixels are mixtures with the background)."""
    return np.median(component_pixels[distances >= np.median(distances)], axis=0)


def _classify_color(observed: np.ndarray, background: np.ndarray) -> str:
    """Nearest palette colour to ``observed``, allowing it to be partly mixed with the background."""
    best_name, best_residual = "", np.inf
    for name, rgb in COLOR_RGB.items():
        direction = np.asarray(rgb, dtype=np.float32) - background
        norm_sq = float(direction @ direction)
        alpha = 1.0 if norm_sq == 0 else float(np.clip((observed - background) @ direction / norm_sq, 0.5, 1.0))
        residual = float(np.linalg.norm(observed - (background + alpha * direction)))
        if residual < best_residual:
            best_name, best_residual = name, residual
    return best_name


def _render_coverage(shape: str, box, size: tuple[int, int]) -> np.ndarray:
    """Anti-aliased coverage (rows, cols) in [0, 1] of ``shape`` filling ``box`` (float pixel coords)."""
    rows, cols = size
    canvas = Image.new("L", (cols * TEMPLATE_SUPERSAMPLE, rows * TEMPLATE_SUPERSAMPLE), 0)
    draw_shape(ImageDraw.Draw(canvas), shape, tuple(v * TEMPLATE_SUPERSAMPLE for v in box))
    coverage = np.asarray(canvas, dtype=np.float32) / 255.0
    return coverage.reshape(rows, TEMPLATE_SUPERSAMPLE, cols, TEMPLATE_SUPERSAMPLE).mean((1, 3))


def _classify_shape(coverage: np.ndarray) -> tuple[str, float]:
    """Best shape for a soft coverage map: each template is drawn in the map's half-coverage box (and
    slightly grown, since blur shrinks pointed tips below one half), blurred as the image may be, and
    compared by squared error; the score returned is the IoU of the winner at one half."""
    inside = coverage > 0.5
    rows_idx, cols_idx = np.nonzero(inside)
    x1, x2 = cols_idx.min(), cols_idx.max() + 1.0
    y1, y2 = rows_idx.min(), rows_idx.max() + 1.0
    best = (np.inf, SHAPES[0], None)
    for shape in SHAPES:
        for grow in (0.0, 0.75, 1.5):
            template = _render_coverage(shape, (x1 - grow, y1 - grow, x2 + grow - 1e-3, y2 + grow - 1e-3), coverage.shape)
            for sigma in TEMPLATE_BLURS:
                candidate = ndimage.gaussian_filter(template, sigma) if sigma else template
                error = float(np.square(candidate - coverage).sum())
                if error < best[0]:
                    best = (error, shape, candidate)
    _, shape, template = best
    union = np.logical_or(inside, template > 0.5).sum()
    return shape, float(np.logical_and(inside, template > 0.5).sum() / union) if union else 0.0


def _classify_style(foreground: np.ndarray, filled: np.ndarray, pixels: np.ndarray) -> str:
    if foreground.sum() < OUTLINE_FILL_RATIO * filled.sum():
        return "outline"
    luminance = pixels @ LUMINANCE
    lighter = luminance > np.median(luminance) + 35.0
    return "glossy" if 0.01 <= lighter.mean() <= 0.35 else "flat"


def _object_coverage(labels, index, region, pixels, background_model, observed):
    """Soft coverage of one object in [0, 1] and the padded crop it lives in (or None).

    Each pixel is projected on the line from the background to the object's colour, which gives
    how much of the pixel the object covers (anti-aliasing, blur); pixels of other components are 0."""
    rows, cols = region
    height, width = labels.shape
    pad = 3
    rows = slice(max(rows.start - pad, 0), min(rows.stop + pad, height))
    cols = slice(max(cols.start - pad, 0), min(cols.stop + pad, width))
    # Stay within the component grown by the pad, so a neighbouring object never leaks in.
    own = ndimage.binary_dilation(labels[rows, cols] == index, iterations=pad)
    crop_pixels, crop_background = pixels[rows, cols], background_model[rows, cols]
    luminance_contrast = float((observed - crop_background.mean((0, 1))) @ LUMINANCE)
    if abs(luminance_contrast) >= MIN_LUMINANCE_CONTRAST:
        # Luminance survives JPEG at full resolution (chroma is halved), so read coverage from it.
        coverage = ((crop_pixels - crop_background) @ LUMINANCE) / luminance_contrast
    else:
        direction = observed - crop_background
        projection = ((crop_pixels - crop_background) * direction).sum(-1)
        coverage = projection / np.maximum((direction * direction).sum(-1), 1e-6)
    coverage = np.clip(coverage, 0.0, 1.0) * own
    if not (coverage > 0.5).any():
        return None
    return rows, cols, coverage.astype(np.float32)


def judge_image(image) -> JudgedImage:
    """Detect every object in a Shapes image (PIL image or (H, W, 3) array)."""
    pixels = _as_float_array(image)
    height, width, _ = pixels.shape
    background_model = fit_background(pixels)
    distance = np.linalg.norm(pixels - background_model, axis=-1)
    foreground = distance > FOREGROUND_THRESHOLD
    labels, _ = ndimage.label(foreground, structure=np.ones((3, 3), dtype=bool))
    ring = max(2, round(0.02 * min(height, width)))
    border_color = np.median(
        np.concatenate([background_model[:ring].reshape(-1, 3), background_model[-ring:].reshape(-1, 3)]), axis=0
    )
    background_name = min(BACKGROUND_RGB, key=lambda n: np.linalg.norm(np.asarray(BACKGROUND_RGB[n]) - border_color))
    judged = JudgedImage(width=width, height=height, background=background_name)
    min_area = MIN_AREA_FRACTION * height * width
    for index, region in enumerate(ndimage.find_objects(labels), start=1):
        if region is None:
            continue
        component = labels[region] == index
        observed = _observed_color(pixels[region][component], distance[region][component])
        background = background_model[region][component].mean(axis=0)
        crop = _object_coverage(labels, index, region, pixels, background_model, observed)
        if crop is None:
            continue
        rows, cols, coverage = crop
        object_mask = coverage > 0.5
        filled = ndimage.binary_fill_holes(object_mask)
        if filled.sum() < min_area:
            continue
        # Shapes are judged on the filled coverage so outlined objects read as their silhouette.
        shape, iou = _classify_shape(np.where(filled & ~object_mask, 1.0, coverage))
        box_rows, box_cols = np.nonzero(object_mask)
        box = (cols.start + int(box_cols.min()), rows.start + int(box_rows.min()),
               cols.start + int(box_cols.max()) + 1, rows.start + int(box_rows.max()) + 1)
        extent = max(box[2] - box[0], box[3] - box[1]) / min(height, width)
        judged.objects.append(
            JudgedObject(
                shape=shape,
                color=_classify_color(observed, background),
                size=min(SIZE_FRACTIONS, key=lambda name: abs(SIZE_FRACTIONS[name] - extent)),
                box=box,
                area=int(filled.sum()),
                style=_classify_style(object_mask, filled, pixels[rows, cols][object_mask]),
                shape_iou=iou,
            )
        )
    return judged


def _judged(image_or_judged) -> JudgedImage:
    return image_or_judged if isinstance(image_or_judged, JudgedImage) else judge_image(image_or_judged)


def score_spec(image_or_judged, spec: Mapping) -> tuple[bool, list[str]]:
    """Score a GenEval-format spec (include AND, exclude OR, counting, position) on an image."""
    return evaluate_spec(_judged(image_or_judged).detections(), spec)


def _matches(obj: JudgedObject, description: Mapping) -> bool:
    return obj.shape == description["shape"] and ("color" not in description or obj.color == description["color"])


def answer_question(image_or_judged, program: Mapping) -> bool:
    """Answer one DPG-style question program (see ``data.shapes.prompts.dpg_items``) from the pixels.

    ``exists``: an object of that shape (and colour); ``count``: exactly that many of the shape;
    ``relation``: some subject/object pair stands in the relation under GenEval's position rule."""
    judged = _judged(image_or_judged)
    operation = program["op"]
    if operation == "exists":
        return any(_matches(obj, program) for obj in judged.objects)
    if operation == "count":
        return sum(obj.shape == program["shape"] for obj in judged.objects) == int(program["count"])
    if operation == "relation":
        subjects = [obj for obj in judged.objects if _matches(obj, program["subject"])]
        references = [obj for obj in judged.objects if _matches(obj, program["object"])]
        return any(
            program["relation"] in relative_position(subject.box, reference.box)
            for subject in subjects
            for reference in references
            if subject is not reference
        )
    raise ValueError(f"unknown question program op {operation!r}; expected exists, count or relation")

"""Shape outlines in a unit box, drawn into any pixel box (shared by the renderer and the judge)."""

from __future__ import annotations

import math

from PIL import ImageDraw


def _star_points(points: int = 5, inner_ratio: float = 0.45) -> list[tuple[float, float]]:
    vertices = []
    for index in range(2 * points):
        radius = 1.0 if index % 2 == 0 else inner_ratio
        angle = -math.pi / 2 + index * math.pi / points
        vertices.append((radius * math.cos(angle), radius * math.sin(angle)))
    xs, ys = zip(*vertices)
    # Normalise to fill the unit box exactly so the bounding box is the object's extent.
    return [((x - min(xs)) / (max(xs) - min(xs)), (y - min(ys)) / (max(ys) - min(ys))) for x, y in vertices]


def _cross_points(arm: float = 0.36) -> list[tuple[float, float]]:
    a, b = (1 - arm) / 2, (1 + arm) / 2
    return [(a, 0), (b, 0), (b, a), (1, a), (1, b), (b, b), (b, 1), (a, 1), (a, b), (0, b), (0, a), (a, a)]


POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(0, 0), (1, 0), (1, 1), (0, 1)],
    "triangle": [(0.5, 0), (1, 1), (0, 1)],
    "star": _star_points(),
    "cross": _cross_points(),
}


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill: int = 255) -> None:
    """Draw ``shape`` filling ``box`` = (x1, y1, x2, y2) in pixel coordinates."""
    x1, y1, x2, y2 = box
    if shape == "circle":
        draw.ellipse([x1, y1, x2, y2], fill=fill)
        return
    width, height = x2 - x1, y2 - y1
    draw.polygon([(x1 + u * width, y1 + v * height) for u, v in POLYGONS[shape]], fill=fill)

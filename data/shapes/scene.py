"""Scene graphs of the Shapes world and their seeded sampling.

Coordinates are resolution-free: centres and boxes are fractions of the image side, ``y`` pointing
down (so "above" means a smaller ``y``), matching GenEval's pixel convention.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from data.shapes.vocabulary import (
    BACKGROUNDS,
    COLORS,
    MAX_OBJECTS,
    SHAPE_ASPECT,
    SHAPES,
    SIZE_FRACTIONS,
    SIZES,
    STYLES,
    TEXTURES,
)

# Empty space kept between any two objects and between an object and the border (fraction of the side):
# it keeps objects separable for the judge and the border free for background estimation.
OBJECT_GAP = 0.06
BORDER_MARGIN = 0.05


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    size: str
    x: float  # centre, fraction of width
    y: float  # centre, fraction of height (down)

    @property
    def extent(self) -> float:
        return SIZE_FRACTIONS[self.size]

    @property
    def width(self) -> float:
        aspect = SHAPE_ASPECT[self.shape]
        return self.extent if aspect >= 1 else self.extent * aspect

    @property
    def height(self) -> float:
        aspect = SHAPE_ASPECT[self.shape]
        return self.extent / aspect if aspect >= 1 else self.extent

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(x1, y1, x2, y2) as fractions of the image side."""
        return (self.x - self.width / 2, self.y - self.height / 2, self.x + self.width / 2, self.y + self.height / 2)

    def describe(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    background: str = "gray"
    texture: str = "plain"
    style: str = "flat"
    texture_seed: int = 0  # seeds the grain of "grainy" backgrounds so renders are reproducible

    def to_dict(self) -> dict:
        return {
            "objects": [dataclasses.asdict(obj) for obj in self.objects],
            "background": self.background,
            "texture": self.texture,
            "style": self.style,
            "texture_seed": self.texture_seed,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        return cls(
            objects=tuple(ShapeObject(**obj) for obj in data["objects"]),
            background=data.get("background", "gray"),
            texture=data.get("texture", "plain"),
            style=data.get("style", "flat"),
            texture_seed=int(data.get("texture_seed", 0)),
        )

    def replace(self, **changes) -> Scene:
        return dataclasses.replace(self, **changes)


@dataclass
class SceneSampling:
    """What `sample_scene` draws from; the defaults cover the whole world."""

    min_objects: int = 1
    max_objects: int = MAX_OBJECTS
    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = COLORS
    sizes: tuple[str, ...] = SIZES
    backgrounds: tuple[str, ...] = BACKGROUNDS
    textures: tuple[str, ...] = TEXTURES
    styles: tuple[str, ...] = STYLES
    # Most scenes are plain and flat, so shapes and colours dominate what a small model has to learn.
    texture_weights: tuple[float, ...] | None = field(default=(0.6, 0.1, 0.1, 0.1, 0.1))
    style_weights: tuple[float, ...] | None = field(default=(0.7, 0.15, 0.15))


def boxes_overlap(box_a, box_b, gap: float = OBJECT_GAP) -> bool:
    return not (
        box_a[2] + gap <= box_b[0]
        or box_b[2] + gap <= box_a[0]
        or box_a[3] + gap <= box_b[1]
        or box_b[3] + gap <= box_a[1]
    )


def fits(candidate: ShapeObject, placed: list[ShapeObject] | tuple[ShapeObject, ...]) -> bool:
    x1, y1, x2, y2 = candidate.box
    if x1 < BORDER_MARGIN or y1 < BORDER_MARGIN or x2 > 1 - BORDER_MARGIN or y2 > 1 - BORDER_MARGIN:
        return False
    return all(not boxes_overlap(candidate.box, other.box) for other in placed)


def place_object(
    rng: np.random.Generator, shape: str, color: str, size: str, placed, tries: int = 200, region=None
) -> ShapeObject | None:
    """Draw a centre for the object so it fits; ``region`` = (x_lo, x_hi, y_lo, y_hi) bounds the centre."""
    half = SIZE_FRACTIONS[size] / 2
    x_lo, x_hi, y_lo, y_hi = region or (0.0, 1.0, 0.0, 1.0)
    x_lo, y_lo = max(x_lo, BORDER_MARGIN + half), max(y_lo, BORDER_MARGIN + half)
    x_hi, y_hi = min(x_hi, 1 - BORDER_MARGIN - half), min(y_hi, 1 - BORDER_MARGIN - half)
    if x_lo > x_hi or y_lo > y_hi:
        return None
    for _ in range(tries):
        candidate = ShapeObject(shape, color, size, float(rng.uniform(x_lo, x_hi)), float(rng.uniform(y_lo, y_hi)))
        if fits(candidate, placed):
            return candidate
    return None


def _choice(rng: np.random.Generator, options, weights=None):
    if weights is not None and len(weights) == len(options):
        probabilities = np.asarray(weights, dtype=float)
        return options[int(rng.choice(len(options), p=probabilities / probabilities.sum()))]
    return options[int(rng.integers(len(options)))]


def sample_scene(rng: np.random.Generator | int, sampling: SceneSampling | None = None) -> Scene:
    """A random scene; objects never overlap and keep clear of the border. Deterministic per seed."""
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    sampling = sampling or SceneSampling()
    while True:
        count = int(rng.integers(sampling.min_objects, sampling.max_objects + 1))
        placed: list[ShapeObject] = []
        for _ in range(count):
            # Crowded scenes get smaller objects so they still fit.
            sizes = sampling.sizes if count <= 3 else tuple(s for s in sampling.sizes if s != "large") or sampling.sizes
            obj = place_object(
                rng, _choice(rng, sampling.shapes), _choice(rng, sampling.colors), _choice(rng, sizes), placed
            )
            if obj is None:
                break
            placed.append(obj)
        if len(placed) == count:
            break
    return Scene(tuple(placed), **sample_appearance(rng, sampling))


def sample_appearance(rng: np.random.Generator, sampling: SceneSampling) -> dict:
    """Background, texture, style and texture seed of a scene (the keyword arguments of ``Scene``)."""
    return {
        "background": _choice(rng, sampling.backgrounds),
        "texture": _choice(rng, sampling.textures, sampling.texture_weights),
        "style": _choice(rng, sampling.styles, sampling.style_weights),
        "texture_seed": int(rng.integers(2**31)),
    }

"""Rasterise a Scene: textured background, then each object's anti-aliased coverage composited on top.

Objects are drawn on a 4x supersampled grid and box-filtered down, so edges are smooth at any
resolution and the same scene renders consistently at 64 and 256 px.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from data.shapes.geometry import draw_shape
from data.shapes.scene import Scene, ShapeObject
from data.shapes.vocabulary import BACKGROUND_RGB, COLOR_RGB

SUPERSAMPLE = 4
OUTLINE_WIDTH = 0.22  # stroke width of "outline" objects, as a fraction of the object's extent
GLOSS_STRENGTH = 0.55  # how far the highlight of "glossy" objects is blended towards white


def render_background(scene: Scene, resolution: int) -> np.ndarray:
    """(H, W, 3) float32 in 0..255: the background colour with its light texture."""
    base = np.asarray(BACKGROUND_RGB[scene.background], dtype=np.float32)
    image = np.broadcast_to(base, (resolution, resolution, 3)).copy()
    coordinates = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution
    ys, xs = np.meshgrid(coordinates, coordinates, indexing="ij")
    if scene.texture == "grainy":
        rng = np.random.default_rng(scene.texture_seed)
        image += rng.normal(0.0, 5.0, size=(resolution, resolution, 1)).astype(np.float32)
    elif scene.texture == "striped":
        image += (7.0 * np.sin(2 * np.pi * (xs + ys) * 8))[..., None]
    elif scene.texture == "checkered":
        cells = (np.floor(xs * 8) + np.floor(ys * 8)) % 2
        image += (14.0 * cells - 7.0)[..., None]
    elif scene.texture == "dusk":
        # Warmer towards the bottom, like low evening light; a hue shift that keeps luminance nearly flat.
        image += (ys - 0.5)[..., None] * np.array([28.0, 0.0, -28.0], dtype=np.float32)
    return image


def _object_layer(obj: ShapeObject, style: str, resolution: int):
    """Coverage alpha (h, w) and premultiplied colour (h, w, 3) of one object, and the slice it covers."""
    scale = resolution * SUPERSAMPLE
    x1, y1, x2, y2 = (value * scale for value in obj.box)
    # Work on a crop aligned to whole output pixels so the box filter lines up with the output grid.
    # One pixel of margin on every side: the outline's distance transform needs background around the shape.
    col0, row0 = max(int(np.floor(x1 / SUPERSAMPLE)) - 1, 0), max(int(np.floor(y1 / SUPERSAMPLE)) - 1, 0)
    col1, row1 = int(np.ceil(x2 / SUPERSAMPLE)) + 1, int(np.ceil(y2 / SUPERSAMPLE)) + 1
    col1, row1 = min(col1, resolution), min(row1, resolution)
    offset_x, offset_y = col0 * SUPERSAMPLE, row0 * SUPERSAMPLE
    height, width = (row1 - row0) * SUPERSAMPLE, (col1 - col0) * SUPERSAMPLE
    canvas = Image.new("L", (width, height), 0)
    draw_shape(ImageDraw.Draw(canvas), obj.shape, (x1 - offset_x, y1 - offset_y, x2 - offset_x, y2 - offset_y))
    mask = np.asarray(canvas) > 127
    color = np.broadcast_to(np.asarray(COLOR_RGB[obj.color], dtype=np.float32), (height, width, 3)).copy()
    if style == "outline":
        stroke = OUTLINE_WIDTH * obj.extent * scale
        mask = mask & (ndimage.distance_transform_edt(mask) <= stroke)
    elif style == "glossy":
        rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
        centre_x, centre_y = x1 - offset_x + 0.36 * (x2 - x1), y1 - offset_y + 0.40 * (y2 - y1)
        radius_x, radius_y = 0.17 * (x2 - x1), 0.11 * (y2 - y1)
        highlight = ((cols - centre_x) / radius_x) ** 2 + ((rows - centre_y) / radius_y) ** 2 <= 1.0
        color[highlight] += GLOSS_STRENGTH * (255.0 - color[highlight])
    rows_out, cols_out = height // SUPERSAMPLE, width // SUPERSAMPLE
    alpha = mask.astype(np.float32).reshape(rows_out, SUPERSAMPLE, cols_out, SUPERSAMPLE).mean((1, 3))
    premultiplied = (color * mask[..., None]).reshape(rows_out, SUPERSAMPLE, cols_out, SUPERSAMPLE, 3).mean((1, 3))
    return alpha, premultiplied, (slice(row0, row1), slice(col0, col1))


def render_scene_array(scene: Scene, resolution: int = 64) -> np.ndarray:
    """(H, W, 3) uint8 RGB."""
    if resolution < 16:
        raise ValueError(f"resolution {resolution} is too small for the Shapes world (minimum 16)")
    image = render_background(scene, resolution)
    for obj in scene.objects:
        alpha, premultiplied, region = _object_layer(obj, scene.style, resolution)
        image[region] = premultiplied + (1.0 - alpha[..., None]) * image[region]
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_scene(scene: Scene, resolution: int = 64) -> Image.Image:
    """The scene as a PIL RGB image of ``resolution`` x ``resolution`` pixels."""
    return Image.fromarray(render_scene_array(scene, resolution), mode="RGB")


def render_object_coverage(scene: Scene, resolution: int = 64) -> np.ndarray:
    """(num_objects, H, W) float32 visible coverage of each object in [0, 1], later objects occluding earlier ones.

    The pixel-level ground truth behind dense labels (per-patch colour and shape) used to train the
    Shapes representation encoder.
    """
    coverage = np.zeros((len(scene.objects), resolution, resolution), dtype=np.float32)
    for index, obj in enumerate(scene.objects):
        alpha, _, region = _object_layer(obj, scene.style, resolution)
        coverage[(slice(None), *region)] *= 1.0 - alpha
        coverage[(index, *region)] = alpha
    return coverage

"""Everything the Shapes world can contain, in one place (captions, edits, judge and prompts read it).

Colours are GenEval's ten colour names (all of which make sense for flat shapes); their RGB values are
kept far apart from each other and from every background so the program judge can be exact.
"""

from __future__ import annotations

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
SHAPE_PLURALS: dict[str, str] = {
    "circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses",
}

# GenEval's colour list, in its order. Object colours keep a luminance gap around mid-grey (every one is
# darker than 95 or lighter than 160 in Y) and backgrounds sit in that gap or far below it, so every
# object/background pair differs by >= 29 in luminance: JPEG keeps luminance at full resolution but
# halves chroma, so shapes stay readable at 64 px after compression.
COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 150, 30),
    "yellow": (245, 220, 30),
    "green": (90, 215, 90),
    "blue": (30, 80, 220),
    "purple": (130, 50, 180),
    "pink": (245, 130, 190),
    "brown": (120, 70, 30),
    "black": (20, 20, 20),
    "white": (250, 250, 250),
}

# Object extent (longest bbox side) as a fraction of the image side.
SIZES: tuple[str, ...] = ("small", "medium", "large")
SIZE_FRACTIONS: dict[str, float] = {"small": 0.16, "medium": 0.22, "large": 0.30}

# Width / height of each shape's bounding box (the extent is the larger of the two).
SHAPE_ASPECT: dict[str, float] = {"circle": 1.0, "square": 1.0, "triangle": 1.0 / 0.88, "star": 1.0, "cross": 1.0}

BACKGROUNDS: tuple[str, ...] = ("gray", "tan", "steel", "sage", "slate")
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "tan": (150, 128, 100),
    "steel": (100, 135, 165),
    "sage": (115, 140, 120),
    "slate": (45, 52, 62),
}
BACKGROUND_PHRASES: dict[str, str] = {
    "gray": "gray", "tan": "tan", "steel": "steel-blue", "sage": "sage-green", "slate": "dark slate",
}

# Light background textures ("environment"): amplitudes stay well under the judge's threshold.
TEXTURES: tuple[str, ...] = ("plain", "grainy", "striped", "checkered", "dusk")
TEXTURE_PHRASES: dict[str, str] = {
    "plain": "a plain",
    "grainy": "a grainy",
    "striped": "a softly striped",
    "checkered": "a faintly checkered",
    "dusk": "a warm, dusk-lit",
}

# Rendering styles of the objects ("style transfer" edits switch between them).
STYLES: tuple[str, ...] = ("flat", "outline", "glossy")
STYLE_PHRASES: dict[str, str] = {"flat": "flat", "outline": "outlined, hollow", "glossy": "glossy"}

# GenEval's relations (image y axis points down: "above" means smaller y).
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}

MAX_OBJECTS = 6

"""The Shapes world: a procedural, exactly-judged miniature of text-to-image and editing data.

Scenes of 1–6 flat coloured shapes on a plain or lightly textured background, rendered at any
resolution, each with its exact scene graph; captions (short GenEval-style and long dense), edit pairs
in the seven OmniEdit task kinds, GenEval/DPG-format prompt files, and a program judge that reads
pixels (not the scene graph) back into objects.
"""

from data.shapes.render import render_scene
from data.shapes.scene import Scene, ShapeObject, sample_scene

__all__ = ["Scene", "ShapeObject", "render_scene", "sample_scene"]

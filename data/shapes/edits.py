"""Edit pairs in the seven OmniEdit task kinds, with several instruction phrasings each.

An edit is (source scene, edited scene, instructions); both images are rendered from scene graphs, so
what changed — and what must stay the same — is known exactly.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from data.shapes.captions import article, region_phrase
from data.shapes.scene import Scene, ShapeObject, fits, place_object
from data.shapes.vocabulary import (
    BACKGROUND_PHRASES,
    BACKGROUNDS,
    COLORS,
    MAX_OBJECTS,
    SHAPES,
    SIZES,
    STYLES,
    TEXTURES,
)

# OmniEdit's seven task kinds (Wei et al., 2024), named as in our `task` column.
EDIT_TASKS: tuple[str, ...] = (
    "object_replacement",
    "object_removal",
    "object_addition",
    "attribute_modification",
    "background_swap",
    "environment_change",
    "style_transfer",
)

TEXTURE_INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "plain": ("Make the background plain.", "Remove the pattern from the background.", "Clean up the background so it is a flat colour."),
    "grainy": ("Add film grain to the background.", "Make the background grainy.", "Give the backdrop a noisy, grainy look."),
    "striped": ("Add soft diagonal stripes to the background.", "Put a striped pattern on the background.", "Make the backdrop striped."),
    "checkered": ("Put a faint checkered pattern on the background.", "Make the floor checkered.", "Add a checkerboard texture behind the shapes."),
    "dusk": ("Make it look like dusk.", "Change the lighting to a warm evening glow.", "Make the scene look like it is lit at sunset."),
}
STYLE_INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "flat": ("Render the shapes flat, without outlines or highlights.", "Make every shape a plain flat fill.", "Change the style to flat colours."),
    "outline": ("Draw the shapes as hollow outlines.", "Turn every shape into an outline.", "Change the style so the shapes are outlined and empty inside."),
    "glossy": ("Make the shapes glossy.", "Give every shape a shiny highlight.", "Change the style to glossy, shiny shapes."),
}


@dataclass(frozen=True)
class EditPair:
    task: str
    source: Scene
    edited: Scene
    instructions: tuple[str, ...]
    # Indices into source.objects that the edit touches (removal/replacement/attribute); -1 = added object.
    touched_objects: tuple[int, ...] = ()


def referring_expression(scene: Scene, index: int) -> str | None:
    """The shortest unambiguous way to name object ``index`` ('the circle', 'the red circle', ...)."""
    target = scene.objects[index]
    others = [obj for i, obj in enumerate(scene.objects) if i != index]
    if all(obj.shape != target.shape for obj in others):
        return f"the {target.shape}"
    if all((obj.color, obj.shape) != (target.color, target.shape) for obj in others):
        return f"the {target.color} {target.shape}"
    same = [obj for obj in others if (obj.color, obj.shape) == (target.color, target.shape)]
    if all(region_phrase(obj) != region_phrase(target) for obj in same):
        return f"the {target.color} {target.shape} {region_phrase(target)}"
    return None


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _refer(rng: np.random.Generator, scene: Scene) -> tuple[int, str] | None:
    candidates = [(i, ref) for i in range(len(scene.objects)) if (ref := referring_expression(scene, i))]
    return _pick(rng, candidates) if candidates else None


def _phrasings(rng: np.random.Generator, templates: tuple[str, ...], **words) -> tuple[str, ...]:
    order = rng.permutation(len(templates))
    return tuple(templates[i].format(**words) for i in order)


def _fits_in_place(new: ShapeObject, objects: list[ShapeObject], index: int) -> bool:
    """Whether ``new`` fits where ``objects[index]`` stands, among all the other objects."""
    return fits(new, objects[:index] + objects[index + 1 :])


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def make_edit(scene: Scene, task: str, rng: np.random.Generator) -> EditPair | None:
    """One edit of kind ``task`` applied to ``scene``, or None when the scene does not allow it."""
    objects = list(scene.objects)
    if task == "object_replacement":
        picked = _refer(rng, scene)
        if picked is None:
            return None
        index, ref = picked
        old = objects[index]
        shape = _pick(rng, [s for s in SHAPES if s != old.shape])
        color = old.color if rng.random() < 0.5 else _pick(rng, COLORS)
        new = ShapeObject(shape, color, old.size, old.x, old.y)
        if not _fits_in_place(new, objects, index):
            return None
        objects[index] = new
        thing = f"{article(color)} {color} {shape}"
        instructions = _phrasings(
            rng, ("Replace {ref} with {thing}.", "Swap {ref} for {thing}.", "Turn {ref} into {thing}.", "Change {ref} into {thing}."),
            ref=ref, thing=thing,
        )
        return EditPair(task, scene, scene.replace(objects=tuple(objects)), instructions, (index,))
    if task == "object_removal":
        picked = _refer(rng, scene) if len(objects) >= 2 else None
        if picked is None:
            return None
        index, ref = picked
        del objects[index]
        instructions = _phrasings(
            rng, ("Remove {ref}.", "Delete {ref} from the image.", "Take away {ref}.", "Erase {ref}."), ref=ref
        )
        return EditPair(task, scene, scene.replace(objects=tuple(objects)), instructions, (index,))
    if task == "object_addition":
        if len(objects) >= MAX_OBJECTS:
            return None
        new = place_object(rng, _pick(rng, SHAPES), _pick(rng, COLORS), _pick(rng, SIZES[:2]), objects)
        if new is None:
            return None
        thing = f"{article(new.size)} {new.size} {new.color} {new.shape}"
        where = region_phrase(new)
        instructions = _phrasings(
            rng, ("Add {thing} {where}.", "Put {thing} {where}.", "Place {thing} {where}.", "Draw {thing} {where}."),
            thing=thing, where=where,
        )
        return EditPair(task, scene, scene.replace(objects=tuple(objects + [new])), instructions, (-1,))
    if task == "attribute_modification":
        picked = _refer(rng, scene)
        if picked is None:
            return None
        index, ref = picked
        old = objects[index]
        if rng.random() < 0.7:
            color = _pick(rng, [c for c in COLORS if c != old.color])
            objects[index] = ShapeObject(old.shape, color, old.size, old.x, old.y)
            templates = ("Make {ref} {value}.", "Change the color of {ref} to {value}.", "Recolor {ref} {value}.", "Paint {ref} {value}.")
            value = color
        else:
            step = 1 if rng.random() < 0.5 else -1
            size_index = SIZES.index(old.size) + step
            if not 0 <= size_index < len(SIZES):
                step, size_index = -step, SIZES.index(old.size) - step
            new = ShapeObject(old.shape, old.color, SIZES[size_index], old.x, old.y)
            if not _fits_in_place(new, objects, index):
                return None
            objects[index] = new
            value = "bigger" if step > 0 else "smaller"
            templates = ("Make {ref} {value}.", "Make {ref} a bit {value}.", "Resize {ref} so it is {value}.")
        instructions = _phrasings(rng, templates, ref=ref, value=value)
        return EditPair(task, scene, scene.replace(objects=tuple(objects)), instructions, (index,))
    if task == "background_swap":
        background = _pick(rng, [b for b in BACKGROUNDS if b != scene.background])
        phrase = BACKGROUND_PHRASES[background]
        instructions = _phrasings(
            rng,
            ("Change the background to {bg}.", "Make the background {bg}.", "Replace the background with {a} {bg} one.", "Swap the backdrop for {a} {bg} one."),
            bg=phrase, a=article(phrase),
        )
        return EditPair(task, scene, scene.replace(background=background), instructions)
    if task == "environment_change":
        texture = _pick(rng, [t for t in TEXTURES if t != scene.texture])
        instructions = _phrasings(rng, TEXTURE_INSTRUCTIONS[texture])
        return EditPair(task, scene, scene.replace(texture=texture), instructions)
    if task == "style_transfer":
        style = _pick(rng, [s for s in STYLES if s != scene.style])
        instructions = _phrasings(rng, STYLE_INSTRUCTIONS[style])
        return EditPair(task, scene, scene.replace(style=style), instructions)
    raise ValueError(f"unknown edit task {task!r}; choose one of {', '.join(EDIT_TASKS)}")


def sample_edit(rng: np.random.Generator, scene_sampler, task: str | None = None) -> EditPair:
    """Draw scenes until one admits an edit of ``task`` (or of a random task)."""
    while True:
        chosen = task or _pick(rng, EDIT_TASKS)
        edit = make_edit(scene_sampler(rng), chosen, rng)
        if edit is not None:
            return EditPair(edit.task, edit.source, edit.edited, tuple(_capitalize(i) for i in edit.instructions), edit.touched_objects)


def task_counts(edits) -> Counter:
    return Counter(edit.task for edit in edits)

"""The Shapes world: deterministic scenes and renders, captions, edit pairs, prompt files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data.shapes.captions import captions_for, long_caption, short_caption
from data.shapes.edits import EDIT_TASKS, make_edit, referring_expression, sample_edit
from data.shapes.prompts import DPG_COLUMNS, dpg_items, geneval_prompts, scene_for_spec
from data.shapes.render import render_scene_array
from data.shapes.scene import BORDER_MARGIN, Scene, ShapeObject, boxes_overlap, sample_scene
from data.shapes.vocabulary import BACKGROUND_RGB, COLOR_RGB, COLORS, MAX_OBJECTS, SHAPES
from eval.geneval_rules import GENEVAL_TAGS


def test_same_seed_same_scene_and_pixels():
    for seed in range(5):
        assert sample_scene(seed) == sample_scene(seed)
        assert np.array_equal(render_scene_array(sample_scene(seed), 64), render_scene_array(sample_scene(seed), 64))
    assert sample_scene(1) != sample_scene(2)


def test_scenes_are_valid_and_cover_the_world():
    scenes = [sample_scene(seed) for seed in range(400)]
    counts = {len(scene.objects) for scene in scenes}
    assert counts == set(range(1, MAX_OBJECTS + 1))
    assert {obj.shape for s in scenes for obj in s.objects} == set(SHAPES)
    assert {obj.color for s in scenes for obj in s.objects} == set(COLORS)
    for scene in scenes:
        for i, obj in enumerate(scene.objects):
            x1, y1, x2, y2 = obj.box
            assert BORDER_MARGIN <= x1 and x2 <= 1 - BORDER_MARGIN and BORDER_MARGIN <= y1 and y2 <= 1 - BORDER_MARGIN
            for other in scene.objects[i + 1 :]:
                assert not boxes_overlap(obj.box, other.box)


def test_scene_dict_round_trip():
    scene = sample_scene(7)
    assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene


@pytest.mark.parametrize("resolution", [32, 64, 256])
def test_render_any_resolution_draws_objects_in_their_boxes(resolution):
    scene = Scene((ShapeObject("square", "red", "large", 0.3, 0.3), ShapeObject("circle", "blue", "medium", 0.7, 0.7)), "gray")
    pixels = render_scene_array(scene, resolution)
    assert pixels.shape == (resolution, resolution, 3) and pixels.dtype == np.uint8
    assert tuple(pixels[int(0.3 * resolution), int(0.3 * resolution)]) == COLOR_RGB["red"]
    assert tuple(pixels[int(0.7 * resolution), int(0.7 * resolution)]) == COLOR_RGB["blue"]
    assert tuple(pixels[1, 1]) == BACKGROUND_RGB["gray"]


def test_palette_keeps_luminance_contrast():
    """Every object colour differs from every background in luminance, which survives JPEG."""
    luminance = lambda rgb: 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]  # noqa: E731
    gaps = [abs(luminance(COLOR_RGB[c]) - luminance(BACKGROUND_RGB[b])) for c in COLOR_RGB for b in BACKGROUND_RGB]
    assert min(gaps) >= 29


def test_captions_are_true_of_the_scene():
    scene = Scene(
        (ShapeObject("circle", "red", "medium", 0.2, 0.5), ShapeObject("circle", "red", "small", 0.5, 0.2),
         ShapeObject("square", "blue", "large", 0.75, 0.7)),
        "tan", "striped", "outline",
    )
    assert short_caption(scene) == "a photo of two red circles and a blue square"
    text = long_caption(scene)
    assert text.startswith("The image shows three outlined, hollow shapes on a softly striped tan background.")
    assert "a medium red circle on the left" in text and "a large blue square in the bottom right" in text
    captions = captions_for(scene, np.random.default_rng(0))
    assert set(captions) == {"caption_llava", "caption_llava_short", "txt"}


def test_two_object_caption_with_relation_follows_geneval_rule():
    scene = Scene((ShapeObject("star", "green", "small", 0.2, 0.5), ShapeObject("cross", "black", "small", 0.8, 0.5)))
    seen = {short_caption(scene, np.random.default_rng(seed)) for seed in range(20)}
    assert "a photo of a green star left of a black cross" in seen
    assert not any("right of" in caption for caption in seen)


@pytest.mark.parametrize("task", EDIT_TASKS)
def test_edit_pairs_change_exactly_what_they_say(task):
    rng = np.random.default_rng(0)
    for _ in range(20):
        edit = sample_edit(rng, sample_scene, task)
        source, edited = edit.source, edit.edited
        assert edit.task == task and len(set(edit.instructions)) >= 3
        if task == "object_removal":
            assert len(edited.objects) == len(source.objects) - 1
        elif task == "object_addition":
            assert len(edited.objects) == len(source.objects) + 1 and edited.objects[:-1] == source.objects
        elif task in ("object_replacement", "attribute_modification"):
            (index,) = edit.touched_objects
            assert edited.objects[index] != source.objects[index]
            assert [o for i, o in enumerate(edited.objects) if i != index] == [o for i, o in enumerate(source.objects) if i != index]
            kept = edited.objects[index]
            assert (kept.x, kept.y) == (source.objects[index].x, source.objects[index].y)
        else:
            assert edited.objects == source.objects
            field = {"background_swap": "background", "environment_change": "texture", "style_transfer": "style"}[task]
            assert getattr(edited, field) != getattr(source, field)
            assert edited.replace(**{field: getattr(source, field)}) == source


def test_referring_expressions_are_unambiguous():
    scene = Scene((ShapeObject("circle", "red", "small", 0.2, 0.2), ShapeObject("circle", "blue", "small", 0.8, 0.8),
                   ShapeObject("square", "red", "small", 0.2, 0.8)))
    assert referring_expression(scene, 2) == "the square"
    assert referring_expression(scene, 0) == "the red circle"
    removal = make_edit(scene, "object_removal", np.random.default_rng(1))
    assert removal is not None and any(word in removal.instructions[0] for word in ("square", "red circle", "blue circle"))


def test_geneval_prompt_file_has_geneval_schema():
    prompts = geneval_prompts(seed=0)
    assert {p["tag"] for p in prompts} == set(GENEVAL_TAGS)
    for prompt in prompts:
        assert set(prompt) <= {"tag", "include", "exclude", "prompt"}
        for requirement in prompt["include"]:
            assert set(requirement) <= {"class", "count", "color", "position"} and requirement["class"] in SHAPES
        if prompt["tag"] == "counting":
            (include,), (exclude,) = prompt["include"], prompt["exclude"]
            assert exclude == {"class": include["class"], "count": include["count"] + 1}
        if prompt["tag"] == "position":
            relation, group = prompt["include"][1]["position"]
            assert group == 0 and f" {relation} " in prompt["prompt"]
    assert geneval_prompts(seed=0) == prompts
    assert len({p["prompt"] for p in prompts}) == len(prompts)


def test_scene_for_spec_satisfies_the_spec_exactly():
    from data.shapes.captions import relations_between

    spec = {"tag": "position", "include": [{"class": "square", "count": 1}, {"class": "star", "count": 1, "position": ["above", 0]}],
            "prompt": "a photo of a star above a square"}
    for seed in range(10):
        scene = scene_for_spec(spec, seed)
        square, star = scene.objects
        assert (square.shape, star.shape) == ("square", "star")
        assert "above" in relations_between(star, square)
    counting = {"tag": "counting", "include": [{"class": "cross", "count": 4}], "exclude": [{"class": "cross", "count": 5}], "prompt": ""}
    assert [o.shape for o in scene_for_spec(counting, 0).objects] == ["cross"] * 4


def test_dpg_rows_have_dpg_columns_and_dependencies():
    scene = Scene((ShapeObject("circle", "red", "small", 0.2, 0.5), ShapeObject("circle", "red", "small", 0.5, 0.2),
                   ShapeObject("star", "blue", "small", 0.8, 0.5)))
    rows = dpg_items(scene, "item0")
    assert all(tuple(row) == DPG_COLUMNS for row in rows)
    by_id = {row["proposition_id"]: row for row in rows}
    entity_ids = {row["proposition_id"] for row in rows if row["category_broad"] == "entity"}
    assert {json.loads(by_id[i]["program"])["shape"] for i in entity_ids} == {"circle", "star"}
    for row in rows:
        if row["category_broad"] == "entity":
            assert row["dependency"] == "0"
        else:
            assert {int(d) for d in row["dependency"].split(",")} <= entity_ids
    assert any(row["question_natural_language"] == "Are there two circles?" for row in rows)


def test_scene_for_spec_respects_restricted_sampling():
    from data.shapes.scene import SceneSampling

    sampling = SceneSampling(backgrounds=("slate",), textures=("plain",), styles=("outline",), texture_weights=None, style_weights=None)
    spec = {"tag": "single_object", "include": [{"class": "star", "count": 1}], "prompt": "a photo of a star"}
    for seed in range(10):
        scene = scene_for_spec(spec, seed, sampling)
        assert (scene.background, scene.texture, scene.style) == ("slate", "plain", "outline")

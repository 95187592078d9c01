"""Shapes suite scoring: an oracle that draws exactly what was asked scores (near) perfectly, a model that
ignores its input does not; the DPG dependency rule zeroes children of failed questions."""

from __future__ import annotations

import numpy as np

from data.shapes.prompts import dpg_questions, dpg_scenes
from data.shapes.render import render_scene
from eval.shapes_suite import (
    dpg_item_score,
    edit_adherence,
    edit_consistency_psnr,
    evaluate_shapes_dpg,
    shapes_edit_pairs,
)


class DenseOracle:
    """Draws the scene behind each dense prompt (the harness's upper bound)."""

    def __init__(self, num_items: int):
        scenes = dpg_scenes(num_items, seed=0)
        texts = {row["item_id"]: row["text"] for row in dpg_questions(num_items, seed=0)}
        self.by_text = {texts[f"shapes{index:04d}"]: scene for index, scene in enumerate(scenes)}

    def __call__(self, prompts, seed, **sampling):
        return [render_scene(self.by_text[prompt], 64) for prompt in prompts]


def test_dpg_oracle_scores_near_100_and_a_blank_image_scores_0():
    result = evaluate_shapes_dpg(DenseOracle(6), num_items=6, images_per_item=2, progress=False)
    assert result["items"] == 6 and result["score"] >= 95.0
    blank = render_scene(dpg_scenes(1)[0].replace(objects=()), 64)
    rows = [row for row in dpg_questions(1) if row["item_id"] == "shapes0000"]
    score, by_question = dpg_item_score(blank, rows)
    assert score == 0.0 and set(by_question.values()) == {0.0}


def test_dependency_rule_zeroes_children_of_a_failed_parent():
    scene = dpg_scenes(3)[2]
    rows = [row for row in dpg_questions(3) if row["item_id"] == "shapes0002"]
    # Remove one shape kind entirely: its entity question fails, so its colour/count/relation questions score 0
    # even where (for relations) another object could have answered them.
    missing = scene.objects[0].shape
    image = render_scene(scene.replace(objects=tuple(obj for obj in scene.objects if obj.shape != missing)), 64)
    _, by_question = dpg_item_score(image, rows)
    failed_entity = next(int(row["proposition_id"]) for row in rows if row["category_broad"] == "entity" and f"({missing})" in row["tuple"])
    assert by_question[failed_entity] == 0.0
    children = [int(row["proposition_id"]) for row in rows if str(failed_entity) in str(row["dependency"]).split(",")]
    assert children and all(by_question[child] == 0.0 for child in children)


def test_edit_scores_reward_the_target_and_not_the_unchanged_source():
    pairs = shapes_edit_pairs(14, seed=0)
    assert sorted({edit.task for edit in pairs}) == sorted({
        "object_replacement", "object_removal", "object_addition", "attribute_modification", "background_swap",
        "environment_change", "style_transfer"})
    perfect = [edit_adherence(render_scene(edit.edited, 64), edit) for edit in pairs]
    unchanged = [edit_adherence(render_scene(edit.source, 64), edit) for edit in pairs]
    assert np.mean(perfect) >= 0.9 and np.mean(unchanged) <= 0.2
    # The unchanged source is perfectly consistent outside the edit; a blank image is not.
    edit = pairs[0]
    assert edit_consistency_psnr(render_scene(edit.edited, 64), edit) > 60
    assert edit_consistency_psnr(render_scene(edit.source.replace(objects=()), 64), edit) < edit_consistency_psnr(render_scene(edit.source, 64), edit)


def test_edit_ceiling_scores_the_targets_and_their_tokenizer_round_trips(generator_parts, tmp_path, capsys):
    import json

    from eval.shapes_suite import evaluate_shapes_edit_ceilings, score_edits
    from tokenizer.model import SemanticAutoencoder
    from unimm.cli import main

    tokenizer = SemanticAutoencoder.from_pretrained(generator_parts[0])
    size = tokenizer.config.image_size
    pairs = shapes_edit_pairs(14, seed=0)
    ceilings = evaluate_shapes_edit_ceilings(tokenizer, 14, batch_size=4)
    # The "judge" reader is exactly the score of the target renders; a perfect output leaves nothing to lose.
    assert ceilings["judge"] == score_edits(pairs, [render_scene(edit.edited, size) for edit in pairs])
    assert ceilings["judge"]["pairs"] == 14 and ceilings["judge"]["consistency_psnr"] > 60
    # An untrained tokenizer's round trips lose the scenes.
    assert ceilings["tokenizer"]["adherence"] < ceilings["judge"]["adherence"]
    assert ceilings["tokenizer"]["consistency_psnr"] < 40

    out = tmp_path / "edit-ceiling.json"
    assert main(["eval", "shapes", "--tokenizer", str(generator_parts[0]), "--suites", "edit-ceiling", "--edit-pairs", "7",
                 "--out", str(out)]) == 0
    scores = json.loads(out.read_text())["scores"]
    assert set(scores["shapes_edit_ceiling_tokenizer_adherence_by_task"]) == {edit.task for edit in pairs}
    assert 0.0 <= scores["shapes_edit_ceiling_tokenizer_adherence"] <= scores["shapes_edit_ceiling_judge_adherence"]
    assert main(["eval", "shapes", "--suites", "edit-ceiling"]) == 2
    assert "edit-ceiling needs --tokenizer" in capsys.readouterr().err

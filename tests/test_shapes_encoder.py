"""The Shapes representation encoder (`unimm shapes train-encoder`): dense cell targets, training, real loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data.shapes.scene import Scene, ShapeObject
from data.shapes.vocabulary import COLORS, SHAPES
from tokenizer.encoders import RepresentationEncoder
from tokenizer.shapes_encoder import (
    ShapesEncoderConfig,
    ShapesProbeHeads,
    render_pool,
    scene_cell_labels,
    train_shapes_encoder,
)


def test_cell_labels_mark_exactly_the_cells_an_object_covers():
    # A large square centred in a 64-px image covers 0.30 * 64 = 19.2 px: x from 22.4 to 41.6.
    scene = Scene((ShapeObject("square", "blue", "large", 0.5, 0.5),))
    colors, shapes = scene_cell_labels(scene, 64, cells=32, threshold=0.5)  # 2-px cells
    covered = shapes != len(SHAPES)
    rows, cols = np.nonzero(covered)
    # Cells 11 (22-24 px, 80 % covered) to 20 (40-42 px, 80 % covered) in both directions, nothing else.
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (11, 20, 11, 20)
    assert covered.sum() == 10 * 10
    assert set(colors[covered]) == {COLORS.index("blue")} and set(shapes[covered]) == {SHAPES.index("square")}
    assert set(colors[~covered]) == {len(COLORS)}


def test_cell_labels_follow_the_object_that_covers_the_cell():
    scene = Scene((ShapeObject("circle", "red", "small", 0.25, 0.5), ShapeObject("star", "green", "medium", 0.75, 0.5)))
    colors, shapes = scene_cell_labels(scene, 64, cells=16)  # 4-px cells; centres at pixels (16, 32) and (48, 32)
    assert shapes[8, 4] == SHAPES.index("circle") and colors[8, 4] == COLORS.index("red")
    assert shapes[8, 12] == SHAPES.index("star") and colors[8, 12] == COLORS.index("green")
    assert shapes[0, 0] == len(SHAPES) and shapes[8, 8] == len(SHAPES)


@pytest.mark.parametrize("subpatch_grid", [1, 4])
def test_dense_logits_are_laid_out_as_the_cell_map(subpatch_grid):
    """Each patch token's s*s cell predictions land on its own s x s block of the cell map."""
    heads = ShapesProbeHeads(hidden_size=4, subpatch_grid=subpatch_grid)
    tokens = torch.zeros(1, 9, 4)  # a 3 x 3 grid of patches
    tokens[0, 5, 0] = 1.0  # patch (row 1, col 2)
    with torch.no_grad():
        heads.cell_color.weight.zero_()
        heads.cell_color.bias.zero_()
        heads.cell_color.weight[:, 0] = 1.0  # every logit of the marked patch is 1, every other 0
    logits = heads._cell_logits(heads.cell_color, tokens)  # (1, 3s, 3s, K)
    s = subpatch_grid
    marked = logits[0, ..., 0] == 1.0
    expected = torch.zeros(3 * s, 3 * s, dtype=torch.bool)
    expected[s:2 * s, 2 * s:3 * s] = True
    assert torch.equal(marked, expected)


def test_training_learns_and_saves_a_loadable_dinov2(tmp_path):
    config = ShapesEncoderConfig(
        output_dir=str(tmp_path / "encoder"), resolution=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2,
        mlp_ratio=2, subpatch_grid=2, num_train_scenes=256, num_val_scenes=64, steps=60, batch_size=32,
        learning_rate=2e-3, warmup_steps=5, log_every=1,
    )
    losses = []

    def log(line: str) -> None:
        if line.startswith("step "):
            losses.append(float(line.split("loss=")[1].split()[0]))

    metrics = train_shapes_encoder(config, log=log)
    assert len(losses) == config.steps
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5])
    accuracy = metrics["val_accuracy"]
    assert {"cell_color", "cell_shape", "cell_color_on_objects", "cell_shape_on_objects", "count"} <= set(accuracy)
    assert accuracy["cell_color"] > 0.8  # background cells alone are most of the map; the heads learnt them

    saved = json.loads((tmp_path / "encoder" / "shapes_encoder_metrics.json").read_text())
    assert saved["config"]["subpatch_grid"] == 2
    encoder = RepresentationEncoder.from_pretrained(str(tmp_path / "encoder"))
    assert encoder.kind == "dinov2"
    images, _ = render_pool(3, seed=5, config=config)
    assert encoder.patch_tokens(images).shape == (3, 16, 32)


def test_cli_refuses_a_subpatch_grid_that_does_not_divide_the_patch(tmp_path, capsys):
    from unimm.cli import main

    code = main(["shapes", "train-encoder", f"output_dir={tmp_path}", "subpatch_grid=3"])
    assert code == 2
    assert "subpatch_grid=3 must be a divisor of patch_size=8" in capsys.readouterr().err

"""Linear probes: the fit, feature pooling, Shapes labels from scene graphs, class labels and
``unimm eval linprobe`` on a tiny Shapes dataset."""

from __future__ import annotations

import json

import pytest
import torch

from data.shapes.scene import Scene, ShapeObject
from eval.linear_probe import (
    encode_class_labels,
    extract_pooled_features,
    extract_probe_features,
    fit_linear_probe,
    object_area,
    rendered_areas,
    shapes_probe_targets,
)


def blobs(num: int, dim: int, classes: int, seed: int, spread: float = 0.3):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * 2
    labels = torch.arange(num) % classes
    return centres[labels] + spread * torch.randn(num, dim, generator=generator), labels


def test_probe_separates_linearly_separable_classes():
    train_x, train_y = blobs(300, 64, 4, seed=0)
    val_x, val_y = blobs(120, 64, 4, seed=1)
    result = fit_linear_probe(train_x, train_y, val_x, val_y, 4, epochs=30, seed=0)
    assert result["train_accuracy"] == 1.0 and result["val_accuracy"] >= 0.99
    assert result["feature_dim"] == 64 and set(result["weight_decay_selection"]) == {"0.0001", "0.001", "0.01", "0.1", "1"}
    assert result["weight_decay"] in (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def test_probe_is_at_chance_on_shuffled_labels_and_deterministic():
    train_x, _ = blobs(200, 256, 2, seed=2, spread=1.0)
    val_x, _ = blobs(400, 256, 2, seed=3, spread=1.0)
    generator = torch.Generator().manual_seed(4)
    train_y, val_y = torch.randint(0, 2, (200,), generator=generator), torch.randint(0, 2, (400,), generator=generator)
    first = fit_linear_probe(train_x, train_y, val_x, val_y, 2, epochs=20, seed=7)
    assert 0.4 <= first["val_accuracy"] <= 0.6
    assert fit_linear_probe(train_x, train_y, val_x, val_y, 2, epochs=20, seed=7) == first
    fixed = fit_linear_probe(train_x, train_y, val_x, val_y, 2, epochs=20, weight_decay=0.01)
    assert fixed["weight_decay"] == 0.01 and fixed["weight_decay_selection"] is None


def test_probe_rejects_labels_outside_the_classes():
    x, y = blobs(10, 4, 2, seed=0)
    with pytest.raises(ValueError, match="labels must lie"):
        fit_linear_probe(x, y + 1, x, y, 2)


def test_feature_pooling_flatten_and_gap():
    batches = [torch.zeros(2, 3, 8, 8), {"image": torch.ones(3, 3, 8, 8)}]

    def feature_fn(images):  # (B, 5, 2, 2)
        return F_pool(images)

    features = extract_pooled_features(batches, feature_fn, ["flatten", "gap"])
    assert features["flatten"].shape == (5, 20) and features["gap"].shape == (5, 5)
    assert torch.allclose(features["gap"], features["flatten"].reshape(5, 5, 4).mean(2))
    assert torch.equal(extract_probe_features(batches, feature_fn, "gap"), features["gap"])


def F_pool(images):
    pooled = torch.nn.functional.avg_pool2d(images, 4)  # (B, 3, 2, 2)
    extra = torch.arange(8, dtype=torch.float32).reshape(1, 2, 2, 2).expand(images.shape[0], -1, -1, -1)
    return torch.cat([pooled, extra], 1)


# ----------------------------------------------------------------------------------------------------
# Shapes labels
# ----------------------------------------------------------------------------------------------------
def scene(*objects, style="flat") -> dict:
    return Scene(tuple(ShapeObject(*obj) for obj in objects), style=style).to_dict()


def test_shapes_targets_read_count_and_the_largest_object():
    targets = shapes_probe_targets(scene(("circle", "blue", "small", 0.2, 0.2), ("square", "red", "large", 0.6, 0.6)))
    assert targets == {"count": 1, "color": 0, "shape": 1}  # red square


def test_largest_means_rendered_area_not_size_word():
    # A large star paints less than a medium square: the square is the largest object.
    assert object_area("star", "large", "flat") < object_area("square", "medium", "flat")
    targets = shapes_probe_targets(scene(("star", "yellow", "large", 0.3, 0.3), ("square", "green", "medium", 0.75, 0.75),
                                         ("circle", "black", "small", 0.75, 0.25)))
    assert targets == {"count": 2, "color": 3, "shape": 1}


def test_equal_areas_tie_to_the_top_most_then_left_most_object():
    lower = ("circle", "pink", "medium", 0.3, 0.7)
    upper = ("circle", "purple", "medium", 0.7, 0.3)
    for objects in ((lower, upper), (upper, lower)):  # list order does not matter
        assert shapes_probe_targets(scene(*objects))["color"] == 5  # purple: smaller y
    left = ("triangle", "orange", "medium", 0.3, 0.5)
    right = ("triangle", "brown", "medium", 0.7, 0.5)
    assert shapes_probe_targets(scene(right, left))["color"] == 1  # orange: smaller x


def test_occlusion_reduces_the_visible_area():
    # A large square mostly hidden under a later large circle: the circle is the largest visible object.
    hidden = ("square", "white", "large", 0.45, 0.45)
    cover = ("circle", "blue", "large", 0.5, 0.5)
    areas = rendered_areas(Scene.from_dict(scene(hidden, cover)))
    assert areas[0] < object_area("square", "large", "flat") / 2 and areas[1] == object_area("circle", "large", "flat")
    assert shapes_probe_targets(scene(hidden, cover))["shape"] == 0
    # Without the overlap the square wins.
    assert shapes_probe_targets(scene(("square", "white", "large", 0.25, 0.25), ("circle", "blue", "large", 0.75, 0.75)))["shape"] == 1


def test_outline_style_changes_areas_consistently():
    assert object_area("square", "large", "outline") < object_area("square", "large", "flat")
    assert object_area("circle", "medium", "glossy") == object_area("circle", "medium", "flat")
    targets = shapes_probe_targets(scene(("square", "red", "small", 0.2, 0.2), ("star", "blue", "large", 0.7, 0.7), style="outline"))
    assert targets["color"] == 4  # the large outlined star still paints more than a small outlined square


def test_class_labels_from_integers_or_names():
    assert encode_class_labels(["3", 1], [0]) == ([3, 1], [0], 4, None)
    train, val, count, names = encode_class_labels(["dog", "cat"], ["eel"])
    assert names == ["cat", "dog", "eel"] and (train, val, count) == ([1, 0], [2], 3)
    with pytest.raises(ValueError, match="no class label"):
        encode_class_labels([None], [1])


# ----------------------------------------------------------------------------------------------------
# The command, end to end, with real project classes
# ----------------------------------------------------------------------------------------------------
def test_linprobe_command_on_a_tiny_shapes_dataset(tmp_path, capsys):
    from data.shapes.dataset import ShapesDatasetConfig, write_shapes_dataset
    from tokenizer.encoders import RepresentationEncoder, tiny_encoder_config
    from unimm.cli import main

    write_shapes_dataset(ShapesDatasetConfig(resolution=32, num_train=40, num_val=12, num_edit_train=1, num_edit_val=1,
                                             num_dpg_items=1, samples_per_shard=25), tmp_path / "shapes", progress=False)
    torch.manual_seed(0)
    RepresentationEncoder.from_config(tiny_encoder_config("dinov2", image_size=32, patch_size=8, hidden_size=32, layers=2)
                                      ).save_pretrained(str(tmp_path / "encoder"))
    out = tmp_path / "probe.json"
    argv = ["eval", "linprobe", "--encoder", str(tmp_path / "encoder"), "--train", str(tmp_path / "shapes" / "t2i" / "train"),
            "--val", str(tmp_path / "shapes" / "t2i-parquet" / "val"), "--epochs", "10", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| target | pool | classes |" in printed and "| count | flatten | 6 | 512 |" in printed
    payload = json.loads(out.read_text())
    assert payload["protocol"]["num_train"] == 40 and payload["protocol"]["num_val"] == 12
    assert payload["protocol"]["targets"] == ["count", "color", "shape"] and payload["protocol"]["resolution"] == 32
    rows = {(row["target"], row["pool"]): row for row in payload["results"]}
    assert set(rows) == {(t, p) for t in ("count", "color", "shape") for p in ("flatten", "gap")}
    assert rows[("color", "gap")]["num_classes"] == 10 and rows[("shape", "gap")]["feature_dim"] == 32
    assert all(0.0 <= row["val_accuracy"] <= 1.0 and row["num_val"] == 12 for row in rows.values())

    # Shapes shards have no class field: asking for one is a one-line error naming the field.
    from unimm.errors import UserError

    with pytest.raises(UserError, match="no class in field 'cls'"):
        from unimm.cli import build_parser

        args = build_parser().parse_args([*argv[:-2], "--targets", "cls", "--max-train", "4", "--max-val", "2"])
        args.handler(args)

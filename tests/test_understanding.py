"""Understanding retention in miniature: the QA checker, training, the frozen swap and the connector re-alignment."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data.shapes.scene import Scene, ShapeObject
from tokenizer.encoders import RepresentationEncoder, tiny_encoder_config
from unimm.cli import main
from unimm.understanding import (
    QUESTION_TYPES,
    UnderstandingConfig,
    UnderstandingModel,
    answer_question,
    applicable_questions,
    ask,
    encode_images,
    eval_questions,
    evaluate,
    load_encoder,
    qa_language,
    question_type,
    render_images,
    sample_scenes,
    train_steps,
)

TINY = dict(resolution=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=64, batch_size=16, warmup_steps=0, log_every=1)
TINY_OVERRIDES = [f"{key}={value}" for key, value in TINY.items()] + ["num_train_scenes=24", "num_eval_scenes=6", "steps=2"]


def _scene(*objects: tuple[str, str]) -> Scene:
    return Scene(tuple(ShapeObject(shape, color, "small", 0.15 + 0.25 * i, 0.5) for i, (shape, color) in enumerate(objects)))


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def _same(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    return before.keys() == after.keys() and all(torch.equal(before[name], after[name]) for name in before)


@pytest.fixture(scope="module")
def tiny_setup(encoders):
    """(config, train scenes, dinov2 features of them, eval scenes, their features, eval questions)."""
    config = UnderstandingConfig(**TINY, num_train_scenes=40, num_eval_scenes=8)
    encoder = load_encoder(encoders["dinov2"])
    train_scenes, eval_scenes = sample_scenes(40, 0, "train"), sample_scenes(8, 0, "eval")
    train_features = encode_images(encoder, render_images(train_scenes, 32))
    eval_features = encode_images(encoder, render_images(eval_scenes, 32))
    return config, train_scenes, train_features, eval_scenes, eval_features, eval_questions(eval_scenes, 0)


def test_generated_answers_are_the_checkers_answers_from_the_scene_graph():
    rng = np.random.default_rng(0)
    seen: dict[str, set[str]] = {kind: set() for kind in QUESTION_TYPES}
    for scene in sample_scenes(300, 7, "train"):
        for question in applicable_questions(scene, rng):
            assert answer_question(scene, question.text) == question.answer
            assert question_type(question.text) == question.kind
            seen[question.kind].add(question.answer)
    assert seen["exists"] == seen["color_exists"] == {"yes", "no"}
    assert {"zero", "one", "two"} <= seen["shape_count"] and {"zero", "one", "two"} <= seen["color_count"]
    assert seen["total"] == {"one", "two", "three", "four", "five", "six"}
    assert len(seen["color"]) == 10 and len(seen["shape"]) == 5
    # A hand-made scene, checked by hand.
    scene = _scene(("star", "red"), ("star", "blue"), ("circle", "orange"))
    assert answer_question(scene, "how many stars are there?") == "two"
    assert answer_question(scene, "How many crosses are there?") == "zero"
    assert answer_question(scene, "how many objects are there?") == "three"
    assert answer_question(scene, "how many red objects are there?") == "one"
    assert answer_question(scene, "how many green objects are there?") == "zero"
    assert answer_question(scene, "is there an orange object?") == "yes"
    assert answer_question(scene, "is there a white object?") == "no"
    assert answer_question(scene, "what color is the circle?") == "orange"
    assert answer_question(scene, "what shape is the blue object?") == "star"
    assert answer_question(scene, "is there an orange circle?") == "yes"
    assert answer_question(scene, "is there a red circle?") == "no"
    with pytest.raises(ValueError, match="no single answer"):
        answer_question(scene, "what color is the star?")
    with pytest.raises(ValueError, match="not a question"):
        answer_question(scene, "where is the star?")
    with pytest.raises(ValueError, match="unknown word"):
        answer_question(scene, "how many teal objects are there?")
    # "color" / "shape" questions are only asked when their subject is unique.
    assert ask(_scene(("star", "red"), ("star", "red")), "color", rng) is None
    assert ask(_scene(("star", "red"), ("circle", "red")), "shape", rng) is None


def test_every_answer_is_one_token_and_eval_set_is_fixed(encoders):
    model = UnderstandingModel.build(UnderstandingConfig(**TINY), encoder_dim=32)
    for text in qa_language():
        assert model.tokenizer.unk_token_id not in model.token_ids(text)
    for scene in sample_scenes(20, 0, "eval"):
        for question in applicable_questions(scene, np.random.default_rng(0)):
            assert model.tokenizer.convert_ids_to_tokens(model.answer_id(question.answer)) == question.answer
    scenes = sample_scenes(5, 0, "eval")
    assert eval_questions(scenes, 0) == eval_questions(sample_scenes(5, 0, "eval"), 0)
    assert sample_scenes(5, 0, "train") != scenes


def test_training_lowers_the_loss_deterministically(tiny_setup):
    config, train_scenes, train_features, *_ = tiny_setup
    runs = []
    for _ in range(2):
        model = UnderstandingModel.build(config, train_features.shape[-1])
        runs.append(train_steps(model, train_features, train_scenes, steps=40, batch_size=16, learning_rate=3e-3, seed=0))
    assert runs[0] == runs[1]
    losses = runs[0]
    assert np.mean(losses[-8:]) < np.mean(losses[:8]) - 0.5


def test_swap_keeps_llm_and_connector_frozen_and_realign_moves_only_the_connector(tiny_setup, encoders):
    config, train_scenes, train_features, eval_scenes, eval_features, questions = tiny_setup
    model = UnderstandingModel.build(config, train_features.shape[-1])
    train_steps(model, train_features, train_scenes, steps=5, batch_size=16, learning_rate=3e-3, seed=0)
    llm, connector = _state(model.llm), _state(model.connector)
    swapped = load_encoder(encoders["siglip"])  # same width and grid, different features
    swapped_eval = encode_images(swapped, render_images(eval_scenes, 32))
    assert not torch.allclose(swapped_eval, eval_features)
    metrics = evaluate(model, swapped_eval, eval_scenes, questions)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["num_questions"] == len(questions)
    assert _same(llm, _state(model.llm)) and _same(connector, _state(model.connector))
    swapped_train = encode_images(swapped, render_images(train_scenes, 32))
    train_steps(model, swapped_train, train_scenes, steps=3, batch_size=16, learning_rate=3e-3, connector_only=True, seed=0)
    assert _same(llm, _state(model.llm))
    after = _state(model.connector)
    assert all(not torch.equal(connector[name], after[name]) for name in ("fc1.weight", "fc2.weight"))
    assert not any(parameter.requires_grad for parameter in model.parameters())


def test_load_encoder_takes_a_tokenizers_backbone(encoders, tmp_path):
    from tests.generator_fixtures import write_tiny_tokenizer

    tokenizer_dir = write_tiny_tokenizer(encoders, tmp_path, tmp_path)  # the Shapes paths are never read here
    backbone = load_encoder(tokenizer_dir)
    plain = load_encoder(encoders["dinov2"])
    images = render_images(sample_scenes(2, 0, "eval"), 32)
    assert torch.allclose(encode_images(backbone, images), encode_images(plain, images), atol=1e-5)
    assert not any(parameter.requires_grad for parameter in backbone.parameters())


def test_cli_train_then_swap_prints_the_table(encoders, tmp_path, capsys):
    out = tmp_path / "qa"
    assert main(["understanding", "train", "--encoder", str(encoders["dinov2"]), "-o", str(out), "--device", "cpu",
                 *TINY_OVERRIDES]) == 0
    metadata = json.loads((out / "understanding.json").read_text())
    trained = metadata["eval"]["accuracy"]
    assert metadata["encoder"] == str(encoders["dinov2"]) and metadata["config"]["steps"] == 2
    model, _ = UnderstandingModel.from_pretrained(out)
    before = _state(model)
    capsys.readouterr()
    result_path = tmp_path / "swap.json"
    assert main(["understanding", "swap", "--model", str(out), "--encoder", str(encoders["siglip"]), "--realign-steps", "2",
                 "--device", "cpu", "--out", str(result_path)]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| encoder | LLM | connector | accuracy |")
    assert len([line for line in table.splitlines() if line.startswith("| `")]) == 3
    assert "| none: answer prior (no image) |" in table
    result = json.loads(result_path.read_text())
    assert result["rows"][1]["accuracy"] == trained  # reloading reproduces the trained model's accuracy exactly
    assert [row["connector"] for row in result["rows"]] == ["-", "trained", "frozen", "re-aligned (2 steps)"]
    assert _same(before, _state(UnderstandingModel.from_pretrained(out)[0]))  # the saved model is never changed


def test_cli_errors_exit_2(encoders, tmp_path, capsys):
    narrow = tmp_path / "narrow"
    RepresentationEncoder.from_config(tiny_encoder_config("dinov2", hidden_size=48, layers=1), "dinov2").save_pretrained(str(narrow))
    out = tmp_path / "qa"
    assert main(["understanding", "train", "--encoder", str(encoders["dinov2"]), "-o", str(out), "--device", "cpu",
                 *TINY_OVERRIDES]) == 0
    capsys.readouterr()
    cases = [
        (["understanding", "train", "--encoder", str(tmp_path / "missing"), "-o", str(tmp_path / "x")], "config.json"),
        (["understanding", "train", "--encoder", str(encoders["dinov2"]), "-o", str(tmp_path / "x"), "stepz=3"], "stepz"),
        (["understanding", "train", "--encoder", str(encoders["dinov2"]), "-o", str(tmp_path / "x"), "steps"], "KEY=VALUE"),
        (["understanding", "train", "--encoder", str(encoders["dinov2"]), "-o", str(tmp_path / "x"), "merge=0"], "merge"),
        (["understanding", "swap", "--model", str(tmp_path), "--encoder", str(encoders["siglip"])], "understanding.json"),
        (["understanding", "swap", "--model", str(out), "--encoder", str(narrow), "--device", "cpu"], "48-d"),
        (["understanding", "swap", "--model", str(out), "--encoder", str(encoders["siglip"]), "--realign-steps", "-1"], "0 or more"),
    ]
    for argv, fragment in cases:
        assert main(argv) == 2, argv
        error = capsys.readouterr().err.strip().splitlines()
        assert error[-1].startswith(f"unimm understanding {argv[1]}: error:") and fragment in error[-1], error

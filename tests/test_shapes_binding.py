"""The binding probe (`unimm eval shapes --suites binding`, eval/shapes_binding.py) on tiny real pipelines."""

from __future__ import annotations

import json

import pytest

from eval.shapes_binding import evaluate_binding
from eval.shapes_generation import load_prompts
from tests.test_generator_training import t2i_config
from unimm.cli import main
from unimm.pipeline import UnimmPipeline
from unimm.trainer import GeneratorTrainer


@pytest.fixture(scope="module")
def tiny_pipeline(generator_parts, shapes, tmp_path_factory):
    run = tmp_path_factory.mktemp("binding") / "t2i"
    GeneratorTrainer(t2i_config(generator_parts, shapes, run, steps=3)).train()
    return run / "pipeline"


def test_a_text_blind_model_has_no_margin_and_never_prefers_the_prompt(tiny_pipeline):
    """A freshly built generator's head is zero-initialised, so its output ignores the caption: every margin is 0."""
    pipeline = UnimmPipeline.from_pretrained(tiny_pipeline, device="cpu")
    for parameter in pipeline.generator.head.final_layer.parameters():
        parameter.data.zero_()
    prompts = load_prompts(None, ["position", "color_attr"])[::20]
    result = evaluate_binding(pipeline, prompts, samples_per_prompt=2, timesteps=(0.9, 0.5), batch_size=8)
    assert set(result) == {"position", "color_attr"}
    for outcome in result.values():
        assert outcome["prefers_prompt"] == 0.0 and outcome["scenes"] > 0
        for values in outcome["by_t"].values():
            assert values["margin"] == 0.0 and values["caption_gain"] == 0.0 and values["binding_response"] == 0.0


def test_the_response_is_zero_when_the_negative_is_the_prompt_and_counts_every_swap_otherwise(tiny_pipeline, monkeypatch):
    """The response compares the prediction under the negative with the prompt's, as a share of the caption's effect."""
    import eval.shapes_binding as probe

    pipeline = UnimmPipeline.from_pretrained(tiny_pipeline, device="cpu")
    prompts = load_prompts(None, ["color_attr"])[::30]
    kwargs = dict(samples_per_prompt=1, timesteps=(0.9,), batch_size=8)
    swapped = evaluate_binding(pipeline, prompts, **kwargs)["color_attr"]
    assert 0.0 < swapped["binding_response"] == swapped["by_t"]["0.9"]["binding_response"]

    class SelfNegatives:
        def candidates(self, caption):
            return [caption]

    monkeypatch.setattr(probe, "shapes_caption_negatives", SelfNegatives)
    same = evaluate_binding(pipeline, prompts, **kwargs)["color_attr"]
    assert same["binding_response"] == 0.0 and same["by_t"]["0.9"]["margin"] == 0.0
    assert same["by_t"]["0.9"]["caption_gain"] == pytest.approx(swapped["by_t"]["0.9"]["caption_gain"])


def test_the_probe_runs_from_the_cli_and_writes_its_numbers(tiny_pipeline, tmp_path, capsys):
    out = tmp_path / "binding.json"
    assert main(["eval", "shapes", "--model", str(tiny_pipeline), "--suites", "binding", "--samples", "1", "--batch-size", "16",
                 "--tags", "position,color_attr", "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "binding: prefers the prompt over its negative" in printed
    scores = json.loads(out.read_text())["scores"]["shapes_binding"]
    assert scores["position"]["scenes"] == len(load_prompts(None, ["position"]))
    assert 0.0 <= scores["color_attr"]["prefers_prompt"] <= 1.0


def test_the_probe_needs_binding_prompts(tiny_pipeline, capsys):
    assert main(["eval", "shapes", "--model", str(tiny_pipeline), "--suites", "binding", "--tags", "counting", "--device", "cpu"]) == 2
    assert "keep the position or color_attr tags" in capsys.readouterr().err

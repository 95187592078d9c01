"""Shapes GenEval harness: prompts are filtered by tag, images are judged against their specs, scores are
per-tag fractions; a renderer that draws each prompt's scene scores 1, one that draws the wrong thing scores 0."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data.shapes.prompts import scene_for_spec
from data.shapes.render import render_scene
from eval.shapes_generation import evaluate_geneval, load_prompts
from unimm.errors import UserError


class SceneRenderer:
    """Draws the scene a prompt describes (or, with `wrong`, the scene of another prompt): the harness's oracle."""

    def __init__(self, prompts: list[dict], wrong: bool = False):
        self.specs = {spec["prompt"]: spec for spec in prompts}
        self.wrong = wrong
        self.calls = []

    def __call__(self, prompts, seed, **sampling):
        self.calls.append((list(prompts), list(seed), sampling))
        images = []
        for prompt, image_seed in zip(prompts, seed):
            spec = self.specs[prompt]
            if self.wrong:  # a circle prompt gets a square and vice versa
                other = "square" if spec["include"][0]["class"] == "circle" else "circle"
                spec = {**spec, "include": [{**spec["include"][0], "class": other}]}
            images.append(render_scene(scene_for_spec(spec, np.random.default_rng(image_seed)), 64))
        return images


def test_correct_images_pass_and_wrong_ones_fail(tmp_path):
    prompts = load_prompts(None, ["single_object", "colors"])
    assert {prompt["tag"] for prompt in prompts} == {"single_object", "colors"}
    subset = [prompt for prompt in prompts if prompt["include"][0]["class"] in ("circle", "square")][:6]
    right = evaluate_geneval(SceneRenderer(subset), subset, samples_per_prompt=2, batch_size=5, image_dir=tmp_path, progress=False)
    assert right["overall"] == 1.0 and right["images"] == 12
    assert all((tmp_path / record["image"]).is_file() for record in right["records"])
    wrong = evaluate_geneval(SceneRenderer(subset, wrong=True), subset, samples_per_prompt=1, progress=False)
    assert wrong["overall"] == 0.0


def test_seeds_and_sampling_options_reach_the_pipeline():
    prompts = load_prompts(None, ["single_object"])
    renderer = SceneRenderer(prompts)
    evaluate_geneval(renderer, prompts, samples_per_prompt=3, seed=10, batch_size=4, progress=False, steps=7, cfg=2.0)
    seeds = [seed for _, batch_seeds, _ in renderer.calls for seed in batch_seeds]
    assert sorted(seeds) == sorted([10, 11, 12] * len(prompts))
    assert all(sampling == {"steps": 7, "cfg": 2.0} for _, _, sampling in renderer.calls)


def test_prompt_files_and_bad_tags(tmp_path):
    file = tmp_path / "prompts.jsonl"
    file.write_text(json.dumps({"tag": "single_object", "include": [{"class": "star", "count": 1}], "prompt": "a photo of a star"}) + "\n")
    assert load_prompts(str(file))[0]["prompt"] == "a photo of a star"
    with pytest.raises(UserError, match="unknown tag"):
        load_prompts(str(file), ["counting"])
    with pytest.raises(UserError, match="does not exist"):
        load_prompts(str(tmp_path / "missing.jsonl"))
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(UserError, match="not JSON"):
        load_prompts(str(tmp_path / "broken.jsonl"))


def test_ceilings_true_scenes_pass_and_the_tokenizer_round_trip_is_scored(generator_parts, tmp_path, capsys):
    from eval.shapes_generation import RenderedSceneOracle, evaluate_geneval_ceilings
    from tokenizer.model import SemanticAutoencoder
    from unimm.cli import main

    tokenizer_dir = generator_parts[0]
    prompts = [prompt for prompt in load_prompts(None) if prompt["tag"] in ("single_object", "position")][::8]
    # True scenes, as the judge reads them: every prompt passes at 64 px.
    assert evaluate_geneval(RenderedSceneOracle(prompts, None, 64), prompts, 2, progress=False)["overall"] == 1.0
    tokenizer = SemanticAutoencoder.from_pretrained(tokenizer_dir)
    images = RenderedSceneOracle(prompts, tokenizer)([prompts[0]["prompt"]] * 2, seed=[0, 1])
    assert images[0].size == (tokenizer.config.image_size,) * 2 and images[0].tobytes() != images[1].tobytes()
    ceilings = evaluate_geneval_ceilings(tokenizer, prompts, 1, progress=False)
    assert set(ceilings) == {"judge", "tokenizer"}
    assert ceilings["tokenizer"]["images"] == len(prompts)
    assert ceilings["tokenizer"]["overall"] < 1.0  # an untrained tokenizer cannot keep the scenes

    out = tmp_path / "ceiling.json"
    assert main(["eval", "shapes", "--tokenizer", str(tokenizer_dir), "--suites", "ceiling", "--tags", "single_object",
                 "--samples", "1", "--out", str(out)]) == 0
    scores = json.loads(out.read_text())["scores"]
    assert scores["shapes_geneval_ceiling_judge_by_tag"] == {"single_object": pytest.approx(scores["shapes_geneval_ceiling_judge"])}
    assert main(["eval", "shapes", "--suites", "ceiling"]) == 2
    assert "needs --tokenizer" in capsys.readouterr().err

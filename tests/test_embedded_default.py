"""The embedded default: packaging trained pipelines as the shipped checkpoints (`unimm export shapes-default`),
`unimm generate` / `unimm edit` / `UnimmPipeline.from_pretrained()` falling back to them, `unimm demo`, and the
checkpoints actually shipped in checkpoints/shapes/."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from tests.generator_fixtures import tiny_generator_config
from unimm.cli import main
from unimm.pipeline import UnimmPipeline
from unimm.trainer import GeneratorTrainer

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "shapes"


@pytest.fixture(scope="module")
def packaged(generator_parts, shapes, tmp_path_factory):
    """A tiny run laid out as scripts/shapes_default.sh leaves it, exported with `unimm export shapes-default`."""
    tokenizer, text_model, edits = generator_parts
    run = tmp_path_factory.mktemp("shapes-default-run")
    GeneratorTrainer(tiny_generator_config(tokenizer, text_model, str(shapes / "t2i" / "train"), run / "t2i", steps=2)).train()
    GeneratorTrainer(tiny_generator_config(
        tokenizer, text_model, str(edits / "edit" / "train"), run / "edit", task="edit", data_format="parquet",
        init_from=str(run / "t2i" / "pipeline"), steps=2,
    )).train()
    assert main(["eval", "shapes", "--model", str(run / "t2i" / "pipeline"), "--suites", "geneval", "--tags", "single_object",
                 "--samples", "1", "--steps", "2", "--out", str(run / "t2i" / "shapes.json")]) == 0
    assert main(["eval", "shapes", "--model", str(run / "edit" / "pipeline"), "--suites", "edit", "--edit-pairs", "7",
                 "--steps", "2", "--out", str(run / "edit" / "shapes.json")]) == 0
    out = run / "checkpoints"
    assert main(["export", "shapes-default", "--run", str(run), "--tokenizer-run", str(run / "none"),
                 "--encoder-run", str(run / "none"), "-o", str(out)]) == 0
    return run, out


def test_export_writes_one_shared_half_precision_tokenizer_and_both_pipelines(packaged):
    run, out = packaged
    assert not (out / "t2i" / "tokenizer").exists() and not (out / "edit" / "tokenizer").exists()
    for name in ("t2i", "edit"):
        assert json.loads((out / name / "pipeline.json").read_text())["image_tokenizer"] == "../tokenizer"
        with safe_open(str(out / name / "generator.safetensors"), "pt") as handle:
            assert {handle.get_tensor(key).dtype for key in handle.keys()} == {torch.float16}
        assert (out / "logs" / name / "metrics.jsonl").is_file() and (out / "logs" / name / "config.yaml").is_file()
    with safe_open(str(out / "tokenizer" / "latent_statistics.safetensors"), "pt") as handle:
        assert handle.get_tensor("latent_var").dtype == torch.float32  # statistics keep full precision
    scores = json.loads((out / "scores.json").read_text())
    assert "shapes_geneval" in scores["text_to_image"]["scores"] and "shapes_edit_adherence" in scores["edit"]["scores"]
    assert "details" not in scores["text_to_image"]


def test_export_swaps_in_a_decoder_stage_tokenizer_and_refuses_another_latent_space(packaged, generator_parts, tmp_path, capsys):
    from tokenizer.model import SemanticAutoencoder

    run, _ = packaged
    original = SemanticAutoencoder.from_pretrained(generator_parts[0])
    tuned = SemanticAutoencoder.from_pretrained(generator_parts[0])
    with torch.no_grad():  # what the decoder stage changes, and only that
        for parameter in tuned.pixel_decoder.parameters():
            parameter.add_(0.01)
    assert original.latent_space_differences(tuned) == []
    tuned.save_pretrained(tmp_path / "decoder-run" / "tokenizer")
    out = tmp_path / "swapped"
    assert main(["export", "shapes-default", "--run", str(run), "--tokenizer-run", str(run / "none"), "--encoder-run",
                 str(run / "none"), "--decoder-run", str(tmp_path / "decoder-run"), "--dtype", "float32", "-o", str(out)]) == 0
    shipped = UnimmPipeline.from_pretrained(out / "t2i").image_tokenizer
    assert all(torch.equal(a, b) for a, b in zip(shipped.state_dict().values(), tuned.state_dict().values()))

    with torch.no_grad():
        tuned.latent_mean.add_(0.5)  # other statistics: the generators would be fed wrongly scaled latents
    assert original.latent_space_differences(tuned) == ["latent_mean"]
    tuned.save_pretrained(tmp_path / "other-run" / "tokenizer")
    assert main(["export", "shapes-default", "--run", str(run), "--tokenizer-run", str(run / "none"), "--encoder-run",
                 str(run / "none"), "--decoder-run", str(tmp_path / "other-run"), "-o", str(tmp_path / "refused")]) == 2
    assert "another latent space" in capsys.readouterr().err and not (tmp_path / "refused").exists()


def test_re_export_of_a_continued_run_keeps_the_earlier_logs(packaged, tmp_path, capsys):
    import shutil

    run, out = packaged
    shipped = tmp_path / "shipped"
    shutil.copytree(out, shipped)
    (shipped / "logs" / "encoder").mkdir()  # the history of a stage whose run directory is gone
    (shipped / "logs" / "encoder" / "metrics.jsonl").write_text('{"step": 1}\n')
    continued = tmp_path / "continued" / "t2i"
    shutil.copytree(run / "t2i", continued)
    (continued / "logs" / "metrics.jsonl").write_text('{"step": 7}\n')
    assert main(["export", "shapes-default", "--run", str(run), "--t2i-run", str(continued), "--log-tag", "continued",
                 "--tokenizer-run", str(run / "none"), "--encoder-run", str(run / "none"), "-o", str(shipped)]) == 0
    logs = shipped / "logs"
    assert sorted(path.name for path in logs.iterdir()) == ["edit", "edit-continued", "encoder", "t2i", "t2i-continued"]
    assert (logs / "t2i-continued" / "metrics.jsonl").read_text() == '{"step": 7}\n'
    assert (logs / "t2i" / "metrics.jsonl").read_text() == (run / "t2i" / "logs" / "metrics.jsonl").read_text()
    assert (logs / "encoder" / "metrics.jsonl").read_text() == '{"step": 1}\n'

    assert main(["export", "shapes-default", "--run", str(run), "--log-tag", "../x", "-o", str(tmp_path / "refused")]) == 2
    assert "--log-tag" in capsys.readouterr().err and not (tmp_path / "refused").exists()


def test_exported_pipelines_sample_like_the_originals(packaged):
    run, out = packaged
    prompts = ["a photo of a red circle", "a photo of two blue squares"]
    original = UnimmPipeline.from_pretrained(run / "t2i" / "pipeline", device="cpu")(prompts, steps=3, seed=0)
    shipped = UnimmPipeline.from_pretrained(out / "t2i", device="cpu")(prompts, steps=3, seed=0)
    for a, b in zip(original, shipped):  # float16 weights: the same images up to rounding
        assert np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)).mean() < 2.0


def test_commands_and_pipeline_fall_back_to_the_shipped_models(packaged, tmp_path, monkeypatch, capsys):
    _, out = packaged
    monkeypatch.setenv("UNIMM_DEFAULT_CHECKPOINTS", str(out))
    assert UnimmPipeline.from_pretrained(device="cpu").generator.config.backbone.name_or_path
    image = tmp_path / "generated.png"
    assert main(["generate", "a photo of a red circle", "-o", str(image), "--steps", "2"]) == 0
    assert Image.open(image).size == (32, 32)
    assert main(["edit", str(image), "Make the circle blue.", "-o", str(tmp_path / "edited.png"), "--steps", "2"]) == 0
    assert Image.open(tmp_path / "edited.png").size == (32, 32)

    capsys.readouterr()
    demo = tmp_path / "demo"
    assert main(["demo", "-o", str(demo), "--steps", "2", "--seeds", "1", "--edits", "2",
                 "--prompt", "two red circles left of a blue square", "--prompt", "a photo of a green star"]) == 0
    printed = capsys.readouterr().out
    assert "gallery: " in printed and "ShapesGenEval overall" in printed and "ShapesEdit: follows" in printed
    assert Image.open(demo / "gallery.png").width > 2 * 128
    page = (demo / "index.html").read_text()
    assert "two red circles left of a blue square" in page and page.count("<img") == 2 + 2 * 2
    assert all((demo / name).is_file() for name in json.loads((demo / "demo.json").read_text())["prompts"][0]["images"])


def test_missing_shipped_models_are_one_line_and_exit_code_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("UNIMM_DEFAULT_CHECKPOINTS", str(tmp_path / "nowhere"))
    assert main(["generate", "a photo of a red circle", "-o", str(tmp_path / "x.png")]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "shipped text_to_image model is missing" in error and "--model" in error


@pytest.mark.skipif(not (SHIPPED / "t2i" / "pipeline.json").is_file(), reason="checkpoints/shapes is not in this checkout")
def test_the_shipped_checkpoints_load_sample_and_stay_small(monkeypatch):
    monkeypatch.delenv("UNIMM_DEFAULT_CHECKPOINTS", raising=False)
    total = sum(path.stat().st_size for path in SHIPPED.rglob("*") if path.is_file())
    assert total < 40e6  # the limit is 50 MB in all
    pipeline = UnimmPipeline.from_pretrained(device="cpu")
    images = pipeline(["a photo of a red circle"], steps=2, seed=0)
    assert images[0].size == (64, 64) and pipeline.image_tokenizer.latent_shape == (32, 8, 8)
    scores = json.loads((SHIPPED / "scores.json").read_text())
    assert 0.0 <= scores["text_to_image"]["scores"]["shapes_geneval"] <= 1.0
    assert (SHIPPED / "README.md").is_file()

"""Generator trainer: a short run follows the stored golden loss trajectory and learns, an interrupted run
resumes on the same trajectory (single process and two-process DeepSpeed ZeRO-2 with a real kill), editing
starts from a text-to-image checkpoint, and the finished pipelines drive `unimm generate` / `unimm edit`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.generator_fixtures import tiny_generator_config
from tests.test_deepspeed_cpu import leftover_shared_memory, worker_env
from unimm.cli import main
from unimm.config import save_resolved_config
from unimm.errors import UserError
from unimm.trainer import GeneratorTrainer
from unimm.training.distributed import find_free_port

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "generator_t2i_tiny.json"
GOLDEN_STEPS = 12


def t2i_config(generator_parts, shapes, output_dir, data=None, **changes):
    tokenizer, text_model, _ = generator_parts
    return tiny_generator_config(tokenizer, text_model, data or str(shapes / "t2i" / "train"), output_dir, **changes)


def run_single_threaded(config, resume=False, max_steps=None) -> list[dict]:
    """Float32 sums depend on the thread count's reduction order; the golden numbers were made with one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return GeneratorTrainer(config, resume=resume).train(max_steps=max_steps)
    finally:
        torch.set_num_threads(threads)


def test_short_run_follows_the_golden_trajectory_and_learns(generator_parts, shapes, tmp_path):
    records = run_single_threaded(t2i_config(generator_parts, shapes, tmp_path / "run", steps=GOLDEN_STEPS))
    losses = [record["loss"] for record in records]
    golden = json.loads(GOLDEN.read_text())
    assert losses == pytest.approx(golden["loss"], rel=2e-3)
    # The velocity target has variance ~2 (noise + unit-variance latents); the model must get below it quickly.
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    pipeline_dir = tmp_path / "run" / "pipeline"
    assert (pipeline_dir / "generator.safetensors").is_file() and (pipeline_dir / "tokenizer" / "config.json").is_file()


def test_interrupted_run_resumes_on_the_same_trajectory(generator_parts, shapes, tmp_path):
    straight = run_single_threaded(t2i_config(generator_parts, shapes, tmp_path / "straight"))
    first = run_single_threaded(t2i_config(generator_parts, shapes, tmp_path / "resumed", checkpoint_every=3), max_steps=3)
    second = run_single_threaded(t2i_config(generator_parts, shapes, tmp_path / "resumed", checkpoint_every=3), resume=True)
    assert [record["step"] for record in second] == [4, 5, 6]
    assert [record["loss"] for record in first + second] == pytest.approx([record["loss"] for record in straight], rel=1e-6)
    from safetensors.torch import load_file

    final_straight = load_file(tmp_path / "straight" / "pipeline" / "generator.safetensors")
    final_resumed = load_file(tmp_path / "resumed" / "pipeline" / "generator.safetensors")
    for name, tensor in final_straight.items():
        torch.testing.assert_close(final_resumed[name], tensor, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_losses(generator_parts, shapes, tmp_path):
    plain = run_single_threaded(t2i_config(generator_parts, shapes, tmp_path / "plain", steps=3))
    checkpointed_trainer = GeneratorTrainer(t2i_config(generator_parts, shapes, tmp_path / "checkpointed", steps=3, gradient_checkpointing=True))
    assert checkpointed_trainer.unwrapped.backbone.is_gradient_checkpointing
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        checkpointed = checkpointed_trainer.train()
    finally:
        torch.set_num_threads(threads)
    assert [record["loss"] for record in checkpointed] == pytest.approx([record["loss"] for record in plain], rel=1e-5)


def test_training_on_a_latent_cache(generator_parts, shapes, tmp_path):
    tokenizer = generator_parts[0]
    assert main(["cache-latents", "--tokenizer", str(tokenizer), "--data", str(shapes / "t2i" / "train"), "-o", str(tmp_path / "cache"),
                 "image_fields=[png]", "caption_fields=[txt]"]) == 0
    records = GeneratorTrainer(t2i_config(generator_parts, shapes, tmp_path / "run", data=str(tmp_path / "cache"), steps=3)).train()
    assert len(records) == 3 and all(torch.isfinite(torch.tensor(record["loss"])) for record in records)
    # The cache fixed the captions to draw from: asking for others is refused, not silently ignored.
    config = t2i_config(generator_parts, shapes, tmp_path / "other", data=str(tmp_path / "cache"), steps=3)
    config.train.caption_fields = ["txt", "json.caption_llava"]
    with pytest.raises(UserError, match=r"holds the captions of \['txt'\] but train.caption_fields"):
        GeneratorTrainer(config)


def test_a_checkpoint_exports_as_the_pipeline_the_run_would_write(generator_parts, shapes, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file

    from unimm.models.generator import UnimmGenerator
    from unimm.training.state import load_weights

    run = tmp_path / "run"
    GeneratorTrainer(t2i_config(generator_parts, shapes, run, steps=6, checkpoint_every=3)).train()
    # The last checkpoint's EMA weights are exactly what the finished run wrote as its pipeline.
    assert main(["export", "checkpoint", str(run), "-o", str(tmp_path / "ema-6")]) == 0
    assert "step 6 (ema weights)" in capsys.readouterr().out
    exported, finished = load_file(tmp_path / "ema-6" / "generator.safetensors"), load_file(run / "pipeline" / "generator.safetensors")
    assert exported.keys() == finished.keys()
    for name, tensor in finished.items():
        assert torch.equal(exported[name], tensor), name
    # An earlier checkpoint's live weights: the optimised model at step 3, not its average, and not step 6.
    assert main(["export", "checkpoint", str(run / "checkpoint-3"), "-o", str(tmp_path / "live-3"), "--weights", "live"]) == 0
    live = UnimmGenerator.from_pretrained(tmp_path / "live-3").state_dict()
    reference = UnimmGenerator.from_pretrained(tmp_path / "live-3").eval()
    load_weights(run / "checkpoint-3" / "model.model.safetensors", reference)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(live[name], tensor), name
    assert any(not torch.equal(live[name], finished[name]) for name in finished)
    image = tmp_path / "mid-run.png"
    assert main(["generate", "a photo of a red circle", "--model", str(tmp_path / "live-3"), "-o", str(image), "--steps", "2"]) == 0
    assert image.is_file()
    # Not a run: one line, exit code 2, nothing written.
    assert main(["export", "checkpoint", str(tmp_path / "ema-6"), "-o", str(tmp_path / "nothing")]) == 2
    error = capsys.readouterr().err.strip()
    assert "no complete checkpoint" in error and "\n" not in error and not (tmp_path / "nothing").exists()
    other = tmp_path / "tokenizer-run"  # a checkpoint of another trainer: its config is not a generator's
    shutil.copytree(run / "checkpoint-3", other / "checkpoint-3")
    (other / "config.yaml").write_text("output_dir: x\nmodel:\n  family: psvae\n")
    assert main(["export", "checkpoint", str(other), "-o", str(tmp_path / "nothing")]) == 2
    error = capsys.readouterr().err.strip()
    assert "is not a `unimm train` (generator) run" in error and "\n" not in error and not (tmp_path / "nothing").exists()


def test_editing_starts_from_text_to_image_and_both_pipelines_run_from_the_cli(generator_parts, shapes, tmp_path, capsys):
    tokenizer, text_model, edits = generator_parts
    GeneratorTrainer(t2i_config(generator_parts, shapes, tmp_path / "t2i", steps=2)).train()
    t2i_pipeline = tmp_path / "t2i" / "pipeline"
    edit_config = tiny_generator_config(
        tokenizer, text_model, str(edits / "edit" / "train"), tmp_path / "edit", task="edit", data_format="parquet",
        init_from=str(tmp_path / "t2i"), steps=2,
    )
    trainer = GeneratorTrainer(edit_config)
    from unimm.models.generator import UnimmGenerator

    initial = UnimmGenerator.from_pretrained(t2i_pipeline).state_dict()
    for name, tensor in trainer.unwrapped.state_dict().items():  # the edit model starts as the T2I model
        torch.testing.assert_close(tensor, initial[name])
    trainer.train()

    image = tmp_path / "out" / "generated.png"
    assert main(["generate", "a photo of a red circle", "--model", str(t2i_pipeline), "-o", str(image), "--steps", "2"]) == 0
    from PIL import Image

    assert Image.open(image).size == (32, 32)
    suite = tmp_path / "out" / "suite.json"
    assert main(["eval", "shapes", "--model", str(t2i_pipeline), "--suites", "geneval,dpg", "--tags", "single_object,colors",
                 "--samples", "1", "--dpg-items", "2", "--steps", "2", "--out", str(suite)]) == 0
    table = capsys.readouterr().out
    assert "| ShapesGenEval | single_object |" in table and "| ShapesDPG | overall |" in table
    written = json.loads(suite.read_text())
    assert set(written["scores"]["shapes_geneval_by_tag"]) == {"single_object", "colors"}
    assert written["protocol"]["steps"] == 2 and written["protocol"]["resolution"] == 32
    edited = tmp_path / "out" / "edited.png"
    assert main(["edit", str(image), "Make the circle blue.", "--model", str(tmp_path / "edit" / "pipeline"), "-o", str(edited),
                 "--steps", "2", "--image-cfg", "1.2"]) == 0
    assert Image.open(edited).size == (32, 32)
    assert main(["eval", "shapes", "--model", str(tmp_path / "edit" / "pipeline"), "--suites", "edit", "--edit-pairs", "7",
                 "--steps", "2", "--out", str(suite)]) == 0
    scores = json.loads(suite.read_text())["scores"]
    assert len(scores["shapes_edit_adherence_by_task"]) == 7 and 0.0 <= scores["shapes_edit_adherence"] <= 1.0


def test_init_from_a_pipeline_with_another_text_vocabulary_is_refused(generator_parts, shapes, tmp_path):
    """The generator's embedding rows are indexed by token id: a pipeline saved with another word tokenizer would
    start the run from scrambled text without any other error."""
    import shutil

    GeneratorTrainer(t2i_config(generator_parts, shapes, tmp_path / "t2i", steps=1)).train()
    other = tmp_path / "other-vocabulary"
    shutil.copytree(tmp_path / "t2i" / "pipeline", other)
    settings = json.loads((other / "tokenizer.json").read_text())
    vocabulary = settings["model"]["vocab"]
    first, second = sorted(vocabulary, key=vocabulary.get)[-2:]  # two words trade ids
    vocabulary[first], vocabulary[second] = vocabulary[second], vocabulary[first]
    (other / "tokenizer.json").write_text(json.dumps(settings))
    GeneratorTrainer(t2i_config(generator_parts, shapes, tmp_path / "same", steps=1, init_from=str(tmp_path / "t2i")))
    with pytest.raises(UserError, match="another text vocabulary"):
        GeneratorTrainer(t2i_config(generator_parts, shapes, tmp_path / "refused", steps=1, init_from=str(other)))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--config", "mini-shapes", "tokenizer=/nonexistent/tokenizer"], "is not a directory"),
        (["train", "--config", "no-such-preset"], "unknown generator preset"),
        (["train", "--config", "mini-shapes", "train.lr_schedule=wsd", "train.cooldown_steps=99999999"], "cooldown_steps must be between"),
        (["generate", "a red circle", "--model", "/nonexistent/pipeline", "-o", "x.png"], "neither a pipeline directory"),
        (["edit", "/nonexistent.png", "make it blue", "--model", "/nonexistent", "-o", "x.png"], "cannot read the input image"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(argv, message, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and message in error and "Traceback" not in error


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_deepspeed_two_process_run_is_killed_and_resumes_on_the_same_trajectory(generator_parts, shapes, tmp_path, zero):
    """Two CPU processes under the deepspeed launcher with ZeRO-2 (the default) and ZeRO-3 (the 3B preset's,
    parameters partitioned across the ranks): an uninterrupted run, and a run killed (SIGKILL to the whole
    launcher group) right after its first checkpoint, then relaunched."""
    deepspeed = str(REPO / "configs" / "deepspeed" / f"{zero}.json")

    ports: list[int] = []

    def command(run: Path) -> list[str]:
        # keep_checkpoints=3: with the default 2, checkpoint-2 is pruned at step 6, and a poll that missed its short
        # life waited for a file that no longer existed until the run had finished (a flaky failure under load).
        config = t2i_config(generator_parts, shapes, run, steps=6, checkpoint_every=2, keep_checkpoints=3,
                            deepspeed_config=deepspeed, batch_size=2)
        config_file = save_resolved_config(config, tmp_path / f"config-{run.name}")
        ports.append(find_free_port())
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(ports[-1]),
                "--no_local_rank", "--module", "unimm", "train", "--config", str(config_file)]

    def losses(run: Path) -> dict[int, float]:
        lines = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
        return {line["step"]: line["loss"] for line in lines if "loss" in line}  # a resumed step's last record wins

    straight = tmp_path / "straight"
    result = subprocess.run(command(straight), cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    killed = tmp_path / "killed"
    process = subprocess.Popen(command(killed), cwd=REPO, env=worker_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 600
    while not (killed / "checkpoint-2" / "training_state.json").is_file():
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline, "no checkpoint within 10 minutes"
        time.sleep(0.01)  # poll often: the tiny run must be killed between its first checkpoint and its end
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "pipeline").exists()
    # No exit hook runs in a killed process: the DeepSpeed CPU all-reduce segments were released at start-up.
    assert leftover_shared_memory(ports[-1]) == []

    result = subprocess.run(command(killed), cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resumed from" in result.stdout + result.stderr
    expected, got = losses(straight), losses(killed)
    assert sorted(got) == sorted(expected) == list(range(1, 7))
    assert [got[step] for step in range(1, 7)] == pytest.approx([expected[step] for step in range(1, 7)], rel=1e-5)
    assert (killed / "pipeline" / "generator.safetensors").is_file()


def write_golden(generator_parts, shapes, tmp_path) -> None:  # pragma: no cover - run by hand when the model changes
    records = run_single_threaded(t2i_config(generator_parts, shapes, tmp_path / "golden", steps=GOLDEN_STEPS))
    GOLDEN.write_text(json.dumps({"steps": GOLDEN_STEPS, "loss": [record["loss"] for record in records]}, indent=1) + "\n")


def test_a_time_limited_run_ends_with_a_checkpoint_and_a_pipeline_and_resumes(generator_parts, shapes, tmp_path, capsys):
    config = t2i_config(generator_parts, shapes, tmp_path / "run", steps=6, time_limit_minutes=1e-9, checkpoint_every=1000)
    trainer = GeneratorTrainer(config)
    records = trainer.train()
    assert len(records) == 1 and trainer.stopped_by_time_limit  # checked at every log step (log_every=1)
    assert (tmp_path / "run" / "pipeline" / "generator.safetensors").is_file()
    assert "time limit of 1e-09 min reached at step 1" in capsys.readouterr().out
    config.train.time_limit_minutes = 0.0
    resumed = GeneratorTrainer(config)
    assert resumed.step == 1 and len(resumed.train()) == 5

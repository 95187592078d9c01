"""Training infrastructure: EMA, LR schedules, pickle-free atomic training-state checkpoints, RNG state,
the logger and the single-process accelerator set-up."""

import json
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from unimm.training import (
    ExponentialMovingAverage,
    TrainingLogger,
    build_lr_scheduler,
    build_warmup_cosine_scheduler,
    capture_rng_state,
    constant_with_warmup_lr,
    find_latest_checkpoint,
    list_checkpoints,
    load_training_state,
    restore_rng_state,
    save_training_state,
    warmup_cosine_lr,
)
from unimm.training import state as state_module
from unimm.training.distributed import resolve_deepspeed_config, resolve_mixed_precision
from unimm.training.state import load_ema, load_rng_state, save_ema, save_rng_state


# -- EMA -----------------------------------------------------------------------------------------------
def scalar_model(value: float) -> nn.Module:
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(value)
    return model


def test_ema_follows_the_recurrence_exactly():
    # decay 0.75: every intermediate value is a dyadic fraction, so float32 results are exact.
    model = scalar_model(1.0)
    ema = ExponentialMovingAverage(model, decay=0.75)
    for value in (2.0, 3.0):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update(model)
    assert ema.num_updates == 2
    assert ema.shadow["weight"].item() == 1.6875  # 0.75·(0.75·1 + 0.25·2) + 0.25·3
    ema.copy_to(model)
    assert model.weight.item() == 1.6875

    model = scalar_model(1.0)
    ema = ExponentialMovingAverage(model, decay=0.9)
    for value in (2.0, 3.0):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update(model)
    assert ema.shadow["weight"].item() == pytest.approx(1.29, abs=1e-6)  # 0.9·(0.9·1 + 0.1·2) + 0.1·3


def test_ema_warmup_decay_and_buffers():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = ExponentialMovingAverage(model, decay=0.999, warmup=True)
    assert ema.current_decay() == pytest.approx(2 / 11)
    before = {k: v.clone() for k, v in ema.shadow.items()}
    model.train()
    model(torch.randn(8, 2))  # moves the BatchNorm running statistics
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for name, param in model.named_parameters():
        expected = before[name] + (1 - 2 / 11) * (param.detach() - before[name])
        assert torch.allclose(ema.shadow[name], expected, atol=1e-6)
    assert torch.equal(ema.buffers["1.running_mean"], model[1].running_mean)
    assert ema.current_decay() == pytest.approx(3 / 12)
    for _ in range(10_000):
        ema.num_updates += 1
    assert ema.current_decay() == 0.999


def test_ema_state_round_trip_and_average_parameters(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = ExponentialMovingAverage(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    ema.update(model)

    restored = ExponentialMovingAverage(model, decay=0.1)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 1 and restored.decay == 0.5
    assert all(torch.equal(restored.shadow[k], v) for k, v in ema.shadow.items())

    save_ema(tmp_path / "ema.safetensors", ema)
    from_file = ExponentialMovingAverage(model, decay=0.1)
    load_ema(tmp_path / "ema.safetensors", from_file)
    assert from_file.num_updates == 1 and from_file.decay == 0.5
    assert all(torch.equal(from_file.shadow[k], v) for k, v in ema.shadow.items())

    live = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.average_parameters(model):
        assert torch.equal(model[0].weight, ema.shadow["0.weight"])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in live.items())

    with pytest.raises(KeyError):
        ema.update(nn.Linear(3, 4))


# -- schedules ---------------------------------------------------------------------------------------
def test_warmup_cosine_values():
    lr = 1e-4
    assert warmup_cosine_lr(0, lr, 10, 110) == 0.0
    assert warmup_cosine_lr(5, lr, 10, 110) == pytest.approx(0.5 * lr)
    assert warmup_cosine_lr(10, lr, 10, 110) == pytest.approx(lr)
    assert warmup_cosine_lr(60, lr, 10, 110) == pytest.approx(0.5 * lr)
    assert warmup_cosine_lr(60, lr, 10, 110, min_lr_ratio=0.1) == pytest.approx(0.55 * lr)
    assert warmup_cosine_lr(35, lr, 10, 110) == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi / 4)))
    assert warmup_cosine_lr(110, lr, 10, 110) == pytest.approx(0.0, abs=1e-15)
    assert warmup_cosine_lr(110, lr, 10, 110, min_lr_ratio=0.1) == pytest.approx(0.1 * lr)
    assert warmup_cosine_lr(500, lr, 10, 110, min_lr_ratio=0.1) == pytest.approx(0.1 * lr)
    assert warmup_cosine_lr(0, lr, 0, 100) == pytest.approx(lr)  # no warm-up
    assert constant_with_warmup_lr(2, lr, 4) == pytest.approx(0.5 * lr)
    assert constant_with_warmup_lr(4, lr, 4) == constant_with_warmup_lr(10**6, lr, 4) == lr
    with pytest.raises(ValueError):
        warmup_cosine_lr(0, lr, 10, 5)
    with pytest.raises(ValueError):
        warmup_cosine_lr(0, lr, 1, 5, min_lr_ratio=2.0)


def test_lambda_lr_schedulers_follow_the_functions():
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    scheduler = build_warmup_cosine_scheduler(optimizer, warmup_steps=4, total_steps=20, min_lr_ratio=0.1)
    for step in range(25):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(warmup_cosine_lr(step, 0.2, 4, 20, 0.1))
        optimizer.step()
        scheduler.step()

    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    constant = build_lr_scheduler(optimizer, "constant", warmup_steps=2)
    seen = []
    for _ in range(4):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        constant.step()
    assert seen == pytest.approx([0.0, 0.1, 0.2, 0.2])
    with pytest.raises(ValueError, match="unknown learning-rate schedule"):
        build_lr_scheduler(optimizer, "linear")


def test_wsd_holds_the_rate_then_cools_down_linearly():
    from unimm.training.schedule import scheduled_lr, wsd_lr

    lr = 0.4
    # warm-up 2, stable until 6, linear cool-down over the last 4 steps to 0.1 * lr at step 10
    values = [wsd_lr(step, lr, 2, 10, 4, 0.1) for step in range(12)]
    assert values == pytest.approx([0.0, 0.2, 0.4, 0.4, 0.4, 0.4, 0.4, 0.31, 0.22, 0.13, 0.04, 0.04])
    # Before its cool-down a wsd run is the constant run step for step, whatever its end: a constant-rate
    # checkpoint resumed with lr_schedule=wsd continues on the same curve.
    for step in range(0, 600, 7):
        assert scheduled_lr(step, lr, "wsd", 5, 1000, 0.0, 400) == scheduled_lr(step, lr, "constant", 5, 1000)
    assert scheduled_lr(999, lr, "wsd", 5, 1000, 0.0, 400) == pytest.approx(lr / 400)
    assert wsd_lr(3, lr, 0, 10, 0) == lr  # no cool-down: constant
    with pytest.raises(ValueError, match="cooldown_steps"):
        wsd_lr(0, lr, 2, 10, 9)
    with pytest.raises(ValueError, match="cooldown_steps"):  # checked during the warm-up too
        scheduled_lr(0, lr, "wsd", 2, 10, 0.0, 9)
    with pytest.raises(ValueError, match="applies only to lr_schedule=wsd"):
        scheduled_lr(50, lr, "cosine", 2, 100, 0.0, 10)

    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=lr)
    scheduler = build_lr_scheduler(optimizer, "wsd", warmup_steps=2, total_steps=10, min_lr_ratio=0.1, cooldown_steps=4)
    for step in range(12):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(values[step])
        optimizer.step()
        scheduler.step()


# -- RNG state ---------------------------------------------------------------------------------------
def draw():
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist())


def test_rng_state_restores_the_next_numbers(tmp_path):
    random.gauss(0, 1)  # leaves a cached gaussian in both generators' state
    np.random.randn()
    state = capture_rng_state()
    save_rng_state(tmp_path / "rng.safetensors", state)
    first = draw()
    restore_rng_state(state)
    assert draw() == first
    restore_rng_state(load_rng_state(tmp_path / "rng.safetensors"))
    assert draw() == first


# -- training-state checkpoints --------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 16))
        self.head = nn.Linear(16, 4, bias=False)
        self.out = nn.Linear(16, 4, bias=False)
        self.out.weight = self.head.weight  # tied, like Qwen's embeddings

    def forward(self, x):
        h = self.body(x)
        return self.head(h) + self.out(h)


class Setup:
    def __init__(self):
        torch.manual_seed(0)
        self.model = Net()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2, weight_decay=0.1)
        self.scheduler = build_warmup_cosine_scheduler(self.optimizer, warmup_steps=2, total_steps=10)
        self.ema = ExponentialMovingAverage(self.model, decay=0.8)
        self.position = 0

    def step(self):
        generator = torch.Generator().manual_seed(self.position)
        self.position += 1
        x = torch.randn(8, 4, generator=generator)
        loss = (self.model(x) - x.flip(1)).pow(2).mean()  # dropout draws from the global RNG
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        self.ema.update(self.model)
        return loss.item()

    def save(self, run_dir, step, **kwargs):
        return save_training_state(
            run_dir,
            step=step,
            models={"model": self.model},
            optimizers={"model": self.optimizer},
            schedulers={"model": self.scheduler},
            ema={"model": self.ema},
            loader_state={"position": self.position},
            extra={"tokens_seen": 123},
            **kwargs,
        )

    def load(self, path):
        loaded = load_training_state(
            path,
            models={"model": self.model},
            optimizers={"model": self.optimizer},
            schedulers={"model": self.scheduler},
            ema={"model": self.ema},
        )
        self.position = loaded.loader_state["position"]
        return loaded


def test_resume_continues_bitwise_like_an_uninterrupted_run(tmp_path):
    run = Setup()
    for _ in range(3):
        run.step()
    checkpoint = run.save(tmp_path / "run", step=3)
    assert checkpoint == tmp_path / "run" / "checkpoint-3"
    continued_losses = [run.step() for _ in range(3)]

    resumed = Setup()
    resumed.step()  # disturb everything a little: the restore must overwrite it all
    loaded = resumed.load(tmp_path / "run")
    assert loaded.step == 3 and loaded.extra == {"tokens_seen": 123} and loaded.path == checkpoint
    assert resumed.scheduler.last_epoch == 3 and resumed.ema.num_updates == 3
    resumed_losses = [resumed.step() for _ in range(3)]

    assert resumed_losses == continued_losses
    for (name, a), b in zip(run.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.model.out.weight is resumed.model.head.weight  # still tied after loading
    assert all(torch.equal(run.ema.shadow[k], resumed.ema.shadow[k]) for k in run.ema.shadow)
    assert resumed.optimizer.param_groups[0]["lr"] == run.optimizer.param_groups[0]["lr"]


def test_checkpoint_files_load_without_pickle(tmp_path):
    run = Setup()
    run.step()
    checkpoint = run.save(tmp_path, step=1)
    names = sorted(p.name for p in checkpoint.iterdir())
    assert names == [
        "ema.model.safetensors",
        "loader.rank00000.json",
        "model.model.safetensors",
        "optimizer.model.pt",
        "rng.rank00000.safetensors",
        "scheduler.model.json",
        "training_state.json",
    ]
    optimizer_state = torch.load(checkpoint / "optimizer.model.pt", weights_only=True)
    assert optimizer_state["param_groups"][0]["amsgrad"] is False
    assert set(optimizer_state["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    meta = json.loads((checkpoint / "training_state.json").read_text())
    assert meta["step"] == 1 and meta["world_size"] == 1 and meta["extra"] == {"tokens_seen": 123}
    from safetensors.torch import load_file

    weights = load_file(checkpoint / "model.model.safetensors")
    assert "head.weight" in weights and "out.weight" not in weights  # the tied tensor is stored once


def test_a_crash_while_saving_leaves_the_previous_checkpoint_as_latest(tmp_path, monkeypatch):
    run = Setup()
    run.step()
    first = run.save(tmp_path, step=1)
    run.step()

    def crash(*args, **kwargs):
        raise RuntimeError("killed while writing the EMA")

    monkeypatch.setattr(state_module, "save_ema", crash)
    with pytest.raises(RuntimeError, match="killed"):
        run.save(tmp_path, step=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "latest"]
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-1"
    assert find_latest_checkpoint(tmp_path) == first
    monkeypatch.undo()

    with pytest.raises(TypeError, match="plain JSON"):
        save_training_state(tmp_path, step=2, extra={"bad": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "latest"]

    # A run killed outright leaves a temporary directory: ignored, and removed by the next save.
    stale = tmp_path / "checkpoint-2.tmp-abcd1234"
    stale.mkdir()
    (stale / "model.model.safetensors").write_bytes(b"half")
    assert find_latest_checkpoint(tmp_path) == first
    second = run.save(tmp_path, step=2)
    assert not stale.exists()
    assert find_latest_checkpoint(tmp_path) == second


def test_keep_last_prunes_and_latest_falls_back(tmp_path):
    run = Setup()
    for step in range(1, 6):
        run.step()
        run.save(tmp_path, step=step, keep_last=2)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-5", "latest"]

    (tmp_path / "latest").write_text("checkpoint-9\n")  # dangling pointer: use the newest complete one
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-5"
    (tmp_path / "latest").unlink()
    (tmp_path / "checkpoint-5" / "training_state.json").unlink()  # incomplete: skipped
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert find_latest_checkpoint(tmp_path / "missing") is None

    # Saving a step that exists again replaces it.
    run.save(tmp_path, step=4)
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-4"


def test_loading_into_a_different_model_is_a_clear_error(tmp_path):
    from unimm.errors import UserError

    run = Setup()
    run.save(tmp_path, step=1)
    with pytest.raises(UserError, match="do not match"):
        load_training_state(tmp_path, models={"model": nn.Linear(4, 4)}, restore_rng=False)
    with pytest.raises(UserError, match="has no"):
        load_training_state(tmp_path, models={"other": nn.Linear(4, 4)}, restore_rng=False)


# -- logger -------------------------------------------------------------------------------------------
def test_training_logger_writes_scalars_and_images(tmp_path):
    with TrainingLogger(tmp_path / "logs", total_steps=3, progress=True) as logger:
        for step in range(1, 4):
            logger.log_scalars({"loss": torch.tensor(1.0 / step), "lr": 0.1}, step)
            logger.progress(loss=1.0 / step)
        logger.log_images("samples", torch.rand(4, 3, 8, 8) * 2 - 1, step=3)
        logger.log_images("grid", torch.rand(3, 10, 10), step=3, value_range=(0, 1))
    lines = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert lines[1]["loss"] == pytest.approx(0.5)
    assert list((tmp_path / "logs").glob("events.out.tfevents.*"))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "logs"))
    events.Reload()
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([1.0, 0.5, 1 / 3])
    assert set(events.Tags()["images"]) == {"samples", "grid"}

    silent = TrainingLogger(tmp_path / "rank1", enabled=False)
    silent.log_scalars({"loss": 1.0}, 1)
    silent.log_images("x", torch.zeros(3, 4, 4), 1)
    silent.progress()
    silent.close()
    assert not (tmp_path / "rank1").exists()


# -- accelerator helpers ----------------------------------------------------------------------------
def test_mixed_precision_and_deepspeed_config_resolution():
    assert resolve_mixed_precision("bf16", cpu=True) == "no"
    assert resolve_mixed_precision("no") == "no"
    with pytest.raises(Exception, match="mixed_precision"):
        resolve_mixed_precision("fp8")
    zero2 = resolve_deepspeed_config("zero2")
    assert zero2.name == "zero2.json"
    assert resolve_deepspeed_config("configs/deepspeed/zero3.json").name == "zero3.json"
    for path in (zero2, resolve_deepspeed_config("zero3")):
        config = json.loads(path.read_text())
        assert config["train_micro_batch_size_per_gpu"] == "auto"
        assert config["gradient_accumulation_steps"] == "auto"
        assert config["gradient_clipping"] == "auto"
        assert config["bf16"] == {"enabled": "auto"}
    with pytest.raises(Exception, match="not found"):
        resolve_deepspeed_config("zero9")


def test_deepspeed_plugin_fills_auto_entries():
    from unimm.training.distributed import build_deepspeed_plugin

    plugin = build_deepspeed_plugin("zero2", gradient_accumulation_steps=4, micro_batch_size=6, gradient_clipping=0.5)
    config = plugin.deepspeed_config
    assert config["gradient_accumulation_steps"] == 4
    assert config["train_micro_batch_size_per_gpu"] == 6
    assert config["gradient_clipping"] == 0.5
    assert config["zero_optimization"]["stage"] == 2


def test_build_accelerator_single_process_cpu(tmp_path):
    from accelerate.state import AcceleratorState, GradientState

    from unimm.training import build_accelerator, clip_gradients, uses_deepspeed

    try:
        accelerator = build_accelerator(mixed_precision="bf16", cpu=True, log_dir=tmp_path)
        assert accelerator.num_processes == 1 and accelerator.mixed_precision == "no"
        assert not uses_deepspeed(accelerator)
        model = nn.Linear(3, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model, optimizer = accelerator.prepare(model, optimizer)
        accelerator.backward(model(torch.ones(2, 3)).sum() * 100)
        norm = clip_gradients(accelerator, model, 1.0)
        assert norm is not None and norm > 1.0
        assert torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm().item() == pytest.approx(1.0, rel=1e-4)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()

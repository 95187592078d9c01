"""What one training step does in every trainer of the project (tokenizer and generator): open the run, set the
rate, update the weights from a loss, and write the periodic log line. The losses, data and schedules stay with
each trainer."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from unimm.config import save_resolved_config
from unimm.training.distributed import clip_gradients
from unimm.training.logging import TrainingLogger


def open_run(config, output_dir: str | Path, is_main: bool, total_steps: int, initial_step: int) -> TrainingLogger:
    """Save the resolved config in the run directory (main process) and return the run's logger."""
    if is_main:
        save_resolved_config(config, output_dir)
    return TrainingLogger(Path(output_dir) / "logs", enabled=is_main, total_steps=total_steps, initial_step=initial_step)


def set_learning_rate(optimizer: torch.optim.Optimizer, learning_rate: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = learning_rate


def optimizer_update(accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
                     grad_clip: float) -> float:
    """Backward, clip, step and clear the gradients; returns the gradient norm before clipping."""
    accelerator.backward(loss)
    grad_norm = clip_gradients(accelerator, model, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def log_record(logger: TrainingLogger, record: dict, started: float) -> None:
    """A step's record as scalars (its numbers) and a JSON line, both with `elapsed_s`: seconds since this
    invocation started, so the log shows each invocation's speed (scripts that size a cool-down to a time budget
    read it back)."""
    elapsed = {"elapsed_s": round(time.time() - started, 1)}
    scalars = {key: value for key, value in record.items() if isinstance(value, (int, float)) and key != "step"}
    logger.log_scalars({**scalars, **elapsed}, record["step"])
    logger.write(json.dumps({**record, **elapsed}))

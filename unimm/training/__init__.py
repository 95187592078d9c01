"""Training infrastructure shared by the tokenizer and generator trainers.

* :mod:`unimm.training.distributed` — ``build_accelerator`` (accelerate, optionally DeepSpeed ZeRO),
  rank helpers, and the launch command lines (module docstring).
* :mod:`unimm.training.ema` — ``ExponentialMovingAverage``.
* :mod:`unimm.training.schedule` — warm-up + cosine / constant learning-rate schedules.
* :mod:`unimm.training.state` — atomic, pickle-free training-state checkpoints (weights, optimizer,
  schedulers, EMA, RNG, data position) with ``latest`` pointer and pruning.
* :mod:`unimm.training.logging` — ``TrainingLogger`` (TensorBoard + metrics.jsonl + tqdm, rank 0 only).
"""

from unimm.training.distributed import (
    barrier,
    build_accelerator,
    clip_gradients,
    get_rank,
    get_world_size,
    is_main_process,
    uses_deepspeed,
)
from unimm.training.ema import ExponentialMovingAverage, unwrap_module
from unimm.training.logging import TrainingLogger
from unimm.training.schedule import (
    build_constant_scheduler,
    build_lr_scheduler,
    build_warmup_cosine_scheduler,
    constant_with_warmup_lr,
    warmup_cosine_lr,
)
from unimm.training.state import (
    LoadedTrainingState,
    capture_rng_state,
    find_latest_checkpoint,
    list_checkpoints,
    load_training_state,
    prune_checkpoints,
    restore_rng_state,
    save_training_state,
)

__all__ = [
    "ExponentialMovingAverage",
    "LoadedTrainingState",
    "TrainingLogger",
    "barrier",
    "build_accelerator",
    "build_constant_scheduler",
    "build_lr_scheduler",
    "build_warmup_cosine_scheduler",
    "capture_rng_state",
    "clip_gradients",
    "constant_with_warmup_lr",
    "find_latest_checkpoint",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "list_checkpoints",
    "load_training_state",
    "prune_checkpoints",
    "restore_rng_state",
    "save_training_state",
    "unwrap_module",
    "uses_deepspeed",
    "warmup_cosine_lr",
]

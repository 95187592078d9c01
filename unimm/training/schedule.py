"""Learning-rate schedules: linear warm-up, then cosine decay, a constant rate, or warm-up-stable-decay.

"wsd" (warm-up, stable, decay; MiniCPM's WSD) holds ``base_lr`` and then decays linearly to
``min_lr_ratio · base_lr`` over the last ``cooldown_steps`` before ``total_steps``. Because the rate before the
cool-down does not depend on ``total_steps``, a constant-rate run can be resumed with ``lr_schedule=wsd`` and
a chosen end step: it continues on the same curve and cools down at the end.

The schedule is a pure function of the optimizer step, so a resumed run only needs the step (the
``LambdaLR``'s ``last_epoch``, restored from its state dict) to continue on the same curve. The
multiplier applied at optimizer step ``k`` (0-based, i.e. the k-th call of ``optimizer.step()``) is
``lr(k) / base_lr``, the same convention as ``transformers.get_cosine_schedule_with_warmup``: the very
first step runs at ``lr(0) = 0`` when there is a warm-up, the rate reaches ``base_lr`` at
``warmup_steps`` and ``min_lr_ratio · base_lr`` at ``total_steps`` (and stays there afterwards).

Call ``scheduler.step()`` once per optimizer step (not per micro-batch, and not once per process: see
``unimm.training.distributed`` on accelerate's ``step_scheduler_with_optimizer``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = ("cosine", "constant", "wsd")


def _check(warmup_steps: int, total_steps: int | None, min_lr_ratio: float = 0.0) -> None:
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if total_steps is not None and total_steps < warmup_steps:
        raise ValueError(f"total_steps ({total_steps}) must be >= warmup_steps ({warmup_steps})")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear ramp 0 → 1 over ``warmup_steps`` (1 when there is no warm-up or it is over)."""
    if warmup_steps > 0 and step < warmup_steps:
        return max(step, 0) / warmup_steps
    return 1.0


def warmup_cosine_lr(
    step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> float:
    """Linear warm-up from 0 to ``base_lr`` at ``warmup_steps``, then a half cosine down to
    ``min_lr_ratio · base_lr`` at ``total_steps``; constant at the minimum afterwards."""
    _check(warmup_steps, total_steps, min_lr_ratio)
    if step < warmup_steps:
        return base_lr * warmup_factor(step, warmup_steps)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return base_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)


def constant_with_warmup_lr(step: int, base_lr: float, warmup_steps: int) -> float:
    """Linear warm-up from 0 to ``base_lr`` at ``warmup_steps``, then constant."""
    _check(warmup_steps, None)
    return base_lr * warmup_factor(step, warmup_steps)


def _check_cooldown(warmup_steps: int, total_steps: int, cooldown_steps: int, min_lr_ratio: float) -> None:
    _check(warmup_steps, total_steps, min_lr_ratio)
    if cooldown_steps < 0 or cooldown_steps > total_steps - warmup_steps:
        raise ValueError(
            f"cooldown_steps must be between 0 and steps - warmup_steps ({total_steps - warmup_steps}), got {cooldown_steps}"
        )


def wsd_lr(
    step: int, base_lr: float, warmup_steps: int, total_steps: int, cooldown_steps: int, min_lr_ratio: float = 0.0
) -> float:
    """Linear warm-up to ``base_lr`` at ``warmup_steps``, ``base_lr`` until ``total_steps - cooldown_steps``, then a
    linear decay reaching ``min_lr_ratio · base_lr`` at ``total_steps`` (and staying there)."""
    _check_cooldown(warmup_steps, total_steps, cooldown_steps, min_lr_ratio)
    return base_lr * _wsd_factor(step, warmup_steps, total_steps, cooldown_steps, min_lr_ratio)


def _wsd_factor(step: int, warmup_steps: int, total_steps: int, cooldown_steps: int, min_lr_ratio: float) -> float:
    """:func:`wsd_lr` divided by ``base_lr``, without re-checking the arguments (the ``LambdaLR`` multiplier calls
    it every step)."""
    if step < warmup_steps:
        return warmup_factor(step, warmup_steps)
    return _cooldown_factor(step, total_steps, cooldown_steps, min_lr_ratio)


def _cooldown_factor(step: int, total_steps: int, cooldown_steps: int, min_lr_ratio: float) -> float:
    """1 until ``total_steps - cooldown_steps``, then linear down to ``min_lr_ratio`` at ``total_steps`` (arguments
    already checked by :func:`_check_cooldown`)."""
    cooldown_start = total_steps - cooldown_steps
    if cooldown_steps == 0 or step < cooldown_start:
        return 1.0
    progress = min(1.0, (step - cooldown_start) / cooldown_steps)
    return 1.0 - (1.0 - min_lr_ratio) * progress


def scheduled_lr(
    step: int,
    base_lr: float,
    schedule: str,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.0,
    cooldown_steps: int = 0,
) -> float:
    """The learning rate of optimizer step ``step`` (0-based) as a pure function of the step, for trainers
    that set it by hand (so an exact resume needs no scheduler state).

    The warm-up counts the step being taken (``step + 1``), so the very first step already learns; after
    it, ``schedule`` is "constant" (``base_lr``), "cosine" (:func:`warmup_cosine_lr` over ``total_steps``) or
    "wsd" (:func:`wsd_lr`: constant, then a linear cool-down over the last ``cooldown_steps``).
    """
    if schedule == "wsd":
        _check_cooldown(warmup_steps, total_steps, cooldown_steps, min_lr_ratio)
    elif cooldown_steps:
        raise ValueError(f"cooldown_steps={cooldown_steps} applies only to lr_schedule=wsd, not {schedule!r}")
    if warmup_steps and step < warmup_steps:
        return base_lr * warmup_factor(step + 1, warmup_steps)
    if schedule == "constant":
        return base_lr
    if schedule == "cosine":
        return warmup_cosine_lr(step, base_lr, warmup_steps, total_steps, min_lr_ratio)
    if schedule == "wsd":  # checked above, before the warm-up's early return
        return base_lr * _cooldown_factor(step, total_steps, cooldown_steps, min_lr_ratio)
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def lr_multiplier(
    name: str, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0, cooldown_steps: int = 0
) -> Callable[[int], float]:
    """The ``LambdaLR`` multiplier (``lr(step) / base_lr``) of schedule ``name``."""
    if name == "cosine":
        _check(warmup_steps, total_steps, min_lr_ratio)

        # A closure, not an object: LambdaLR then stores nothing of the schedule in its state dict, so a
        # resumed run follows the schedule of its (possibly edited) config, at the restored step.
        def multiplier(step: int) -> float:
            return warmup_cosine_lr(step, 1.0, warmup_steps, total_steps, min_lr_ratio)

        return multiplier
    if name == "constant":
        _check(warmup_steps, None)

        def constant(step: int) -> float:
            return warmup_factor(step, warmup_steps)

        return constant
    if name == "wsd":
        _check_cooldown(warmup_steps, total_steps, cooldown_steps, min_lr_ratio)

        def warmup_stable_decay(step: int) -> float:
            return _wsd_factor(step, warmup_steps, total_steps, cooldown_steps, min_lr_ratio)

        return warmup_stable_decay
    raise ValueError(f"unknown learning-rate schedule {name!r}; choose one of {', '.join(SCHEDULES)}")


def build_lr_scheduler(
    optimizer: Optimizer,
    name: str = "cosine",
    warmup_steps: int = 0,
    total_steps: int = 1,
    min_lr_ratio: float = 0.0,
    cooldown_steps: int = 0,
) -> LambdaLR:
    """A ``LambdaLR`` for schedule ``name`` ("cosine", "constant" or "wsd", all with linear warm-up)."""
    return LambdaLR(optimizer, lr_multiplier(name, warmup_steps, total_steps, min_lr_ratio, cooldown_steps))


def build_warmup_cosine_scheduler(
    optimizer: Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """A ``LambdaLR`` following :func:`warmup_cosine_lr` (multiplying each group's initial lr)."""
    return build_lr_scheduler(optimizer, "cosine", warmup_steps, total_steps, min_lr_ratio)


def build_constant_scheduler(optimizer: Optimizer, warmup_steps: int = 0) -> LambdaLR:
    """A ``LambdaLR`` with a linear warm-up and then the optimizer's lr unchanged."""
    return build_lr_scheduler(optimizer, "constant", warmup_steps, max(warmup_steps, 1))

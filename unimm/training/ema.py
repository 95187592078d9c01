"""An exponential moving average (EMA) of a model's parameters.

``shadow ← decay · shadow + (1 − decay) · param`` after each optimizer step (``torch.lerp``), with the
shadow kept in float32 whatever the parameters' dtype; buffers (e.g. BatchNorm statistics) are copied,
not averaged. With ``warmup=True`` the effective decay is ``min(decay, (1 + n) / (10 + n))`` for the
n-th update, so the average is not dominated by the random initialisation early in training.

Distributed use:

* DDP and DeepSpeed ZeRO-1/2: every rank holds the full parameters, so every rank can keep an
  identical EMA (update it on every rank after every optimizer step; it costs one fp32 copy of the
  model per rank). Pass the wrapped model or the unwrapped one; ``.module`` wrappers are unwrapped.
  With bf16 DeepSpeed training the module's parameters are the bf16 copies (the fp32 master weights
  live inside the ZeRO optimizer), so the EMA averages bf16-rounded weights into an fp32 shadow.
* DeepSpeed ZeRO-3: parameters are partitioned (each has a ``ds_id`` and an empty local tensor).
  ``update``/``copy_to``/construction then gather them with ``deepspeed.zero.GatheredParameters``,
  which is a collective: **all ranks must call them together**. Each rank still keeps a full fp32
  shadow, which defeats part of ZeRO-3's memory saving; for very large models keep the EMA on rank 0
  only or use a sharded EMA (not implemented).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def unwrap_module(model: nn.Module) -> nn.Module:
    """Strip DDP / DeepSpeedEngine (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


def is_zero3_partitioned(parameters: list[torch.Tensor]) -> bool:
    return any(hasattr(p, "ds_id") for p in parameters)


@contextlib.contextmanager
def gathered(parameters: list[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """Gather ZeRO-3 partitioned parameters for the duration of the block (no-op otherwise).

    A collective under ZeRO-3: every rank must enter it. With ``modifier_rank=r`` the values rank ``r``
    writes inside the block are re-partitioned to all ranks on exit.
    """
    if is_zero3_partitioned(parameters):
        import deepspeed

        with deepspeed.zero.GatheredParameters(parameters, modifier_rank=modifier_rank):
            yield
    else:
        yield


class ExponentialMovingAverage:
    def __init__(self, model: nn.Module, decay: float, warmup: bool = False):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        model = unwrap_module(model)
        named = list(model.named_parameters())
        with gathered([p for _, p in named]):
            self.shadow: dict[str, torch.Tensor] = {
                name: p.detach().to(torch.float32, copy=True) for name, p in named
            }
        self.buffers: dict[str, torch.Tensor] = {
            name: b.detach().clone() for name, b in model.named_buffers()
        }

    # -- averaging -----------------------------------------------------------------------------------
    def current_decay(self) -> float:
        """The decay the next :meth:`update` will use."""
        if self.warmup:
            n = self.num_updates + 1
            return min(self.decay, (1.0 + n) / (10.0 + n))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current parameters into the average (call after each optimizer step)."""
        decay = self.current_decay()
        model = unwrap_module(model)
        named = list(model.named_parameters())
        self._check_names(name for name, _ in named)
        with gathered([p for _, p in named]):
            for name, param in named:
                shadow = self.shadow[name]
                shadow.lerp_(param.detach().to(device=shadow.device, dtype=torch.float32), 1.0 - decay)
        for name, buffer in model.named_buffers():
            if name in self.buffers:
                self.buffers[name].copy_(buffer.detach())
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged parameters (cast to each parameter's dtype) and the buffers into ``model``.

        Under ZeRO-3 this is a collective; rank 0's shadow is what every rank ends up with.
        """
        model = unwrap_module(model)
        named = list(model.named_parameters())
        self._check_names(name for name, _ in named)
        with gathered([p for _, p in named], modifier_rank=0):
            for name, param in named:
                param.copy_(self.shadow[name].to(device=param.device, dtype=param.dtype))
        for name, buffer in model.named_buffers():
            if name in self.buffers:
                buffer.copy_(self.buffers[name].to(device=buffer.device, dtype=buffer.dtype))

    @contextlib.contextmanager
    def average_parameters(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the EMA weights into ``model`` (e.g. for sampling), restoring them after."""
        module = unwrap_module(model)
        named = list(module.named_parameters())
        with gathered([p for _, p in named]):
            backup = {name: p.detach().clone() for name, p in named}
        buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
        self.copy_to(module)
        try:
            yield model
        finally:
            with torch.no_grad(), gathered([p for _, p in named], modifier_rank=0):
                for name, param in named:
                    param.copy_(backup[name])
            with torch.no_grad():
                for name, buffer in module.named_buffers():
                    buffer.copy_(buffers[name])

    def to(self, device: torch.device | str) -> ExponentialMovingAverage:
        self.shadow = {name: t.to(device) for name, t in self.shadow.items()}
        self.buffers = {name: t.to(device) for name, t in self.buffers.items()}
        return self

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "shadow": dict(self.shadow),
            "buffers": dict(self.buffers),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shadow = state["shadow"]
        if set(shadow) != set(self.shadow):
            missing = sorted(set(self.shadow) - set(shadow))
            unexpected = sorted(set(shadow) - set(self.shadow))
            raise KeyError(f"EMA state does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, tensor in shadow.items():
            if tuple(tensor.shape) != tuple(self.shadow[name].shape):
                raise ValueError(
                    f"EMA tensor {name!r} has shape {tuple(tensor.shape)}, the model has {tuple(self.shadow[name].shape)}"
                )
            self.shadow[name].copy_(tensor.to(torch.float32))
        for name, tensor in state.get("buffers", {}).items():
            if name in self.buffers:
                self.buffers[name].copy_(tensor)
        self.decay = float(state.get("decay", self.decay))
        self.warmup = bool(state.get("warmup", self.warmup))
        self.num_updates = int(state["num_updates"])

    def _check_names(self, names: Iterator[str]) -> None:
        names = set(names)
        if names != set(self.shadow):
            raise KeyError(
                "the model's parameters do not match the EMA's "
                f"(missing from the model: {sorted(set(self.shadow) - names)[:5]}, "
                f"new in the model: {sorted(names - set(self.shadow))[:5]})"
            )

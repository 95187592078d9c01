"""Samplers: the Euler integrator from noise (t = 1) to data (t = 0), and classifier-free guidance rules."""

from __future__ import annotations

from collections.abc import Callable

import torch

from unimm.flow.timesteps import shift_timesteps


def sampling_timesteps(steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    """steps + 1 times from 1 to 0: uniform in the unshifted time, then shifted (inference shift 3 by default)."""
    if steps < 1:
        raise ValueError(f"the sampler needs at least one step, got {steps}")
    uniform = torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64)
    return shift_timesteps(uniform, shift).float()


def euler_sample(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Integrate dx/dt = velocity(x, t) from timesteps[0] (= 1, noise) to timesteps[-1] (= 0, data).

    `velocity` gets x (B, ...) and t (B,) and returns the velocity (B, ...).
    """
    x = noise
    for index in range(len(timesteps) - 1):
        t, t_next = timesteps[index], timesteps[index + 1]
        v = velocity(x, t.expand(x.shape[0]).to(x.device))
        x = x + (t_next - t).to(x) * v  # dt < 0: towards the data
        if callback is not None:
            callback(index, x)
    return x


def text_guidance(conditional: torch.Tensor, unconditional: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: v_u + w (v_c - v_u); w = 1 is the conditional model alone."""
    return unconditional + scale * (conditional - unconditional)


def edit_guidance(
    full: torch.Tensor, image_only: torch.Tensor, unconditional: torch.Tensor, text_scale: float, image_scale: float
) -> torch.Tensor:
    """Two-scale guidance for editing (InstructPix2Pix): v = v_∅ + s_I (v_I − v_∅) + s_T (v_IT − v_I).

    full: conditioned on the input image and the instruction; image_only: the image, an empty instruction;
    unconditional: neither.
    """
    return unconditional + image_scale * (image_only - unconditional) + text_scale * (full - image_only)

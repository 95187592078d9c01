"""Flow matching (unimm.flow): the paper's shift numbers, the timestep distributions, the straight path and its
velocity, the loss, the sampling schedule, the Euler step direction and the guidance rules.

Convention: x_t = (1 - t) x_0 + t noise, t = 1 is pure noise, v = noise - x_0, sampling runs t: 1 -> 0.
"""

from __future__ import annotations

import math

import pytest
import torch

from unimm.flow import (
    edit_guidance,
    euler_sample,
    flow_matching_loss,
    interpolate,
    logit_normal_timesteps,
    sampling_timesteps,
    shift_timesteps,
    text_guidance,
    training_shift,
    training_timesteps,
    velocity_target,
)


# ---------------------------------------------------------------------------------------- shift
@pytest.mark.parametrize(
    "channels, patch, expected",
    [
        (16, 2, 2.0),  # Flux-VAE
        (768, 1, 6.9282),  # DINOv2-B features
        (96, 1, 2.4495),  # PS-VAE 96c
        (16, 1, 1.0),  # the reference latent itself
    ],
)
def test_training_shift_matches_the_paper(channels, patch, expected):
    assert training_shift(channels, patch) == pytest.approx(expected, abs=1e-4)


def test_training_shift_exact_values_and_errors():
    assert training_shift(96) == pytest.approx(math.sqrt(6), abs=1e-12)
    assert training_shift(768) == pytest.approx(math.sqrt(48), abs=1e-12)
    with pytest.raises(ValueError):
        training_shift(0)
    with pytest.raises(ValueError):
        training_shift(16, 0)


@pytest.mark.parametrize("shift", [0.5, 1.0, 2.0, 2.4495, 6.9282])
def test_shift_timesteps_keeps_endpoints_and_is_monotone(shift):
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    shifted = shift_timesteps(t, shift)
    assert shifted[0].item() == 0.0
    assert shifted[-1].item() == pytest.approx(1.0, abs=1e-15)
    assert torch.all(shifted[1:] > shifted[:-1])
    assert torch.all((shifted >= 0) & (shifted <= 1))
    if shift > 1:  # mass moves towards t = 1 (noise)
        assert torch.all(shifted[1:-1] > t[1:-1])


def test_shift_of_one_is_the_identity():
    t = torch.rand(100, dtype=torch.float64)
    assert torch.equal(shift_timesteps(t, 1.0), t)


@pytest.mark.parametrize("shift, t", [(2.0, 0.5), (3.0, 0.25), (2.4495, 0.1), (6.9282, 0.9), (0.5, 0.5)])
def test_shift_timesteps_formula(shift, t):
    expected = shift * t / (1 + (shift - 1) * t)
    value = shift_timesteps(torch.tensor([t], dtype=torch.float64), shift).item()
    assert value == pytest.approx(expected, abs=1e-12)
    if (shift, t) == (2.0, 0.5):
        assert value == pytest.approx(2 / 3, abs=1e-12)
    if (shift, t) == (3.0, 0.25):
        assert value == pytest.approx(0.5, abs=1e-12)


# --------------------------------------------------------------------------------- distributions
def test_logit_normal_samples_are_in_the_open_interval_with_median_one_half():
    samples = logit_normal_timesteps(200_000, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (200_000,)
    assert torch.all((samples > 0) & (samples < 1))
    assert samples.median().item() == pytest.approx(0.5, abs=0.01)
    # the mean parameter moves the median to sigmoid(mean)
    moved = logit_normal_timesteps(200_000, mean=1.0, generator=torch.Generator().manual_seed(1))
    assert moved.median().item() == pytest.approx(1 / (1 + math.exp(-1.0)), abs=0.01)


def test_logit_normal_is_seeded():
    a = logit_normal_timesteps(64, generator=torch.Generator().manual_seed(3))
    b = logit_normal_timesteps(64, generator=torch.Generator().manual_seed(3))
    c = logit_normal_timesteps(64, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("shift", [2.0, 2.4495, 6.9282])
def test_training_timesteps_median_is_the_shifted_one_half(shift):
    samples = training_timesteps(200_000, shift, generator=torch.Generator().manual_seed(0))
    assert torch.all((samples > 0) & (samples < 1))
    expected = shift * 0.5 / (1 + (shift - 1) * 0.5)  # the shift is monotone: it maps the median to the median
    assert samples.median().item() == pytest.approx(expected, abs=0.01)
    # the same draws, shifted by hand
    unshifted = logit_normal_timesteps(200_000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(samples, shift_timesteps(unshifted, shift))


# ------------------------------------------------------------------------------------------ path
def test_interpolate_endpoints():
    clean, noise = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(interpolate(clean, noise, torch.zeros(3)), clean, atol=0, rtol=0)
    torch.testing.assert_close(interpolate(clean, noise, torch.ones(3)), noise, atol=0, rtol=0)
    # per-sample times: sample 0 clean, sample 1 half-way, sample 2 noise
    mixed = interpolate(clean, noise, torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(mixed[0], clean[0])
    torch.testing.assert_close(mixed[1], 0.5 * (clean[1] + noise[1]))
    torch.testing.assert_close(mixed[2], noise[2])


@pytest.mark.parametrize("t0", [0.1, 0.5, 0.83])
def test_velocity_target_is_the_time_derivative_of_the_path(t0):
    generator = torch.Generator().manual_seed(0)
    clean = torch.randn(2, 3, 4, 4, generator=generator, dtype=torch.float64)
    noise = torch.randn(2, 3, 4, 4, generator=generator, dtype=torch.float64)
    h = 1e-4
    t = torch.full((2,), t0, dtype=torch.float64)
    derivative = (interpolate(clean, noise, t + h) - interpolate(clean, noise, t - h)) / (2 * h)
    torch.testing.assert_close(velocity_target(clean, noise), derivative, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(velocity_target(clean, noise), noise - clean)


def test_flow_matching_loss():
    clean, noise = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    exact = velocity_target(clean, noise)
    assert flow_matching_loss(exact, clean, noise).item() == 0.0
    off = exact + 0.5
    assert flow_matching_loss(off, clean, noise).item() == pytest.approx(0.25, abs=1e-6)
    wrong = torch.randn(4, 3, 4, 4)
    assert flow_matching_loss(wrong, clean, noise).item() == pytest.approx((wrong - exact).pow(2).mean().item(), rel=1e-6)
    # low-precision predictions are compared in float32
    assert flow_matching_loss(exact.bfloat16(), clean, noise).dtype == torch.float32


# -------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("steps", [1, 2, 7, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_sampling_timesteps(steps, shift):
    times = sampling_timesteps(steps, shift)
    assert times.shape == (steps + 1,)
    assert times[0].item() == pytest.approx(1.0, abs=1e-7)
    assert times[-1].item() == 0.0
    assert torch.all(times[1:] < times[:-1])
    uniform = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    torch.testing.assert_close(times, shift_timesteps(uniform, shift).float())


def test_sampling_timesteps_needs_a_step():
    with pytest.raises(ValueError):
        sampling_timesteps(0)


@pytest.mark.parametrize("steps", [1, 3, 10, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0, 6.9282])
def test_euler_with_the_exact_velocity_recovers_the_data(steps, shift):
    """The straight path's velocity is constant, so Euler is exact for any schedule from 1 to 0 — but only
    if it steps *against* the velocity as t decreases (x <- x + (t_next - t) v): this pins the direction."""
    generator = torch.Generator().manual_seed(steps)
    clean = torch.randn(3, 4, 6, 6, generator=generator, dtype=torch.float64)
    noise = torch.randn(3, 4, 6, 6, generator=generator, dtype=torch.float64)
    calls = []

    def constant_velocity(x, t):
        calls.append(t.clone())
        assert t.shape == (3,) and x.shape == clean.shape
        return noise - clean

    timesteps = sampling_timesteps(steps, shift).double()
    result = euler_sample(constant_velocity, noise, timesteps)
    torch.testing.assert_close(result, clean, atol=1e-10, rtol=0)
    assert len(calls) == steps
    torch.testing.assert_close(torch.stack([c[0] for c in calls]), timesteps[:-1])

    # The state-dependent form of the same field, v(x, t) = (x - x_0) / t, also lands on x_0: every Euler step
    # stays on the straight line, so the times handed to the velocity must be the current ones.
    def path_velocity(x, t):
        return (x - clean) / t.view(-1, 1, 1, 1)

    torch.testing.assert_close(euler_sample(path_velocity, noise, timesteps), clean, atol=1e-10, rtol=0)


def test_euler_callback_sees_every_step():
    seen = []
    noise = torch.zeros(1, 1, 2, 2)
    euler_sample(lambda x, t: torch.ones_like(x), noise, sampling_timesteps(4), callback=lambda index, x: seen.append(index))
    assert seen == [0, 1, 2, 3]


# -------------------------------------------------------------------------------------- guidance
def test_text_guidance():
    conditional, unconditional = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(text_guidance(conditional, unconditional, 1.0), conditional)
    torch.testing.assert_close(text_guidance(conditional, unconditional, 0.0), unconditional)
    torch.testing.assert_close(text_guidance(conditional, unconditional, 4.0), unconditional + 4.0 * (conditional - unconditional))


def test_edit_guidance_reduces_to_its_branches():
    full, image_only, unconditional = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(edit_guidance(full, image_only, unconditional, 1.0, 1.0), full)
    torch.testing.assert_close(edit_guidance(full, image_only, unconditional, 0.0, 1.0), image_only)
    torch.testing.assert_close(edit_guidance(full, image_only, unconditional, 0.0, 0.0), unconditional)
    expected = unconditional + 1.5 * (image_only - unconditional) + 6.5 * (full - image_only)
    torch.testing.assert_close(edit_guidance(full, image_only, unconditional, 6.5, 1.5), expected)

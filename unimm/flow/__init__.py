"""Flow matching, model-agnostic: the path, training timesteps, the loss and the samplers.

Convention (SD3, Bagel, RAE, PS-VAE): ``x_t = (1 - t) * x_0 + t * noise``, **t = 1 is pure noise**, the
network predicts the velocity ``v = noise - x_0``, and sampling integrates from t = 1 down to t = 0.
Nothing here knows about the generator; samplers take a plain ``velocity(x, t)`` function.
"""

from unimm.flow.path import flow_matching_loss, interpolate, velocity_target
from unimm.flow.sampling import edit_guidance, euler_sample, sampling_timesteps, text_guidance
from unimm.flow.timesteps import logit_normal_timesteps, shift_timesteps, training_shift, training_timesteps

__all__ = [
    "edit_guidance",
    "euler_sample",
    "flow_matching_loss",
    "interpolate",
    "logit_normal_timesteps",
    "sampling_timesteps",
    "shift_timesteps",
    "text_guidance",
    "training_shift",
    "training_timesteps",
    "velocity_target",
]

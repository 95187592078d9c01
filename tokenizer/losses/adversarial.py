"""Adversarial losses of the LDM / taming-transformers recipe (hinge discriminator, adaptive weight)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def hinge_discriminator_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """0.5·(mean relu(1 − D(x)) + mean relu(1 + D(x̂))), taming's ``hinge_d_loss``.

    The 0.5 is taming's convention: a discriminator that cannot tell (all logits 0) scores 1.0.
    Logits are the PatchGAN maps (B, 1, h, w); ``logits_fake`` must come from detached reconstructions so
    this loss trains only the discriminator.
    """
    loss_real = F.relu(1.0 - logits_real).mean()
    loss_fake = F.relu(1.0 + logits_fake).mean()
    return 0.5 * (loss_real + loss_fake)


def generator_adversarial_loss(logits_fake: Tensor) -> Tensor:
    """−mean D(x̂): the generator (decoder) side of the hinge GAN, as in LDM and taming."""
    return -logits_fake.mean()


def adaptive_generator_weight(
    reconstruction_loss: Tensor,
    generator_loss: Tensor,
    last_layer_weight: Tensor,
    max_weight: float = 1e4,
    eps: float = 1e-4,
) -> Tensor:
    """Balance the GAN term against reconstruction: ‖∇_w L_rec‖ / (‖∇_w L_gen‖ + eps), clamped to [0, max_weight].

    ``w`` is the weight of the decoder's last layer (e.g. its output conv); ``reconstruction_loss`` is the
    already weighted pixel + perceptual loss (LDM's ``nll_loss``). This is the VQGAN/LDM recipe: the
    adversarial gradient at the output is scaled to the size of the reconstruction gradient, so the GAN
    neither vanishes nor swamps reconstruction whatever the loss scales. The graphs are retained (the
    total loss is back-propagated afterwards) and the result is detached (a weight, not a loss term).

    Fallback: with autograd disabled (``torch.no_grad`` / ``inference_mode``, i.e. validation) there is no
    gradient to measure and the weight only enters logged numbers, so a 0.0 tensor is returned, as LDM
    does in eval. With autograd enabled, a loss that does not reach ``last_layer_weight`` is a wiring bug
    in training and raises ``ValueError`` instead of silently switching the GAN off.
    """
    if not torch.is_grad_enabled():
        return torch.zeros((), device=last_layer_weight.device)
    if not (reconstruction_loss.requires_grad and generator_loss.requires_grad):
        raise ValueError(
            "adaptive_generator_weight: both losses must require grad (got reconstruction "
            f"{reconstruction_loss.requires_grad}, generator {generator_loss.requires_grad})"
        )
    try:
        (reconstruction_grad,) = torch.autograd.grad(
            reconstruction_loss, last_layer_weight, retain_graph=True
        )
        (generator_grad,) = torch.autograd.grad(generator_loss, last_layer_weight, retain_graph=True)
    except RuntimeError as error:
        raise ValueError(
            f"adaptive_generator_weight: cannot differentiate the losses w.r.t. the last layer: {error}"
        ) from error
    # Norms in float32: under bf16 the squared sum of a large weight's gradient loses precision.
    weight = reconstruction_grad.float().norm() / (generator_grad.float().norm() + eps)
    return weight.clamp(0.0, max_weight).detach()


class LastLayerCapture:
    """Keeps the input of a decoder's last layer from its latest forward (a forward hook), so the adaptive
    GAN weight can be measured on a detached replay of that layer.

    Why a replay: under DeepSpeed ZeRO any autograd pass through tensors of the engine's forward (even
    `torch.autograd.grad` w.r.t. an intermediate tensor) runs the engine's backward epilogue and its
    gradient reduction in the middle of the step. Replaying the last layer on its detached input with a
    detached copy of its weight gives the same ∂L/∂w (the losses depend on w only through this layer's
    output) in a graph the engine never sees.
    """

    def __init__(self, layer: torch.nn.Module):
        self.layer = layer
        self.layer_input: Tensor | None = None
        self._replaying = False
        self._handle = layer.register_forward_hook(self._store)

    def _store(self, module, inputs, output) -> None:
        if not self._replaying:  # a replay must not replace the training forward's input
            self.layer_input = inputs[0]

    def remove(self) -> None:
        self._handle.remove()

    def replay(self) -> tuple[Tensor, Tensor]:
        """(output of the last layer recomputed from its detached input, the weight leaf it depends on)."""
        weight = self.layer.weight.detach().requires_grad_(True)
        parameters = {name: value.detach() for name, value in self.layer.named_parameters()}
        parameters["weight"] = weight
        self._replaying = True
        try:
            output = torch.func.functional_call(self.layer, parameters, (self.layer_input.detach(),))
        finally:
            self._replaying = False
        return output, weight


def adaptive_generator_weight_by_replay(
    capture: LastLayerCapture,
    output_to_image,
    reconstruction_loss_fn,
    generator_loss_fn,
    max_weight: float = 1e4,
    eps: float = 1e-4,
) -> Tensor:
    """`adaptive_generator_weight`, measured on a replay of the decoder's last layer (see `LastLayerCapture`).

    `output_to_image` maps the last layer's output to the reconstruction (identity for a conv decoder,
    unpatchify for a ViT decoder); the two loss functions take that reconstruction and must compute the
    same reconstruction (pixel + perceptual) and generator losses as the training step.
    """
    if not torch.is_grad_enabled():
        return torch.zeros((), device=capture.layer.weight.device)
    with torch.enable_grad():
        output, weight = capture.replay()
        image = output_to_image(output)
        (reconstruction_grad,) = torch.autograd.grad(reconstruction_loss_fn(image), weight, retain_graph=True)
        (generator_grad,) = torch.autograd.grad(generator_loss_fn(image), weight)
    ratio = reconstruction_grad.float().norm() / (generator_grad.float().norm() + eps)
    return ratio.clamp(0.0, max_weight).detach()


def adversarial_start_factor(step: int, start_step: int) -> float:
    """0.0 before ``start_step`` and 1.0 from it on (LDM's ``adopt_weight`` with ``disc_start``).

    The discriminator and the generator's GAN term start late so the decoder first learns to reconstruct.
    """
    return 1.0 if step >= start_step else 0.0

"""Tokenizer losses: known values and properties of every loss, the PatchGAN and the LPIPS wrapper."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

from tokenizer.layers.discriminator import PatchDiscriminator, PatchDiscriminatorConfig
from tokenizer.losses import (
    PerceptualLoss,
    adaptive_generator_weight,
    adversarial_start_factor,
    alignment_loss,
    cosine_distillation_loss,
    gaussian_kl_loss,
    generator_adversarial_loss,
    hinge_discriminator_loss,
    pixel_reconstruction_loss,
    semantic_preservation_loss,
    semantic_reconstruction_loss,
    teacher_feature_loss,
)
from unimm.errors import UserError


@pytest.fixture(autouse=True, scope="module")
def single_intra_op_thread():
    """Tiny convolutions gain nothing from intra-op threads, and on a busy 2-core runner the thread pool
    spin-waits and makes them ~10x slower; restore the setting for the other test files."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------- pixel reconstruction


def test_pixel_losses_on_hand_made_tensors():
    reconstruction = torch.tensor([[1.0, -2.0], [0.0, 3.0]])
    target = torch.zeros(2, 2)
    # |errors| = 1, 2, 0, 3 -> L1 = 6/4; squares = 1, 4, 0, 9 -> L2 = 14/4
    assert pixel_reconstruction_loss(reconstruction, target, "l1").item() == pytest.approx(1.5)
    assert pixel_reconstruction_loss(reconstruction, target, "l2").item() == pytest.approx(3.5)
    assert pixel_reconstruction_loss(reconstruction, target, "l1+l2").item() == pytest.approx(5.0)
    assert pixel_reconstruction_loss(reconstruction, target).item() == pytest.approx(1.5)


def test_pixel_loss_rejects_unknown_kind_and_broadcasting():
    with pytest.raises(ValueError, match="unknown pixel loss kind"):
        pixel_reconstruction_loss(torch.zeros(2), torch.zeros(2), "huber")
    with pytest.raises(ValueError, match="shape"):
        pixel_reconstruction_loss(torch.zeros(2, 3), torch.zeros(1, 3))


# ---------------------------------------------------------------- KL


def test_kl_of_standard_normal_is_zero():
    mean = torch.zeros(4, 8, 2, 2)
    assert gaussian_kl_loss(mean, torch.zeros_like(mean)).item() == pytest.approx(0.0)


def test_kl_of_unit_mean_is_half_the_latent_size():
    latent_shape = (3, 4, 5)  # D = 60 latent elements per sample
    mean = torch.ones(2, *latent_shape)
    assert gaussian_kl_loss(mean, torch.zeros_like(mean)).item() == pytest.approx(0.5 * 60)


def test_kl_averages_over_batch_and_matches_closed_form_per_sample():
    mean = torch.tensor([[0.0, 2.0], [1.0, 0.0]])
    logvar = torch.tensor([[math.log(2.0), 0.0], [0.0, 0.0]])
    # sample 0: 0.5*(0+2-1-log2) + 0.5*(4+1-1-0) = 0.5*(1-log2) + 2 ; sample 1: 0.5
    expected = (0.5 * (1 - math.log(2.0)) + 2.0 + 0.5) / 2
    assert gaussian_kl_loss(mean, logvar).item() == pytest.approx(expected, rel=1e-6)


def test_kl_gradient():
    mean = torch.tensor([[0.5, -1.0]], requires_grad=True)
    logvar = torch.tensor([[0.3, -0.2]], requires_grad=True)
    gaussian_kl_loss(mean, logvar).backward()
    # d/dmean = mean ; d/dlogvar = 0.5*(exp(logvar) - 1)
    torch.testing.assert_close(mean.grad, mean.detach())
    torch.testing.assert_close(logvar.grad, 0.5 * (logvar.detach().exp() - 1))


# ---------------------------------------------------------------- semantic losses


def test_semantic_reconstruction_loss_zero_for_identical_features():
    features = torch.randn(2, 5, 16)
    losses = semantic_reconstruction_loss(features.clone(), features)
    for name in ("l2", "cosine", "total"):
        assert losses[name].item() == pytest.approx(0.0, abs=1e-6)


def test_semantic_reconstruction_cosine_term_for_orthogonal_and_opposite():
    target = torch.tensor([[[1.0, 0.0]]])
    assert semantic_reconstruction_loss(torch.tensor([[[0.0, 3.0]]]), target)[
        "cosine"
    ].item() == pytest.approx(1.0)
    assert semantic_reconstruction_loss(torch.tensor([[[-2.0, 0.0]]]), target)[
        "cosine"
    ].item() == pytest.approx(2.0)


def test_semantic_reconstruction_l2_exact_and_total_is_sum():
    predicted = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    target = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    losses = semantic_reconstruction_loss(predicted, target)
    assert losses["l2"].item() == pytest.approx((0 + 1 + 1 + 0) / 4)
    expected_cosine = ((1 - 1 / math.sqrt(2)) + 0.0) / 2
    assert losses["cosine"].item() == pytest.approx(expected_cosine, rel=1e-6)
    assert losses["total"].item() == pytest.approx(losses["l2"].item() + expected_cosine, rel=1e-6)


def test_semantic_reconstruction_channel_dim():
    # (B, D, N) layout: vectors along dim 1 are identical up to scale -> cosine 0, l2 > 0
    target = torch.randn(2, 8, 3)
    losses = semantic_reconstruction_loss(2 * target, target, channel_dim=1)
    assert losses["cosine"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["l2"].item() > 0


def test_teacher_feature_loss_is_mse_and_detaches_teacher():
    student = torch.tensor([[1.0, 2.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 0.0]], requires_grad=True)
    loss = teacher_feature_loss(student, teacher)
    assert loss.item() == pytest.approx(2.5)
    loss.backward()
    assert teacher.grad is None
    torch.testing.assert_close(student.grad, torch.tensor([[1.0, 2.0]]))  # 2*(s - t)/N


def test_semantic_preservation_loss_is_mean_squared_error():
    latent_mean = torch.tensor([[3.0, 0.0, 0.0, 1.0]], requires_grad=True)
    teacher_latent = torch.zeros(1, 4, requires_grad=True)
    loss = semantic_preservation_loss(latent_mean, teacher_latent)
    assert loss.item() == pytest.approx(10.0 / 4)
    loss.backward()
    assert teacher_latent.grad is None


def test_cosine_distillation_loss_values():
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert cosine_distillation_loss(5 * target, target).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_distillation_loss(-target, target).item() == pytest.approx(2.0)
    assert cosine_distillation_loss(target.flip(1), target).item() == pytest.approx(1.0)


# ---------------------------------------------------------------- ReaLS alignment


def test_alignment_loss_known_values():
    target = torch.tensor([[1.0, 0.0]])
    assert alignment_loss(target.clone(), target).item() == pytest.approx(0.0, abs=1e-6)
    # opposite direction: cosine part 2; errors (-2, 0) -> smooth-L1 (|e| >= 1: |e| - 0.5) = (1.5 + 0)/2
    assert alignment_loss(-target, target).item() == pytest.approx(0.9 * 2.0 + 0.1 * 0.75)
    # same direction, half length: cosine 0; errors (-0.5, 0) -> 0.5*0.25 / 2 elements
    assert alignment_loss(0.5 * target, target).item() == pytest.approx(0.1 * 0.0625)
    assert alignment_loss(-target, target, cosine_weight=1.0, smooth_weight=0.0).item() == pytest.approx(2.0)


def test_alignment_loss_on_patches_and_cls_detaches_target():
    predicted_patches = torch.randn(2, 4, 8, requires_grad=True)
    target_patches = torch.randn(2, 4, 8, requires_grad=True)
    predicted_cls, target_cls = torch.randn(2, 8, requires_grad=True), torch.randn(2, 8)
    loss = alignment_loss(predicted_patches, target_patches) + alignment_loss(predicted_cls, target_cls)
    loss.backward()
    assert predicted_patches.grad is not None and predicted_cls.grad is not None
    assert target_patches.grad is None


# ---------------------------------------------------------------- adversarial


def test_hinge_discriminator_loss_exact_values():
    logits = torch.ones(2, 1, 3, 3)
    assert hinge_discriminator_loss(2 * logits, -2 * logits).item() == pytest.approx(0.0)
    assert hinge_discriminator_loss(0 * logits, 0 * logits).item() == pytest.approx(1.0)
    # real 0.5 -> relu(0.5) = 0.5 ; fake 1 -> relu(2) = 2 ; 0.5 * (0.5 + 2)
    assert hinge_discriminator_loss(0.5 * logits, logits).item() == pytest.approx(1.25)


def test_generator_adversarial_loss():
    assert generator_adversarial_loss(torch.tensor([1.0, 3.0, -1.0])).item() == pytest.approx(-1.0)


def test_adaptive_weight_is_ratio_of_last_layer_gradient_norms():
    # Last layer y = w·x with w = (1, 2), x = (3, 4): y = 11.
    # L_rec = y² -> ∇_w = 2y·x = (66, 88), norm 110 ; L_gen = -5y -> ∇_w = -5x, norm 25.
    last_layer_weight = torch.tensor([1.0, 2.0], requires_grad=True)
    output = (last_layer_weight * torch.tensor([3.0, 4.0])).sum()
    weight = adaptive_generator_weight(output**2, -5 * output, last_layer_weight, eps=0.0)
    assert weight.item() == pytest.approx(110 / 25)
    assert not weight.requires_grad
    # the graph is retained for the real backward of the total loss
    (output**2).backward()
    torch.testing.assert_close(last_layer_weight.grad, torch.tensor([66.0, 88.0]))


def test_adaptive_weight_is_clamped_and_uses_eps():
    last_layer_weight = torch.tensor([1.0, 2.0], requires_grad=True)
    output = (last_layer_weight * torch.tensor([3.0, 4.0])).sum()
    weight = adaptive_generator_weight(output**2, 1e-9 * output, last_layer_weight, max_weight=50.0)
    assert weight.item() == pytest.approx(50.0)
    # with eps the ratio is 110 / (25 + eps)
    weight = adaptive_generator_weight(output**2, -5 * output, last_layer_weight, eps=5.0)
    assert weight.item() == pytest.approx(110 / 30)


def test_adaptive_weight_fallback_without_autograd_and_error_when_unconnected():
    layer = nn.Linear(2, 1)
    with torch.no_grad():
        output = layer(torch.ones(1, 2)).sum()
        assert adaptive_generator_weight(output, output, layer.weight).item() == 0.0
    other_layer = nn.Linear(2, 1)
    output = layer(torch.ones(1, 2)).sum()
    with pytest.raises(ValueError, match="last layer"):
        adaptive_generator_weight(output, -output, other_layer.weight)


def test_adversarial_start_factor():
    assert adversarial_start_factor(0, 100) == 0.0
    assert adversarial_start_factor(99, 100) == 0.0
    assert adversarial_start_factor(100, 100) == 1.0
    assert adversarial_start_factor(5000, 100) == 1.0
    assert adversarial_start_factor(0, 0) == 1.0


# ---------------------------------------------------------------- PatchGAN


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
@pytest.mark.parametrize(("size", "logits_size"), [(64, 6), (256, 30)])
def test_patch_discriminator_shape_and_backward(norm, size, logits_size):
    discriminator = PatchDiscriminator(
        PatchDiscriminatorConfig(base_channels=8 if size == 256 else 16, norm=norm)
    )
    images = torch.randn(1, 3, size, size, requires_grad=True)
    logits = discriminator(images)
    assert logits.shape == (1, 1, logits_size, logits_size)
    hinge_discriminator_loss(logits, -logits).backward()
    assert images.grad is not None
    assert all(parameter.grad is not None for parameter in discriminator.parameters())


def test_patch_discriminator_default_width_and_init():
    discriminator = PatchDiscriminator()
    convolutions = [module for module in discriminator.modules() if isinstance(module, nn.Conv2d)]
    assert [conv.out_channels for conv in convolutions] == [64, 128, 256, 512, 1]
    assert [conv.bias is not None for conv in convolutions] == [True, False, False, False, True]
    assert convolutions[3].weight.std().item() == pytest.approx(0.02, rel=0.05)
    norms = [module for module in discriminator.modules() if isinstance(module, nn.BatchNorm2d)]
    assert len(norms) == 3 and abs(norms[2].weight.mean().item() - 1.0) < 0.01


def test_patch_discriminator_rejects_unknown_norm():
    with pytest.raises(ValueError, match="norm"):
        PatchDiscriminator(PatchDiscriminatorConfig(norm="layer"))


# ---------------------------------------------------------------- LPIPS


@pytest.fixture(scope="module")
def random_perceptual_loss():
    torch.manual_seed(0)
    return PerceptualLoss(random_backbone=True)


def torchvision_vgg16_features() -> nn.Sequential:
    """torchvision's VGG16 ``features`` stack, built without the 102M-parameter classifier (fast on CPU)."""
    return torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])


def reference_lpips(features: nn.Sequential, heads: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor):
    """LPIPS written out from the paper's recipe, independent of the lpips package's slicing, (B,)."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    tapped_relus = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
    activations_x, activations_y = (x - shift) / scale, (y - shift) / scale
    distance = torch.zeros(x.shape[0])
    for index, layer in enumerate(features[:30]):
        activations_x, activations_y = layer(activations_x), layer(activations_y)
        if index in tapped_relus:
            unit_x = activations_x / (activations_x.norm(dim=1, keepdim=True) + 1e-10)
            unit_y = activations_y / (activations_y.norm(dim=1, keepdim=True) + 1e-10)
            head = heads[tapped_relus.index(index)]  # (1, C, 1, 1)
            distance += ((unit_x - unit_y) ** 2 * head).sum(dim=1).mean(dim=(1, 2))
    return distance


def test_perceptual_loss_zero_for_identical_positive_for_different(random_perceptual_loss):
    torch.manual_seed(1)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    y = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert random_perceptual_loss(x, x.clone()).item() == pytest.approx(0.0, abs=1e-7)
        distances = random_perceptual_loss.per_image(x, y)
        assert distances.shape == (2,) and bool((distances > 0).all())
        torch.testing.assert_close(random_perceptual_loss(y, x), distances.mean())  # symmetric


def test_perceptual_loss_tensors_are_all_initialised(random_perceptual_loss):
    scaling = random_perceptual_loss.network.scaling_layer
    torch.testing.assert_close(scaling.shift.flatten(), torch.tensor([-0.030, -0.088, -0.188]))
    torch.testing.assert_close(scaling.scale.flatten(), torch.tensor([0.458, 0.448, 0.450]))
    for name, tensor in random_perceptual_loss.state_dict().items():
        assert torch.isfinite(tensor).all(), name
        assert tensor.abs().max() < 100, name


def test_perceptual_loss_gradients_reach_input_not_network(random_perceptual_loss):
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    y = torch.rand(1, 3, 16, 16)
    random_perceptual_loss(x * 2 - 1, y * 2 - 1).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(
        not parameter.requires_grad and parameter.grad is None
        for parameter in random_perceptual_loss.parameters()
    )


def test_perceptual_loss_stays_in_eval_mode(random_perceptual_loss):
    container = nn.ModuleDict({"perceptual": random_perceptual_loss})
    container.train()
    assert not random_perceptual_loss.training
    assert not any(module.training for module in random_perceptual_loss.modules())


def test_perceptual_loss_uses_shipped_linear_heads(random_perceptual_loss):
    linear_head = random_perceptual_loss.network.lin0.model[1].weight
    assert bool((linear_head >= 0).all()) and linear_head.abs().sum() > 0  # LPIPS heads are non-negative


def test_perceptual_loss_loads_torchvision_vgg16_state_dict(tmp_path):
    torch.manual_seed(2)
    features = torchvision_vgg16_features()
    state = {f"features.{key}": value for key, value in features.state_dict().items()}
    state["classifier.6.bias"] = torch.zeros(1000)  # real files carry a classifier: ignored
    weights_path = tmp_path / "vgg16.pth"
    torch.save(state, weights_path)

    loaded = PerceptualLoss(backbone_weights=str(weights_path))
    assert loaded.weights_path == weights_path
    torch.testing.assert_close(loaded.network.net.slice3[1].weight, state["features.10.weight"])

    # Same weights put into the random instance give the same network and the same distances.
    random_copy = PerceptualLoss(random_backbone=True)
    random_copy.load_state_dict(loaded.state_dict())
    x, y = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        distances = loaded.per_image(x, y)
        torch.testing.assert_close(random_copy.per_image(x, y), distances)

        # And they equal LPIPS computed directly on the torchvision layers: the slice mapping is right.
        heads = [loaded.network.lins[index].model[1].weight.view(1, -1, 1, 1) for index in range(5)]
        torch.testing.assert_close(reference_lpips(features, heads, x, y), distances, rtol=1e-4, atol=1e-6)


def test_perceptual_loss_finds_weights_via_environment_and_torch_cache(tmp_path, monkeypatch):
    # keys "N.weight", as saved from a ``vgg.features`` module: accepted too
    features = torchvision_vgg16_features().state_dict()
    cache_file = tmp_path / "torch_home" / "hub" / "checkpoints" / "vgg16-397923af.pth"
    cache_file.parent.mkdir(parents=True)
    torch.save(features, cache_file)
    monkeypatch.delenv("UNIMM_VGG16_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    assert PerceptualLoss().weights_path == cache_file
    monkeypatch.setenv("UNIMM_VGG16_WEIGHTS", str(cache_file))
    assert PerceptualLoss().weights_path == cache_file


def test_perceptual_loss_missing_weights_raise_one_line_user_error(tmp_path, monkeypatch):
    monkeypatch.delenv("UNIMM_VGG16_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    with pytest.raises(UserError) as raised:
        PerceptualLoss()
    message = str(raised.value)
    assert "\n" not in message
    assert "UNIMM_VGG16_WEIGHTS" in message and "vgg16-397923af.pth" in message

    with pytest.raises(UserError, match="not found"):
        PerceptualLoss(backbone_weights=str(tmp_path / "missing.pth"))
    monkeypatch.setenv("UNIMM_VGG16_WEIGHTS", str(tmp_path / "missing.pth"))
    with pytest.raises(UserError, match="UNIMM_VGG16_WEIGHTS"):
        PerceptualLoss()


def test_perceptual_loss_rejects_files_that_are_not_vgg16_tensors(tmp_path):
    not_vgg = tmp_path / "other.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, not_vgg)
    with pytest.raises(UserError, match="not a torchvision VGG16 state dict"):
        PerceptualLoss(backbone_weights=str(not_vgg))
    pickled_object = tmp_path / "object.pth"
    torch.save({"model": nn.Linear(1, 1)}, pickled_object)  # needs full unpickling: refused
    with pytest.raises(UserError, match="cannot read"):
        PerceptualLoss(backbone_weights=str(pickled_object))


@pytest.mark.parametrize("layer_kind", ["conv", "linear"])
def test_adaptive_weight_by_replay_equals_the_direct_gradient(layer_kind):
    """The DeepSpeed-safe path (a detached replay of the last layer) gives LDM's number exactly."""
    from tokenizer.losses import LastLayerCapture, adaptive_generator_weight_by_replay

    torch.manual_seed(0)
    if layer_kind == "conv":
        body, last = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 3, 3, padding=1)
        inputs = torch.randn(2, 3, 8, 8)
    else:
        body, last = torch.nn.Linear(5, 8), torch.nn.Linear(8, 4)
        inputs = torch.randn(6, 5)
    capture = LastLayerCapture(last)
    output = last(torch.tanh(body(inputs)))
    direction = torch.linspace(-1, 1, output.shape[-1])

    def reconstruction_loss(image):
        return (image - 0.3).abs().mean()

    def generator_loss(image):
        return -(image * direction).mean()

    direct = adaptive_generator_weight(reconstruction_loss(output), generator_loss(output), last.weight)
    replayed = adaptive_generator_weight_by_replay(capture, lambda x: x, reconstruction_loss, generator_loss)
    torch.testing.assert_close(replayed, direct, rtol=1e-5, atol=1e-6)
    assert last.weight.grad is None  # measuring leaves no gradient behind
    capture.replay()
    assert capture.layer_input.shape[0] == inputs.shape[0]  # a replay does not replace the captured input

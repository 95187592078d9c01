"""Caption hard negatives and the caption-contrast term (unimm/training/hard_negatives.py): which negatives a
caption gets, the loss's value and direction, and the trainer's second pass on a tiny Shapes run."""

from __future__ import annotations

import pytest
import torch

from data.shapes.vocabulary import COLORS
from eval.shapes_binding import SHAPES_SWAP_PAIRS
from tests.test_generator_training import t2i_config
from unimm.errors import UserError
from unimm.trainer import GeneratorTrainer
from unimm.training.hard_negatives import CaptionNegatives, caption_contrast_loss

COLOURS = list(COLORS)
RELATIONS = SHAPES_SWAP_PAIRS


@pytest.mark.parametrize("caption, negatives", [
    ("a photo of a circle left of a square", ["a photo of a circle right of a square"]),
    ("a photo of a star below a triangle", ["a photo of a star above a triangle"]),
    ("a photo of a red circle and a purple square", ["a photo of a purple circle and a red square"]),
    ("a photo of a red circle above a blue star", ["a photo of a red circle below a blue star", "a photo of a blue circle above a red star"]),
    # Repeated colours: the first two *different* ones trade places.
    ("a photo of two red circles, a red star and a green cross", ["a photo of two green circles, a red star and a red cross"]),
    # Nothing to bind wrongly: no negative.
    ("a photo of two red circles and a red square", []),
    ("a photo of a circle and a square", []),
    # Whole words only.
    ("a photo of leftover reddish shapes", []),
    ("", []),
])
def test_hard_negatives_swap_relations_and_trade_colours(caption, negatives):
    assert CaptionNegatives(RELATIONS, [COLOURS]).candidates(caption) == negatives


def test_sampling_is_seeded_and_skips_captions_without_a_negative():
    builder = CaptionNegatives(RELATIONS, [COLOURS])
    captions = ["a photo of a red circle above a blue star", "a photo of a circle", ""] * 8
    first = builder.sample(captions, torch.Generator().manual_seed(3))
    assert first == builder.sample(captions, torch.Generator().manual_seed(3))
    assert all(negative is None for negative in first[1::3] + first[2::3])
    assert set(first[0::3]) == set(builder.candidates(captions[0]))  # both negatives of the first caption get drawn


def test_bad_swap_pairs_are_refused():
    with pytest.raises(ValueError, match="two different words"):
        CaptionNegatives([["left", "left"]], [])


def test_contrast_loss_is_zero_when_undecided_and_rewards_fitting_the_true_caption_better():
    same = torch.tensor([0.5, 0.7])
    assert caption_contrast_loss(same, same.clone(), 100.0).item() == pytest.approx(0.0, abs=1e-6)
    loss_true = torch.tensor([0.50, 0.70], requires_grad=True)
    loss_negative = torch.tensor([0.51, 0.71], requires_grad=True)
    value = caption_contrast_loss(loss_true, loss_negative, 100.0)
    assert value.item() < 0
    value.backward()
    assert (loss_true.grad > 0).all() and (loss_negative.grad < 0).all()  # descent lowers L_true and raises L_negative
    # It saturates: far apart, the gradient is nearly gone, so the two are not pushed apart without bound.
    far_true = torch.tensor([0.5], requires_grad=True)
    caption_contrast_loss(far_true, torch.tensor([0.6]), 100.0).backward()
    assert far_true.grad.abs().item() < 1e-3 * loss_true.grad.abs().max().item()


def contrast_config(generator_parts, shapes, output_dir, **changes):
    config = t2i_config(generator_parts, shapes, output_dir, **changes)
    config.train.caption_contrast.weight = 0.5
    config.train.caption_contrast.swap_pairs = RELATIONS
    config.train.caption_contrast.exchange_classes = [COLOURS]
    return config


def test_trainer_adds_the_contrast_term_and_logs_it(generator_parts, shapes, tmp_path):
    records = GeneratorTrainer(contrast_config(generator_parts, shapes, tmp_path / "run", steps=4)).train()
    with_negatives = [record for record in records if "contrast" in record]
    assert with_negatives, "the tiny Shapes captions name two colours often enough for a negative in 4 batches of 4"
    for record in with_negatives:
        assert 0 < record["negative_fraction"] <= 1
        assert record["loss"] == pytest.approx(record["flow_loss"] + 0.5 * record["contrast"], rel=1e-5)


def margin_after_training(generator_parts, shapes, output_dir, contrast_weight: float, steps: int = 30) -> float:
    """Fit one fixed batch of relation/colour captions for `steps` Adam steps on flow + weight * contrast, then
    return how much worse the negatives fit (mean per-sample loss difference) on fresh noise."""
    from unimm.flow import flow_matching_loss, interpolate
    from unimm.models.backbone import encode_text
    from unimm.models.sequence import SampleSpec, build_layout

    torch.manual_seed(0)
    trainer = GeneratorTrainer(contrast_config(generator_parts, shapes, output_dir))
    captions = ["a photo of a red circle left of a blue square", "a photo of a green star above a yellow cross"] * 4
    clean = torch.randn(len(captions), *trainer.tokenizer.latent_shape, generator=torch.Generator().manual_seed(0))
    grid = tuple(clean.shape[-2:])
    layout = build_layout([SampleSpec(ids) for ids in encode_text(trainer.text_tokenizer, captions, 24)], grid)
    optimizer = torch.optim.Adam(trainer.unwrapped.parameters(), lr=3e-3)
    for step in range(steps + 1):
        random = torch.Generator().manual_seed(step)
        noise = torch.randn(clean.shape, generator=random)
        t = torch.rand(len(captions), generator=random) * 0.6 + 0.2
        noisy = interpolate(clean, noise, t)
        velocity = trainer.model(layout, noisy, t)
        contrast, terms = trainer._caption_contrast(captions, noisy, t, velocity, clean, noise, grid, random)
        if step == steps:
            return terms["negative_margin"]
        optimizer.zero_grad()
        (flow_matching_loss(velocity, clean, noise) + contrast_weight * contrast).backward()
        optimizer.step()


def test_the_contrast_term_teaches_the_model_to_tell_the_captions_apart(generator_parts, shapes, tmp_path):
    """Same start, same batches: with the term the negatives end up fitting the images clearly worse than without."""
    without = margin_after_training(generator_parts, shapes, tmp_path / "without", contrast_weight=0.0)
    with_term = margin_after_training(generator_parts, shapes, tmp_path / "with", contrast_weight=0.5)
    assert with_term > 0.005 and with_term > 20 * abs(without), (with_term, without)  # measured: 0.012 against 4e-5


@pytest.mark.parametrize("change, message", [
    ({"weight": 0.1}, "no swap_pairs or exchange_classes"),
    ({"weight": -1.0}, "weight >= 0"),
    ({"weight": 0.1, "swap_pairs": [["left"]]}, "must be two different words"),
])
def test_bad_contrast_settings_are_one_line_errors(generator_parts, shapes, tmp_path, change, message):
    config = t2i_config(generator_parts, shapes, tmp_path / "run")
    for key, value in change.items():
        setattr(config.train.caption_contrast, key, value)
    with pytest.raises(UserError, match=message):
        GeneratorTrainer(config)


def test_the_contrast_term_is_refused_for_editing(generator_parts, shapes, tmp_path):
    config = contrast_config(generator_parts, shapes, tmp_path / "run")
    config.train.task = "edit"
    with pytest.raises(UserError, match="text-to-image term"):
        GeneratorTrainer(config)


def test_a_batch_without_negatives_still_runs_the_second_pass_under_several_processes(generator_parts, shapes, tmp_path):
    """ZeRO-3 gathers parameters in every forward pass, so all ranks must run the same number of them: a rank whose
    batch has no negative runs a placeholder pass that adds exactly nothing."""
    from unimm.flow import interpolate

    trainer = GeneratorTrainer(contrast_config(generator_parts, shapes, tmp_path / "run"))
    captions = ["a photo of a circle", "a photo of two red squares"]
    clean = torch.randn(2, *trainer.tokenizer.latent_shape)
    noise, t = torch.randn(clean.shape), torch.full((2,), 0.7)
    grid = tuple(clean.shape[-2:])
    from unimm.models.backbone import encode_text
    from unimm.models.sequence import SampleSpec, build_layout

    layout = build_layout([SampleSpec(ids) for ids in encode_text(trainer.text_tokenizer, captions, 24)], grid)
    noisy = interpolate(clean, noise, t)
    velocity = trainer.model(layout, noisy, t)
    assert trainer._caption_contrast(captions, noisy, t, velocity, clean, noise, grid, torch.Generator()) is None
    trainer.world_size = 2
    value, terms = trainer._caption_contrast(captions, noisy, t, velocity, clean, noise, grid, torch.Generator())
    assert terms == {} and value.item() == 0.0 and value.requires_grad

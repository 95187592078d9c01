"""`model.text_summary`: the backbone's state at the caption's last token added to every noisy image token.

A tiny real Qwen2 backbone (the Shapes text model, saved and loaded back); nothing mocked. The summary must be
exactly the last text token's final state, the same in every layout and in the KV-cached sampler, and a model
that gains it from a checkpoint trained without it must start out predicting exactly what that checkpoint did.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.test_generator_model import GRID, build_generator, latents, text_model_dir, times  # noqa: F401 - fixture
from unimm.errors import UserError
from unimm.models.generator import UnimmGenerator
from unimm.models.sequence import SampleSpec, build_layout


def with_summary(model: UnimmGenerator, projection_seed: int | None = 0) -> UnimmGenerator:
    """The same weights in a model with `text_summary`; the projection random (or left at its zero start)."""
    summary_model = UnimmGenerator(replace(model.config, text_summary=True), model.backbone)
    missing, unexpected = summary_model.load_state_dict(model.state_dict(), strict=False)
    assert sorted(missing) == ["text_summary_projection.bias", "text_summary_projection.weight"] and not unexpected
    if projection_seed is not None:
        generator = torch.Generator().manual_seed(projection_seed)
        with torch.no_grad():
            weight = summary_model.text_summary_projection.weight
            weight.copy_(torch.randn(weight.shape, generator=generator) / weight.shape[1] ** 0.5)
    return summary_model.eval()


@pytest.fixture(scope="module")
def plain_model(text_model_dir):  # noqa: F811 - the imported fixture
    return build_generator(text_model_dir)


@pytest.fixture(scope="module")
def summary_model(plain_model):
    return with_summary(plain_model)


def mixed_batch():
    specs = [
        SampleSpec([5, 9, 14, 22]),
        SampleSpec([]),  # a dropped caption: no text, a zero summary
        SampleSpec([11, 19, 23], has_clean_image=True),
        SampleSpec([7, 3]),
    ]
    return specs, latents(4, 30), times(4, 30), latents(1, 31)


@torch.no_grad()
def test_zero_projection_predicts_what_the_model_without_it_did(plain_model):
    specs, noisy, t, clean = mixed_batch()
    layout = build_layout(specs, GRID)
    started = with_summary(plain_model, projection_seed=None)
    torch.testing.assert_close(started(layout, noisy, t, clean), plain_model(layout, noisy, t, clean), atol=0, rtol=0)


@torch.no_grad()
def test_summary_is_the_final_state_of_the_last_text_token(summary_model):
    specs, _, _, clean = mixed_batch()
    summary = summary_model.text_summary(build_layout(specs, GRID), clean)
    assert summary.shape == (4, summary_model.hidden_size)
    assert summary[1].abs().max() == 0  # no text
    for index in (0, 3):  # a caption alone: its last token's state, computed directly
        text = specs[index].text_ids
        layout = build_layout([SampleSpec(text)], GRID)
        embeddings = summary_model.input_embeddings(layout, None, None, None)[:, : len(text)]
        columns = slice(0, len(text))
        hidden, _ = summary_model.run_backbone(embeddings, layout.visibility(columns, columns), layout.position_ids[:, columns])
        torch.testing.assert_close(summary[index], hidden[0, -1], atol=1e-5, rtol=1e-5)
    # The edit sample's instruction follows its clean image, which its text sees: another image, another summary.
    other = summary_model.text_summary(build_layout(specs, GRID), latents(1, 32))
    torch.testing.assert_close(other[[0, 1, 3]], summary[[0, 1, 3]], atol=1e-5, rtol=1e-5)
    assert (other[2] - summary[2]).abs().max() > 1e-3


@torch.no_grad()
def test_summary_makes_the_velocity_depend_on_the_last_token_and_on_nothing_new_across_samples(summary_model, plain_model):
    specs, noisy, t, clean = mixed_batch()
    layout = build_layout(specs, GRID)
    reference = summary_model(layout, noisy, t, clean)
    # The projection is used: the velocity differs from the model without it, except where no text gives a zero summary
    # and only the (zero) bias is added.
    plain = plain_model(layout, noisy, t, clean)
    assert (reference[0] - plain[0]).abs().max() > 1e-3
    torch.testing.assert_close(reference[1], plain[1], atol=1e-6, rtol=0)
    # Another last word for sample 0 changes sample 0 only.
    changed = [SampleSpec([5, 9, 14, 40])] + specs[1:]
    moved = summary_model(build_layout(changed, GRID), noisy, t, clean)
    assert (moved[0] - reference[0]).abs().max() > 1e-3
    torch.testing.assert_close(moved[1:], reference[1:], atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_packed_rows_and_the_kv_cache_give_the_full_forward(summary_model):
    specs, noisy, t, clean = mixed_batch()
    aligned_layout = build_layout(specs, GRID)
    expected = summary_model(aligned_layout, noisy, t, clean)
    packed = summary_model(build_layout(specs, GRID, rows=[[0, 2], [1, 3]]), noisy, t, clean)
    torch.testing.assert_close(packed, expected, atol=1e-5, rtol=1e-4)
    prefix = summary_model.encode_prefix(aligned_layout, clean)
    for step in range(2):  # the same encoded prefix serves every denoising step
        step_noisy, step_t = latents(4, 40 + step), times(4, 40 + step)
        torch.testing.assert_close(
            summary_model.forward_cached(aligned_layout, prefix, step_noisy, step_t),
            summary_model(aligned_layout, step_noisy, step_t, clean), atol=1e-5, rtol=1e-4,
        )
    empty = build_layout([SampleSpec([]), SampleSpec([])], GRID)
    prefix = summary_model.encode_prefix(empty)
    assert prefix.cache is None and prefix.text_summary.abs().max() == 0
    torch.testing.assert_close(summary_model.forward_cached(empty, prefix, noisy[:2], t[:2]), summary_model(empty, noisy[:2], t[:2]), atol=1e-5, rtol=1e-4)


def test_save_and_load_keep_the_summary(summary_model, tmp_path):
    specs, noisy, t, clean = mixed_batch()
    layout = build_layout(specs, GRID)
    loaded = UnimmGenerator.from_pretrained(summary_model.save_pretrained(tmp_path / "generator")).eval()
    assert loaded.config.text_summary
    with torch.no_grad():
        torch.testing.assert_close(loaded(layout, noisy, t, clean), summary_model(layout, noisy, t, clean), atol=0, rtol=0)


def test_training_from_a_checkpoint_without_the_summary(generator_parts, shapes, tmp_path):
    """train.init_from a model trained without the summary: the new run starts from its weights (the projection at
    zero) and trains; a checkpoint of another architecture is a one-line error."""
    from tests.generator_fixtures import tiny_generator_config
    from unimm.trainer import GeneratorTrainer

    tokenizer, text_model, _ = generator_parts
    data = str(shapes / "t2i" / "train")
    GeneratorTrainer(tiny_generator_config(tokenizer, text_model, data, tmp_path / "plain", steps=2)).train()
    config = tiny_generator_config(tokenizer, text_model, data, tmp_path / "summary", steps=3, init_from=str(tmp_path / "plain"))
    config.model.text_summary = True
    trainer = GeneratorTrainer(config)
    initial = UnimmGenerator.from_pretrained(tmp_path / "plain" / "pipeline").state_dict()
    state = trainer.unwrapped.state_dict()
    for name, tensor in initial.items():
        torch.testing.assert_close(state[name], tensor)
    assert state["text_summary_projection.weight"].abs().max() == 0
    records = trainer.train()
    assert len(records) == 3 and all(torch.isfinite(torch.tensor(record["loss"])) for record in records)
    assert UnimmGenerator.from_pretrained(tmp_path / "summary" / "pipeline").text_summary_projection.weight.abs().max() > 0

    wider = tiny_generator_config(tokenizer, text_model, data, tmp_path / "wider", steps=1, init_from=str(tmp_path / "plain"))
    wider.model.head.hidden_size *= 2
    with pytest.raises(UserError, match="does not fit this model's architecture"):
        GeneratorTrainer(wider)

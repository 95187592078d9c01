"""`model.text_blind_layers`: the noisy image tokens do not see the text in the first backbone layers.

A tiny real Qwen2 backbone (the Shapes text model, saved and loaded back); nothing mocked. Hidden in every layer,
the text cannot reach the velocity; hidden in the first only, it must (through the later layers). The text's own
states, the clean input image and the packed / KV-cached paths are unchanged by the option.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.test_generator_model import CHANGED, GRID, build_generator, latents, text_model_dir, times  # noqa: F401 - fixture
from unimm.models.generator import UnimmGenerator
from unimm.models.sequence import SampleSpec, build_layout


@pytest.fixture(scope="module")
def model(text_model_dir):  # noqa: F811 - the imported fixture
    return build_generator(text_model_dir)


def variant(model: UnimmGenerator, layers: int) -> UnimmGenerator:
    """The same weights with the text hidden from the noisy tokens in the first `layers` backbone layers."""
    other = UnimmGenerator(replace(model.config, text_blind_layers=layers), model.backbone)
    other.load_state_dict(model.state_dict())
    return other.eval()


def batch():
    specs = [SampleSpec([5, 9, 14, 22]), SampleSpec([11, 19, 23], has_clean_image=True), SampleSpec([7, 3])]
    return specs, latents(3, 50), times(3, 50), latents(1, 51)


@torch.no_grad()
@pytest.mark.parametrize("layers", [1, 2])
def test_hidden_text_reaches_the_velocity_only_through_the_later_layers(model, layers):
    specs, noisy, t, clean = batch()
    blinded = variant(model, layers)
    reference = blinded(build_layout(specs, GRID), noisy, t, clean)
    assert (reference - model(build_layout(specs, GRID), noisy, t, clean)).abs().max() > CHANGED  # the option acts
    other_text = [SampleSpec([5, 9, 14, 40]), SampleSpec([11, 19, 30], has_clean_image=True), specs[2]]
    moved = blinded(build_layout(other_text, GRID), noisy, t, clean)
    if layers == model.backbone.config.num_hidden_layers:  # hidden everywhere: the text cannot matter
        torch.testing.assert_close(moved, reference, atol=1e-5, rtol=1e-4)
    else:
        assert (moved[0] - reference[0]).abs().max() > CHANGED and (moved[1] - reference[1]).abs().max() > CHANGED
    # The clean input image stays visible to the noisy tokens in every layer.
    other_image = blinded(build_layout(specs, GRID), noisy, t, latents(1, 52))
    assert (other_image[1] - reference[1]).abs().max() > CHANGED
    torch.testing.assert_close(other_image[[0, 2]], reference[[0, 2]], atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_packed_rows_and_the_kv_cache_give_the_full_forward(model):
    specs, noisy, t, clean = batch()
    blinded = variant(model, 1)
    aligned = build_layout(specs, GRID)
    expected = blinded(aligned, noisy, t, clean)
    torch.testing.assert_close(blinded(build_layout(specs, GRID, rows=[[0, 2], [1]]), noisy, t, clean), expected, atol=1e-5, rtol=1e-4)
    # the text's own states (the prefix cache) do not depend on the option
    prefix, plain_prefix = blinded.encode_prefix(aligned, clean), model.encode_prefix(aligned, clean)
    for layer in range(model.backbone.config.num_hidden_layers):
        torch.testing.assert_close(prefix.cache.layers[layer].keys, plain_prefix.cache.layers[layer].keys, atol=0, rtol=0)
    for step in range(2):
        step_noisy, step_t = latents(3, 60 + step), times(3, 60 + step)
        torch.testing.assert_close(blinded.forward_cached(aligned, prefix, step_noisy, step_t),
                                   blinded(aligned, step_noisy, step_t, clean), atol=1e-5, rtol=1e-4)


def test_bad_settings_are_refused(model):
    with pytest.raises(ValueError, match="between 0 and"):
        UnimmGenerator(replace(model.config, text_blind_layers=model.backbone.config.num_hidden_layers + 1), model.backbone)
    config = model.backbone.config
    previous = config._attn_implementation
    config._attn_implementation = "unimm_block_varlen"
    try:
        with pytest.raises(ValueError, match="varlen"):
            UnimmGenerator(replace(model.config, text_blind_layers=1), model.backbone)
    finally:
        config._attn_implementation = previous


def test_save_and_load_keep_the_option(model, tmp_path):
    specs, noisy, t, clean = batch()
    blinded = variant(model, 1)
    loaded = UnimmGenerator.from_pretrained(blinded.save_pretrained(tmp_path / "generator")).eval()
    assert loaded.config.text_blind_layers == 1
    layout = build_layout(specs, GRID)
    with torch.no_grad():
        torch.testing.assert_close(loaded(layout, noisy, t, clean), blinded(layout, noisy, t, clean), atol=0, rtol=0)


def test_a_run_started_from_weights_with_another_setting_says_so(generator_parts, shapes, tmp_path, capsys):
    """text_blind_layers changes no parameter, so init_from loads either way; a mismatch is how a text-blind fine-tune
    starts and, by mistake, a silent change of the model: the trainer names both settings."""
    from tests.generator_fixtures import tiny_generator_config
    from unimm.trainer import GeneratorTrainer

    tokenizer, text_model, _ = generator_parts
    data = str(shapes / "t2i" / "train")
    blind = tiny_generator_config(tokenizer, text_model, data, tmp_path / "blind", steps=1)
    blind.model.text_blind_layers = 1
    GeneratorTrainer(blind).train()
    capsys.readouterr()
    GeneratorTrainer(tiny_generator_config(tokenizer, text_model, data, tmp_path / "plain", steps=1, init_from=str(tmp_path / "blind")))
    assert "was trained with model.text_blind_layers=1, this run uses 0" in capsys.readouterr().out
    same = tiny_generator_config(tokenizer, text_model, data, tmp_path / "same", steps=1, init_from=str(tmp_path / "blind"))
    same.model.text_blind_layers = 1
    GeneratorTrainer(same)
    assert "text_blind_layers" not in capsys.readouterr().out

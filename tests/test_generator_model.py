"""The generator: the attention rule (masks), attention implementations, the KV-cached sampler, the pipeline,
the preset sizes and the backbone loading errors.

Everything runs on a tiny real Qwen2 (the Shapes text model, written with `save_pretrained` and loaded with
`from_pretrained`) and, for the pipeline, a tiny real semantic autoencoder. Nothing is mocked.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from data.shapes.text_model import ShapesTextModelConfig, write_shapes_text_model
from tests.tokenizer_fixtures import tiny_config
from unimm.errors import UserError
from unimm.models import varlen_attention
from unimm.models.backbone import build_backbone, load_backbone_config, load_text_tokenizer
from unimm.models.config import BackboneConfig, GeneratorModelConfig, HeadConfig
from unimm.models.generator import UnimmGenerator
from unimm.models.sequence import CLEAN_IMAGE, NOISY_IMAGE, PAD, TEXT, SampleSpec, build_layout
from unimm.pipeline import UnimmPipeline

CHANNELS = 4
GRID = (2, 3)  # a non-square token grid: 6 image tokens
TOKENS = GRID[0] * GRID[1]
CHANGED = 1e-4  # a real dependence moves outputs by > 1e-3 here; float32 rounding noise is ~1e-6 or exactly 0


def randomize_weights(model: UnimmGenerator, seed: int = 0) -> None:
    """Give the generator weights under which every input visibly moves the velocity.

    The DDT head is adaLN-Zero initialised (it predicts 0): its linear layers get small random normals. The
    tiny backbone's own init (std 0.02) lets a text token or the clean image move the velocity by only ~1e-4,
    the size of the tolerances below; variance-preserving weights make that O(0.1), so an ignored token fails.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.head.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.05)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.05)
        for module in model.backbone.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) / module.in_features**0.5)
            elif isinstance(module, nn.Embedding):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator))


def build_generator(text_model_dir, latent_channels: int = CHANNELS, seed: int = 0) -> UnimmGenerator:
    torch.manual_seed(seed)
    config = GeneratorModelConfig(
        backbone=BackboneConfig(name_or_path=str(text_model_dir)),
        head=HeadConfig(hidden_size=32, depth=2, num_heads=4),
        latent_channels=latent_channels,
    )
    model = UnimmGenerator.build(config)
    randomize_weights(model, seed)
    return model.eval()


@pytest.fixture(scope="module")
def text_model_dir(tmp_path_factory):
    config = ShapesTextModelConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, corpus_scenes=50
    )
    return write_shapes_text_model(tmp_path_factory.mktemp("text-model"), config)


@pytest.fixture(scope="module")
def model(text_model_dir):
    return build_generator(text_model_dir)


@pytest.fixture
def attention(model):
    """Set the backbone's attention implementation for one test, restoring sdpa afterwards."""
    config = model.backbone.config
    previous = config._attn_implementation

    def use(name: str) -> None:
        config._attn_implementation = name

    yield use
    config._attn_implementation = previous


def latents(count: int, seed: int, channels: int = CHANNELS) -> torch.Tensor:
    return torch.randn(count, channels, *GRID, generator=torch.Generator().manual_seed(seed))


def times(count: int, seed: int) -> torch.Tensor:
    return torch.rand(count, generator=torch.Generator().manual_seed(seed)) * 0.9 + 0.05


def backbone_hidden(model, layout, noisy, t, clean=None) -> torch.Tensor:
    """(rows, L, hidden) backbone outputs of the whole sequence."""
    embeddings = model.input_embeddings(layout, noisy, t, clean)
    hidden, _ = model.run_backbone(embeddings, layout.visibility(), layout.position_ids)
    return hidden


def assert_same(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-6) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def assert_changed(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a - b).abs().max().item() > CHANGED


# ---------------------------------------------------------------------------------------------- masks
@torch.no_grad()
def test_later_text_tokens_do_not_change_earlier_ones(model):
    text = [5, 9, 14, 22, 31, 40]
    noisy, t = latents(1, 0), times(1, 0)
    layout = build_layout([SampleSpec(text)], GRID)
    reference = backbone_hidden(model, layout, noisy, t)
    for position in range(len(text)):
        changed_text = list(text)
        changed_text[position] = 60 + position
        hidden = backbone_hidden(model, build_layout([SampleSpec(changed_text)], GRID), noisy, t)
        assert_same(hidden[0, :position], reference[0, :position])  # strictly earlier text: untouched
        assert_changed(hidden[0, position], reference[0, position])  # the token itself did change
        assert_changed(hidden[0, len(text):], reference[0, len(text):])  # and so did the image tokens


@torch.no_grad()
def test_velocity_depends_on_every_text_token(model):
    text = [5, 9, 14, 22, 31, 40]
    noisy, t = latents(1, 1), times(1, 1)
    reference = model(build_layout([SampleSpec(text)], GRID), noisy, t)
    for position in range(len(text)):
        changed_text = list(text)
        changed_text[position] = 60 + position
        assert_changed(model(build_layout([SampleSpec(changed_text)], GRID), noisy, t), reference)


@torch.no_grad()
def test_image_tokens_see_each_other_within_the_block(model):
    """Full attention inside the noisy image: changing the latent under one token changes every image token's
    backbone output, including tokens before it in the sequence."""
    layout = build_layout([SampleSpec([5, 9])], GRID)
    noisy, t = latents(1, 2), times(1, 2)
    reference = backbone_hidden(model, layout, noisy, t)
    changed = noisy.clone()
    changed[0, :, -1, -1] += 1.0  # the last image token
    hidden = backbone_hidden(model, layout, changed, t)
    assert_same(hidden[0, :2], reference[0, :2])  # text does not see the image
    for column in range(2, 2 + TOKENS):
        assert_changed(hidden[0, column], reference[0, column])


@torch.no_grad()
def test_editing_clean_latents_see_neither_the_instruction_nor_the_noisy_latents(model):
    instruction = [7, 11, 19]
    layout = build_layout([SampleSpec(instruction, has_clean_image=True)], GRID)
    kinds = layout.token_kinds[0]
    assert kinds.tolist() == [CLEAN_IMAGE] * TOKENS + [TEXT] * 3 + [NOISY_IMAGE] * TOKENS
    clean_columns, noisy_columns = slice(0, TOKENS), slice(TOKENS + 3, None)
    noisy, t, clean = latents(1, 3), times(1, 3), latents(1, 4)
    reference = backbone_hidden(model, layout, noisy, t, clean)
    reference_velocity = model(layout, noisy, t, clean)

    # other noisy latents and timestep: the clean image's outputs are unchanged (the text's too)
    hidden = backbone_hidden(model, layout, latents(1, 5), times(1, 5), clean)
    assert_same(hidden[0, : TOKENS + 3], reference[0, : TOKENS + 3])
    assert_changed(hidden[0, noisy_columns], reference[0, noisy_columns])

    # another instruction, same length and longer: the clean image's outputs are unchanged
    for other in ([8, 12, 20], [8, 12, 20, 33, 41]):
        other_layout = build_layout([SampleSpec(other, has_clean_image=True)], GRID)
        hidden = backbone_hidden(model, other_layout, noisy, t, clean)
        assert_same(hidden[0, clean_columns], reference[0, clean_columns])
        assert_changed(model(other_layout, noisy, t, clean), reference_velocity)

    # the noisy outputs (and the velocity) do depend on the clean latents
    other_clean = latents(1, 6)
    hidden = backbone_hidden(model, layout, noisy, t, other_clean)
    assert_changed(hidden[0, noisy_columns], reference[0, noisy_columns])
    assert_changed(model(layout, noisy, t, other_clean), reference_velocity)


def packed_example():
    specs = [
        SampleSpec([5, 9, 14, 22]),
        SampleSpec([7, 3]),
        SampleSpec([11, 19, 23], has_clean_image=True),  # an edit sample packed behind a text-to-image one
    ]
    return specs, latents(3, 7), times(3, 7), latents(1, 8)


@torch.no_grad()
def test_packed_samples_are_independent(model):
    specs, noisy, t, clean = packed_example()
    aligned = model(build_layout(specs, GRID), noisy, t, clean)
    packed_layout = build_layout(specs, GRID, rows=[[0, 2], [1]])
    assert packed_layout.token_kinds.shape[0] == 2
    assert packed_layout.sample_ids[0].unique().tolist() == [0, 2]
    packed = model(packed_layout, noisy, t, clean)
    torch.testing.assert_close(packed, aligned, atol=1e-5, rtol=1e-4)

    # another text for sample 0 (different tokens and length, so sample 2 moves along the row)
    for other_text in ([6, 10, 15, 23], [6, 10]):
        changed_specs = [SampleSpec(other_text), specs[1], specs[2]]
        changed = model(build_layout(changed_specs, GRID, rows=[[0, 2], [1]]), noisy, t, clean)
        assert_changed(changed[0], packed[0])
        torch.testing.assert_close(changed[1:], packed[1:], atol=1e-5, rtol=1e-4)
    # sample 0's noisy latents do not reach sample 2 either
    other_noisy = noisy.clone()
    other_noisy[0] = latents(1, 9)[0]
    changed = model(packed_layout, other_noisy, t, clean)
    torch.testing.assert_close(changed[1:], packed[1:], atol=1e-5, rtol=1e-4)


def test_attention_mask_of_a_hand_written_example():
    # Aligned: two text-to-image samples, the shorter prompt padded between its text and its image.
    layout = build_layout([SampleSpec([5, 6]), SampleSpec([7])], grid=(1, 2))
    assert layout.token_kinds.tolist() == [[TEXT, TEXT, NOISY_IMAGE, NOISY_IMAGE], [TEXT, PAD, NOISY_IMAGE, NOISY_IMAGE]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 2], [0, 1, 1, 1]]
    assert layout.prefix_length == 2
    expected = torch.tensor(
        [
            [[1, 0, 0, 0],  # text 0: itself
             [1, 1, 0, 0],  # text 1: causal
             [1, 1, 1, 1],  # image: all text, the whole image block
             [1, 1, 1, 1]],
            [[1, 0, 0, 0],
             [0, 1, 0, 0],  # pad: only itself
             [1, 0, 1, 1],  # image: the text, not the pad
             [1, 0, 1, 1]],
        ],
        dtype=torch.bool,
    )  # fmt: skip
    assert torch.equal(layout.attention_mask(), expected[:, None])

    # Packed: an edit sample [clean][text][noisy] and a text-to-image sample in one row, a short row padded.
    specs = [SampleSpec([5], has_clean_image=True), SampleSpec([6]), SampleSpec([8])]
    layout = build_layout(specs, grid=(1, 2), rows=[[0, 1], [2]])
    C, T, N = CLEAN_IMAGE, TEXT, NOISY_IMAGE
    assert layout.token_kinds.tolist() == [[C, C, T, N, N, T, N, N], [T, N, N, PAD, PAD, PAD, PAD, PAD]]
    assert layout.sample_ids.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1], [2, 2, 2, -1, -1, -1, -1, -1]]
    assert layout.position_ids[0].tolist() == [0, 0, 1, 2, 2, 0, 1, 1]
    assert layout.prefix_length == -1
    assert layout.noisy_index.tolist() == [[3, 4], [6, 7], [9, 10]]  # flat: row * 8 + column
    assert layout.clean_index.tolist() == [[0, 1]] and layout.clean_samples.tolist() == [0]
    row0 = torch.tensor(
        [
            [1, 1, 0, 0, 0, 0, 0, 0],  # clean: the clean block only (not the instruction, not the noisy block)
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0, 0],  # instruction: the clean image and itself
            [1, 1, 1, 1, 1, 0, 0, 0],  # noisy: the whole prefix and its block, nothing of sample 1
            [1, 1, 1, 1, 1, 0, 0, 0],
            [0, 0, 0, 0, 0, 1, 0, 0],  # sample 1 text: only itself
            [0, 0, 0, 0, 0, 1, 1, 1],
            [0, 0, 0, 0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    row1 = torch.zeros(8, 8, dtype=torch.bool)
    row1[0, 0] = True
    row1[1:3, 0:3] = True
    row1[3:, 3:] = torch.eye(5, dtype=torch.bool)  # pads: only themselves
    assert torch.equal(layout.attention_mask(), torch.stack([row0, row1])[:, None])


def test_build_layout_rejects_bad_rows():
    specs = [SampleSpec([1]), SampleSpec([2])]
    with pytest.raises(ValueError):
        build_layout(specs, GRID, rows=[[0]])
    with pytest.raises(ValueError):
        build_layout(specs, GRID, rows=[[0, 1], [1]])


# ----------------------------------------------------------------------------- attention implementations
# Compiling flex attention for the CPU takes ~20 s (once per module, in `flex_unsupported`).
FLEX = pytest.param("flex_attention", marks=pytest.mark.slow)
# The varlen plan (what `flash_attention_2` runs): with flash-attn's semantics in plain PyTorch as the kernel,
# and with no kernel (the CPU fallback: SDPA with the dense mask).
VARLEN_KERNEL, VARLEN_FALLBACK = "varlen-reference-kernel", "varlen-fallback"


@pytest.fixture(scope="module")
def flex_unsupported(model):
    """None where flex_attention runs here, else why not. transformers compiles flex_attention; on a CPU that
    goes through inductor's C++ backend, and a second input shape triggers a dynamic-shape recompile, which
    fails to compile with some torch releases (2.14: "'cur_kvSplitSize5' was not declared"). So two shapes."""
    config = model.backbone.config
    previous = config._attn_implementation
    config._attn_implementation = "flex_attention"
    try:
        with torch.no_grad():
            for count in (1, 2):
                specs = [SampleSpec([5, 9, 14][: count + 1])] * count
                model(build_layout(specs, GRID), latents(count, 0), times(count, 0))
    except Exception as error:  # noqa: BLE001 - any failure here means "not supported on this machine"
        lines = [line.strip() for line in str(error).splitlines() if "error" in line.lower()] or [str(error)]
        return f"flex_attention does not run with torch {torch.__version__} on this CPU: {error.__class__.__name__}: {lines[-1][:200]}"
    finally:
        config._attn_implementation = previous
    return None


@pytest.fixture
def use_attention(request, attention):
    """Parametrised implementation name -> set on the backbone (flex: skipped where it cannot run)."""
    implementation = request.param
    if implementation == "flex_attention":
        reason = request.getfixturevalue("flex_unsupported")
        if reason:
            pytest.skip(reason)
    if implementation in (VARLEN_KERNEL, VARLEN_FALLBACK):
        previous = varlen_attention.set_kernel_override(varlen_attention.reference_varlen_attention if implementation == VARLEN_KERNEL else None)
        request.addfinalizer(lambda: varlen_attention.set_kernel_override(previous))
        implementation = varlen_attention.IMPLEMENTATION_NAME
    attention(implementation)
    return implementation


@torch.no_grad()
@pytest.mark.parametrize("use_attention", ["eager", FLEX, VARLEN_KERNEL, VARLEN_FALLBACK], indirect=True)
def test_attention_implementations_agree(model, attention, use_attention):
    specs, noisy, t, clean = packed_example()
    layouts = {"aligned": build_layout(specs, GRID), "packed": build_layout(specs, GRID, rows=[[0, 2], [1]])}
    attention("sdpa")
    reference = {name: model(layout, noisy, t, clean) for name, layout in layouts.items()}
    attention(use_attention)
    assert model.backbone.config._attn_implementation == use_attention
    for name, layout in layouts.items():
        torch.testing.assert_close(model(layout, noisy, t, clean), reference[name], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------ KV cache
def kv_layouts():
    return {
        "text_to_image": ([SampleSpec([5, 9, 14, 22]), SampleSpec([7]), SampleSpec([])], None),
        # as the pipeline lays editing out: image + instruction, image alone, neither
        "edit": (
            [SampleSpec([11, 19, 23], True), SampleSpec([], True), SampleSpec([], False), SampleSpec([4, 6], False)],
            latents(2, 10),
        ),
        "empty_prompt": ([SampleSpec([]), SampleSpec([])], None),
    }


@torch.no_grad()
@pytest.mark.parametrize("case", ["text_to_image", "edit", "empty_prompt"])
@pytest.mark.parametrize("use_attention", ["sdpa", "eager", FLEX, VARLEN_KERNEL], indirect=True)
def test_kv_cached_steps_equal_the_full_forward(model, use_attention, case):
    specs, clean = kv_layouts()[case]
    layout = build_layout(specs, GRID)
    if case == "empty_prompt":
        assert layout.prefix_length == 0
    count = len(specs)
    prefix = model.encode_prefix(layout, clean)
    assert (prefix.cache is None) == (case == "empty_prompt")
    for step in range(3):  # the same cache serves every denoising step
        noisy, t = latents(count, 20 + step), times(count, 20 + step)
        expected = model(layout, noisy, t, clean)
        torch.testing.assert_close(model.forward_cached(layout, prefix, noisy, t), expected, atol=1e-5, rtol=1e-4)
        if prefix.cache is not None:
            assert prefix.cache.get_seq_length() == layout.prefix_length + TOKENS


def test_kv_cache_needs_an_aligned_layout(model):
    layout = build_layout([SampleSpec([1]), SampleSpec([2])], GRID, rows=[[0, 1]])
    with pytest.raises(ValueError):
        model.encode_prefix(layout)


# ------------------------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def pipeline(text_model_dir, encoders, tmp_path_factory):
    from tokenizer.model import SemanticAutoencoder

    directory = tmp_path_factory.mktemp("pipeline-tokenizer")
    torch.manual_seed(0)
    # Only the model part of the tiny config is used (the data paths are never read).
    image_tokenizer = SemanticAutoencoder.build(tiny_config("mini-psvae", encoders, directory / "shapes", directory / "run").model).eval()
    channels = image_tokenizer.latent_shape[0]
    generator = torch.Generator().manual_seed(1)
    image_tokenizer.set_latent_statistics(
        torch.randn(channels, generator=generator) * 0.1, torch.rand(channels, generator=generator) * 0.5 + 0.25, 1000
    )
    model = build_generator(text_model_dir, latent_channels=channels, seed=2)
    pipe = UnimmPipeline(model, load_text_tokenizer(str(text_model_dir)), image_tokenizer)
    pipe.sampling.steps = 3
    return pipe


PROMPTS = ["a photo of a red circle", "two blue squares to the left of a large green triangle"]


def test_pipeline_kv_cache_gives_the_same_images(pipeline):
    assert pipeline.generator.config.latent_channels == pipeline.image_tokenizer.latent_shape[0]
    encoded = pipeline.encode_text(PROMPTS)
    assert len(encoded[0]) != len(encoded[1]) and all(encoded)  # different prompt lengths: padded layout
    cached = pipeline(PROMPTS, cfg=3.0, seed=5, output="tensor", use_kv_cache=True)
    full = pipeline(PROMPTS, cfg=3.0, seed=5, output="tensor", use_kv_cache=False)
    assert cached.shape == (2, 3, 32, 32)
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=0)
    # the prompts matter (by far more than the tolerance), so the equality above is not vacuous
    swapped = pipeline(PROMPTS[::-1], cfg=3.0, seed=5, output="tensor")
    assert (swapped - cached).abs().max().item() > 1e-2
    # cfg = 1: the conditional branch alone
    torch.testing.assert_close(
        pipeline(PROMPTS, cfg=1.0, seed=5, output="tensor"), pipeline(PROMPTS, cfg=1.0, seed=5, output="tensor", use_kv_cache=False),
        atol=1e-4, rtol=0,
    )


def test_pipeline_edit_kv_cache_gives_the_same_images(pipeline):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    instructions = ["make the circle blue", "remove the square"]
    cached = pipeline.edit(images, instructions, cfg=4.0, image_cfg=1.5, seed=3, output="tensor", use_kv_cache=True)
    full = pipeline.edit(images, instructions, cfg=4.0, image_cfg=1.5, seed=3, output="tensor", use_kv_cache=False)
    assert cached.shape == (2, 3, 32, 32)
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=0)
    # the input image and the instruction both matter
    other = pipeline.edit(images.flip(-1), instructions, cfg=4.0, image_cfg=1.5, seed=3, output="tensor")
    assert (other - cached).abs().max().item() > 1e-3
    other = pipeline.edit(images, instructions[::-1], cfg=4.0, image_cfg=1.5, seed=3, output="tensor")
    assert (other - cached).abs().max().item() > 1e-2


def test_pipeline_seed_is_per_image(pipeline):
    batch = pipeline(PROMPTS, cfg=3.0, seed=[11, 12], output="tensor")
    alone = pipeline(PROMPTS[1], cfg=3.0, seed=12, output="tensor")
    torch.testing.assert_close(alone[0], batch[1], atol=1e-4, rtol=0)
    reversed_batch = pipeline(PROMPTS[::-1], cfg=3.0, seed=[12, 11], output="tensor")
    torch.testing.assert_close(reversed_batch, batch.flip(0), atol=1e-4, rtol=0)
    # an int seed gives image i the seed + i
    torch.testing.assert_close(pipeline(PROMPTS, cfg=3.0, seed=11, output="tensor"), batch, atol=1e-4, rtol=0)
    # different seeds, different images
    other = pipeline(PROMPTS[1], cfg=3.0, seed=13, output="tensor")
    assert (other - alone).abs().max().item() > 1e-3


def test_pipeline_returns_pil_images(pipeline):
    images = pipeline(PROMPTS, cfg=2.0, steps=1)
    assert len(images) == 2 and all(image.size == (32, 32) and image.mode == "RGB" for image in images)


def test_pipeline_save_and_load_round_trip(pipeline, tmp_path):
    pipeline.save_pretrained(tmp_path / "pipeline")
    loaded = UnimmPipeline.from_pretrained(tmp_path / "pipeline", device="cpu")
    assert loaded.sampling == pipeline.sampling and loaded.max_text_tokens == pipeline.max_text_tokens
    assert loaded.encode_text(PROMPTS) == pipeline.encode_text(PROMPTS)
    torch.testing.assert_close(loaded.image_tokenizer.latent_mean, pipeline.image_tokenizer.latent_mean)
    torch.testing.assert_close(loaded.image_tokenizer.latent_var, pipeline.image_tokenizer.latent_var)
    expected = pipeline(PROMPTS, cfg=3.0, seed=4, output="tensor")
    torch.testing.assert_close(loaded(PROMPTS, cfg=3.0, seed=4, output="tensor"), expected, atol=1e-6, rtol=0)
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    torch.testing.assert_close(
        loaded.edit(images, "make it red", seed=4, output="tensor"), pipeline.edit(images, "make it red", seed=4, output="tensor"),
        atol=1e-6, rtol=0,
    )


def test_pipeline_from_pretrained_rejects_other_directories(tmp_path):
    with pytest.raises(UserError, match="not a unimm pipeline"):
        UnimmPipeline.from_pretrained(tmp_path, device="cpu")


# -------------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("preset, params", [("t2i-0.5b", 653e6), ("t2i-1.5b", 1708e6)])
def test_preset_sizes_match_the_paper(preset, params):
    from unimm.presets import describe_generator_preset

    description = describe_generator_preset(preset)
    assert description["params"] == pytest.approx(params, rel=0.02)
    assert description["shift"] == pytest.approx(2.4495, abs=1e-4)  # PS-VAE 96c: sqrt(96 / 16)
    assert description["latent_shape"][0] == 96


# ------------------------------------------------------------------------------------- backbone errors
def test_backbone_directory_without_config_is_a_user_error(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(UserError, match="config.json"):
        load_backbone_config(str(tmp_path))
    with pytest.raises(UserError, match="config.json"):
        UnimmGenerator.build(GeneratorModelConfig(backbone=BackboneConfig(name_or_path=str(tmp_path)), latent_channels=4))


def test_non_qwen2_backbone_is_a_user_error(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100).save_pretrained(str(tmp_path))
    with pytest.raises(UserError, match="bert.*Qwen2"):
        load_backbone_config(str(tmp_path))
    with pytest.raises(UserError, match="bert"):
        build_backbone(str(tmp_path), pretrained=False)


def test_backbone_loads_the_saved_weights(text_model_dir):
    config = load_backbone_config(str(text_model_dir), attention="eager")
    assert config.model_type == "qwen2" and config.hidden_size == 32 and config._attn_implementation == "eager"
    from safetensors.torch import load_file

    saved = load_file(str(text_model_dir / "model.safetensors"))  # a Qwen2ForCausalLM checkpoint, like the hub's
    generator_config = GeneratorModelConfig(backbone=BackboneConfig(name_or_path=str(text_model_dir)), latent_channels=CHANNELS,
                                            head=HeadConfig(hidden_size=32, depth=1, num_heads=4))
    backbone = UnimmGenerator.build(generator_config).backbone
    for name in ("embed_tokens.weight", "layers.1.mlp.up_proj.weight", "layers.0.self_attn.q_proj.bias", "norm.weight"):
        torch.testing.assert_close(backbone.state_dict()[name], saved[f"model.{name}"], atol=0, rtol=0)
    fresh = UnimmGenerator.build(generator_config, pretrained=False).backbone  # same architecture, random weights
    assert fresh.embed_tokens.weight.shape == backbone.embed_tokens.weight.shape
    assert not torch.equal(fresh.layers[1].mlp.up_proj.weight, backbone.layers[1].mlp.up_proj.weight)

"""`unimm export bagel-vit`: the SigLIP representation encoder of a tokenizer in Bagel's ViT layout (PS-VAE §4.4).

- a full-size SigLIP so400m/14 vision tower (uninitialised weights, no network) exports exactly Bagel's 421 ViT
  tensors with Bagel's shapes, and Bagel's vit_config.json values;
- read back and run as Bagel's NaViT patch-sequence encoder, the export gives the source encoder's features up
  to the dropped layer (post_layernorm of hidden_states[L - 1]) on a 70 x 70-patch image, for SigLIP and SigLIP2;
- --merge-into replaces only the vit_model.* tensors of an ema.safetensors and leaves every other byte alone;
- bad inputs fail with one line and exit code 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.tokenizer_fixtures import tiny_config
from tokenizer.encoder_catalog import catalog_config
from tokenizer.encoders import RepresentationEncoder, tiny_encoder_config
from tokenizer.model import SemanticAutoencoder
from unimm.cli import main
from unimm.errors import UserError
from unimm.export.bagel import (
    BAGEL_MERGED_NAME,
    BAGEL_NON_VIT_UNDERSTANDING_KEYS,
    BAGEL_SO400M,
    BAGEL_VIT_CONFIG_NAME,
    BAGEL_VIT_MANIFEST,
    BAGEL_VIT_WEIGHTS_NAME,
    BagelNaViTReference,
    BagelViTArchitecture,
    bagel_vit_state_dict,
    export_bagel_vit,
    flattened_position_ids,
    is_bagel_vit_key,
    patchify,
    read_safetensors_header,
    source_features,
    verify_bagel_export,
)

# BAGEL-7B-MoT's vit_config.json (huggingface.co/ByteDance-Seed/BAGEL-7B-MoT); Bagel drops one layer when loading it.
BAGEL_VIT_CONFIG = {"hidden_size": 1152, "image_size": 980, "intermediate_size": 4304, "model_type": "siglip_vision_model",
                    "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14}
TOLERANCE = 1e-5


def tiny_encoder(kind: str, patch_size: int = 8, layers: int = 4) -> RepresentationEncoder:
    torch.manual_seed(0)
    config = tiny_encoder_config(kind, image_size=4 * patch_size, patch_size=patch_size, hidden_size=32, layers=layers)
    return RepresentationEncoder.from_config(config, kind).eval()


def random_image(side: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------------------------------------------------------------------ manifest
def test_manifest_is_bagels_26_layer_980px_vit():
    assert len(BAGEL_VIT_MANIFEST) == 421 == 26 * 16 + 2 + 1 + 2
    prefix = "vit_model.vision_model."
    assert BAGEL_VIT_MANIFEST[prefix + "embeddings.patch_embedding.weight"] == (1152, 14 * 14 * 3)
    assert BAGEL_VIT_MANIFEST[prefix + "embeddings.position_embedding.weight"] == (70 * 70, 1152)
    assert BAGEL_VIT_MANIFEST[prefix + "encoder.layers.25.mlp.fc1.weight"] == (4304, 1152)
    assert BAGEL_VIT_MANIFEST[prefix + "encoder.layers.25.mlp.fc2.weight"] == (1152, 4304)
    assert prefix + "encoder.layers.26.layer_norm1.weight" not in BAGEL_VIT_MANIFEST
    assert not any(".head." in name or "position_ids" in name for name in BAGEL_VIT_MANIFEST)
    assert all(is_bagel_vit_key(name) for name in BAGEL_VIT_MANIFEST)
    assert not any(is_bagel_vit_key(name) for name in BAGEL_NON_VIT_UNDERSTANDING_KEYS)
    # The reference module (built like Bagel's SiglipVisionModel) has exactly the manifest's keys and shapes.
    with torch.device("meta"):
        reference = BagelNaViTReference(BAGEL_SO400M)
    assert {name: tuple(tensor.shape) for name, tensor in reference.bagel_state_dict().items()} == BAGEL_VIT_MANIFEST
    # vit_config.json: Bagel's published file, whose num_hidden_layers Bagel's loaders decrement.
    assert {key: BAGEL_SO400M.vit_config()[key] for key in BAGEL_VIT_CONFIG} == BAGEL_VIT_CONFIG
    assert BagelViTArchitecture.from_vit_config(BAGEL_VIT_CONFIG) == BAGEL_SO400M


def test_full_size_so400m_export_has_exactly_bagels_keys_and_shapes(tmp_path):
    """A real so400m/14 SigLIP vision tower (27 layers, 224 px) built on the meta device, then given uninitialised
    bf16 storage: no network, no random init, ~0.9 GB."""
    import transformers

    config = catalog_config("google/siglip2-so400m-patch14-224")
    with torch.device("meta"):
        model = transformers.SiglipVisionModel(config)
    assert config.num_hidden_layers == 27 and "head.probe" in model.state_dict()
    # Shape-only conversion on the meta device.
    tensors, architecture, kind = bagel_vit_state_dict(model)
    assert kind == "siglip" and architecture == BAGEL_SO400M
    assert {name: tuple(tensor.shape) for name, tensor in tensors.items()} == BAGEL_VIT_MANIFEST

    model = model.to(torch.bfloat16).to_empty(device="cpu")
    report = export_bagel_vit(RepresentationEncoder(model, "siglip"), tmp_path)
    assert report.num_tensors == 421 and report.matches_bagel
    assert (report.source_layers, report.exported_layers, report.source_grid, report.position_grid) == (27, 26, 16, 70)
    _, header = read_safetensors_header(tmp_path / BAGEL_VIT_WEIGHTS_NAME)
    header.pop("__metadata__")
    assert {name: tuple(entry["shape"]) for name, entry in header.items()} == BAGEL_VIT_MANIFEST
    assert {entry["dtype"] for entry in header.values()} == {"BF16"}
    written = json.loads((tmp_path / BAGEL_VIT_CONFIG_NAME).read_text())
    assert {key: written[key] for key in BAGEL_VIT_CONFIG} == BAGEL_VIT_CONFIG
    lines = report.lines(keys=True)
    assert any("0 missing, 0 unexpected, 0 shape mismatches" in line for line in lines)


# -------------------------------------------------------------------------------- feature equality
@pytest.mark.parametrize("kind", ["siglip", "siglip2"])
def test_exported_vit_reproduces_the_encoder_up_to_the_dropped_layer(kind, tmp_path):
    encoder = tiny_encoder(kind)
    report = export_bagel_vit(encoder, tmp_path)
    assert (report.num_tensors, report.exported_layers, report.source_grid) == (3 * 16 + 5, 3, 4)
    reference = BagelNaViTReference.from_pretrained(tmp_path)
    assert reference.architecture.num_layers == 3 and reference.architecture.max_patches_per_side == 70

    # 70 x 70 patches: the exported table is exactly the encoder's own resize of its 4 x 4 table at this size.
    image = random_image(70 * 8)
    expected = source_features(encoder, image)[0]
    (features,) = reference.encode_images([image[0]])
    assert features.shape == (70 * 70, 32)
    assert (features - expected).abs().max() <= TOLERANCE
    assert verify_bagel_export(encoder, tmp_path) <= TOLERANCE

    # "Up to the dropped layer": the full encoder's output is something else.
    with torch.no_grad():
        if kind == "siglip":
            full = encoder.model(pixel_values=image, interpolate_pos_encoding=True).last_hidden_state[0]
        else:
            from tokenizer.encoders import _naflex_inputs

            full = encoder.model(**_naflex_inputs(image, 8)).last_hidden_state[0]
    assert (features - full).abs().max() > 0.1

    # Exported tensors are the encoder's own (layer 0 unchanged, conv weight re-ordered to (kh, kw, c)).
    exported = load_file(str(tmp_path / BAGEL_VIT_WEIGHTS_NAME))
    state = encoder.model.state_dict()
    assert torch.equal(exported["vit_model.vision_model.encoder.layers.0.self_attn.q_proj.weight"], state["encoder.layers.0.self_attn.q_proj.weight"])
    patch = state["embeddings.patch_embedding.weight"]
    if patch.dim() == 4:
        patch = patch.permute(0, 2, 3, 1).reshape(32, -1)
    assert torch.equal(exported["vit_model.vision_model.embeddings.patch_embedding.weight"], patch)


def test_navit_packing_and_position_ids(tmp_path):
    export_bagel_vit(tiny_encoder("siglip", patch_size=4), tmp_path)
    reference = BagelNaViTReference.from_pretrained(tmp_path)
    big, small = random_image(70 * 4, seed=1)[0], random_image(40, seed=2)[0][:, :24, :]
    # Packed images attend only within themselves, as Bagel's varlen attention does.
    packed_big, packed_small = reference.encode_images([big, small])
    (alone_big,) = reference.encode_images([big])
    (alone_small,) = reference.encode_images([small])
    assert torch.allclose(packed_big, alone_big, atol=1e-6) and torch.allclose(packed_small, alone_small, atol=1e-6)
    assert packed_small.shape == (6 * 10, 32)
    # Bagel's extrapolating ids: a 6 x 10 image uses the top-left 6 x 10 block of the 70 x 70 table, row-major.
    ids = flattened_position_ids(24, 40, 4)
    assert ids[:3].tolist() == [0, 1, 2] and ids[10].item() == 70 and ids[-1].item() == 5 * 70 + 9
    # (kh, kw, c) patch order: patch 1 of a 2 x 4 x 3 image holds pixels (row 0-1, col 2-3), channel fastest.
    image = torch.arange(2 * 4 * 3.0).reshape(3, 2, 4)
    assert patchify(image, 2)[1].tolist() == [image[c, r, 2 + k].item() for r in range(2) for k in range(2) for c in range(3)]


# ------------------------------------------------------------------------------- tokenizer directories
@pytest.fixture(scope="module")
def siglip2_tokenizer(encoders, tmp_path_factory) -> Path:
    """A tiny psvae-96c-siglip2 tokenizer (the preset's SigLIP2-so400m/14 encoder is the `siglip` class) saved to disk."""
    directory = tmp_path_factory.mktemp("bagel-tokenizer")
    torch.manual_seed(0)
    config = tiny_config("psvae-96c-siglip2", encoders, directory / "no-shapes", directory / "run").model
    model = SemanticAutoencoder.build(config).eval()
    assert model.backbone.kind == "siglip"
    with torch.no_grad():  # a "fine-tuned" encoder: not the saved encoder's weights any more
        for parameter in model.backbone.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    return model.save_pretrained(directory / "tokenizer")


def test_cli_exports_a_tokenizer_and_the_export_matches_its_encoder(siglip2_tokenizer, tmp_path, capsys):
    output = tmp_path / "bagel"
    assert main(["export", "bagel-vit", "--tokenizer", str(siglip2_tokenizer), "-o", str(output), "--check-keys", "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "3 of 4 layers kept" in printed and "4x4 -> 70x70" in printed
    # --check-keys against Bagel's so400m ViT: the 32-wide, 3-layer tiny encoder matches none of its shapes.
    assert f"{26 * 16 - 3 * 16} missing, 0 unexpected, {3 * 16 + 5} shape mismatches" in printed
    assert "missing: vit_model.vision_model.encoder.layers.25.mlp.fc2.bias" in printed
    assert "verify: max |exported - encoder| =" in printed
    tokenizer = SemanticAutoencoder.from_pretrained(siglip2_tokenizer)
    assert verify_bagel_export(tokenizer, output) <= TOLERANCE
    exported = load_file(str(output / BAGEL_VIT_WEIGHTS_NAME))
    backbone = tokenizer.backbone.model.state_dict()
    assert torch.equal(exported["vit_model.vision_model.encoder.layers.2.mlp.fc2.weight"], backbone["encoder.layers.2.mlp.fc2.weight"])
    assert torch.equal(exported["vit_model.vision_model.post_layernorm.bias"], backbone["post_layernorm.bias"])


# --------------------------------------------------------------------------------------------- merge
def fake_ema(path: Path, architecture: BagelViTArchitecture, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """A small Bagel-like ema.safetensors: LLM, connector, vit_pos_embed, VAE-side tensors and the ViT's keys."""
    generator = torch.Generator().manual_seed(3)
    tensors = {
        "language_model.model.embed_tokens.weight": torch.randn(50, 16, generator=generator).to(dtype),
        "language_model.model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=generator).to(dtype),
        "language_model.model.norm.weight": torch.randn(16, generator=generator).to(torch.float32),
        "connector.fc1.weight": torch.randn(16, architecture.hidden_size, generator=generator).to(dtype),
        "connector.fc1.bias": torch.randn(16, generator=generator).to(dtype),
        "connector.fc2.weight": torch.randn(16, 16, generator=generator).to(dtype),
        "connector.fc2.bias": torch.randn(16, generator=generator).to(dtype),
        "vit_pos_embed.pos_embed": torch.randn(70 * 70, 16, generator=generator).to(dtype),
        "vae2llm.weight": torch.randn(16, 8, generator=generator).to(dtype),
        "latent_pos_embed.pos_embed": torch.arange(12, dtype=torch.int64),
    }
    for name, shape in architecture.manifest().items():
        tensors[name] = torch.randn(shape, generator=generator).to(dtype)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return tensors


def raw_bytes(path: Path) -> dict[str, bytes]:
    start, header = read_safetensors_header(path)
    header.pop("__metadata__", None)
    data = path.read_bytes()
    return {name: data[start + entry["data_offsets"][0] : start + entry["data_offsets"][1]] for name, entry in header.items()}


def test_merge_replaces_only_vit_tensors(tmp_path):
    encoder = tiny_encoder("siglip2")
    ema = tmp_path / "bagel" / "ema.safetensors"
    ema.parent.mkdir()
    original = fake_ema(ema, BagelViTArchitecture(hidden_size=32, intermediate_size=64, num_layers=3, num_attention_heads=2, patch_size=8))
    before = raw_bytes(ema)
    output = tmp_path / "out"
    report = export_bagel_vit(encoder, output, merge_into=ema)
    merged = output / BAGEL_MERGED_NAME
    assert report.merged == merged and report.replaced == 53 and report.kept == 10

    after = raw_bytes(merged)
    assert set(after) == set(before)
    exported = load_file(str(output / BAGEL_VIT_WEIGHTS_NAME))
    with safe_open(str(merged), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
        for name in before:
            tensor = handle.get_tensor(name)
            assert tensor.dtype == original[name].dtype and tensor.shape == original[name].shape
            if is_bagel_vit_key(name):
                assert torch.equal(tensor, exported[name].to(original[name].dtype))
            else:
                assert after[name] == before[name] and torch.equal(tensor, original[name])
    assert raw_bytes(ema) == before  # the source checkpoint is untouched
    # The merged checkpoint runs as Bagel's ViT (bf16 copy of the exported fp32 weights).
    reference = BagelNaViTReference.from_pretrained(output, weights=merged).float()
    image = random_image(70 * 8)
    (features,) = reference.encode_images([image[0]])
    assert (features - source_features(encoder, image)[0]).abs().max() < 0.1


def test_merge_refuses_a_checkpoint_whose_vit_does_not_fit(tmp_path):
    ema = tmp_path / "ema.safetensors"
    fake_ema(ema, BagelViTArchitecture(hidden_size=32, intermediate_size=64, num_layers=5, num_attention_heads=2, patch_size=8))
    with pytest.raises(UserError, match=r"32 missing.*layers\.3\."):
        export_bagel_vit(tiny_encoder("siglip"), tmp_path / "out", merge_into=ema)
    assert not (tmp_path / "out" / BAGEL_MERGED_NAME).exists()


# -------------------------------------------------------------------------------------------- errors
def run_cli(args: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()  # drop what building the fixtures printed (transformers' loading bars)
    code = main(args)
    return code, capsys.readouterr().err


def test_cli_errors_are_one_line(encoders, tmp_path, capsys):
    prefix = "unimm export bagel-vit: error:"
    code, err = run_cli(["export", "bagel-vit", "--tokenizer", str(tmp_path / "missing"), "-o", str(tmp_path / "o")], capsys)
    assert code == 2 and err.startswith(prefix) and err.count("\n") == 1 and "not a directory" in err

    torch.manual_seed(0)
    dinov2 = SemanticAutoencoder.build(tiny_config("psvae-96c", encoders, tmp_path / "no-shapes", tmp_path / "run").model)
    dinov2.save_pretrained(tmp_path / "dinov2-tokenizer")
    code, err = run_cli(["export", "bagel-vit", "--tokenizer", str(tmp_path / "dinov2-tokenizer"), "-o", str(tmp_path / "o")], capsys)
    assert code == 2 and err.startswith(prefix) and err.count("\n") == 1 and "'dinov2'" in err and "SigLIP" in err

    vae = SemanticAutoencoder.build(tiny_config("vae", encoders, tmp_path / "no-shapes", tmp_path / "run").model)
    vae.save_pretrained(tmp_path / "vae-tokenizer")
    code, err = run_cli(["export", "bagel-vit", "--tokenizer", str(tmp_path / "vae-tokenizer"), "-o", str(tmp_path / "o")], capsys)
    assert code == 2 and err.startswith(prefix) and err.count("\n") == 1 and "no representation encoder" in err

    code, err = run_cli(["export", "bagel-vit", "--tokenizer", str(encoders["dinov2"]), "-o", str(tmp_path / "o")], capsys)
    assert code == 2 and err.startswith(prefix) and err.count("\n") == 1 and "'dinov2'" in err

    code, err = run_cli(["export", "bagel-vit", "--tokenizer", str(encoders["siglip"]), "-o", str(tmp_path / "o"),
                         "--merge-into", str(tmp_path / "nope.safetensors")], capsys)
    assert code == 2 and err.startswith(prefix) and err.count("\n") == 1 and "--merge-into" in err
    assert not (tmp_path / "o").exists()

"""A tokenizer saved under one transformers naming of the ViT attention projections loads under the other."""

import torch

from tokenizer.checkpoint_names import match_state_dict_names

NEW = ["encoder.layer.0.attention.q_proj.weight", "encoder.layer.0.attention.o_proj.bias", "encoder.layer.0.mlp.fc1.weight"]
OLD = ["encoder.layer.0.attention.attention.query.weight", "encoder.layer.0.attention.output.dense.bias", "encoder.layer.0.mlp.fc1.weight"]


def test_old_names_are_matched_to_new_ones_and_back():
    tensors = [torch.full((1,), float(index)) for index in range(3)]
    renamed = match_state_dict_names(dict(zip(OLD, tensors)), NEW)
    assert list(renamed) == NEW and all(renamed[name] is tensor for name, tensor in zip(NEW, tensors))
    assert list(match_state_dict_names(dict(zip(NEW, tensors)), OLD)) == OLD


def test_unknown_keys_stay_so_real_mismatches_are_still_reported():
    state = {"encoder.layer.0.attention.attention.query.weight": torch.zeros(1), "something.else": torch.zeros(1)}
    assert set(match_state_dict_names(state, ["encoder.layer.0.attention.q_proj.weight"])) == {
        "encoder.layer.0.attention.q_proj.weight", "something.else"}


def test_a_tokenizer_saved_with_the_older_names_loads_into_the_same_model(generator_parts, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from tokenizer.checkpoint_names import ATTENTION_RENAMES
    from tokenizer.model import SemanticAutoencoder

    saved = generator_parts[0]
    reference = SemanticAutoencoder.from_pretrained(saved).state_dict()
    older = tmp_path / "older"
    shutil.copytree(saved, older)
    state = load_file(str(older / "model.safetensors"))
    renamed = {}
    for name, tensor in state.items():
        for old, new in ATTENTION_RENAMES:
            name = name.replace(new, old)
        renamed[name] = tensor
    assert renamed.keys() != state.keys()  # the tiny encoder really has attention projections to rename
    save_file(renamed, str(older / "model.safetensors"))
    loaded = SemanticAutoencoder.from_pretrained(older).state_dict()
    assert loaded.keys() == reference.keys() and all(torch.equal(loaded[name], reference[name]) for name in reference)

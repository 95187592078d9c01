"""The Shapes stand-in for Qwen2.5: its word tokenizer covers the world's language (no unknown words on
unseen scenes, captions round-trip) and the written directory loads through the real transformers path."""

from __future__ import annotations

import numpy as np

from data.shapes.text_model import shapes_corpus
from unimm.cli import main
from unimm.models.backbone import build_backbone, load_text_tokenizer


def test_cli_writes_a_qwen2_directory_whose_tokenizer_covers_unseen_text(tmp_path):
    directory = tmp_path / "text-model"
    assert main(["shapes", "text-model", "-o", str(directory), "hidden_size=32", "num_hidden_layers=1", "num_attention_heads=2",
                 "num_key_value_heads=1", "intermediate_size=64", "corpus_scenes=300"]) == 0
    tokenizer = load_text_tokenizer(str(directory))
    backbone = build_backbone(str(directory), pretrained=True)
    assert type(backbone).__name__ == "Qwen2Model" and backbone.config.vocab_size == len(tokenizer)
    unseen = shapes_corpus(200, seed=12345)  # other scenes, captions and edit instructions than the tokenizer saw
    unknown = tokenizer.unk_token_id
    for text in unseen:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert unknown not in ids, text
        assert tokenizer.decode(ids).replace(" ", "") == text.lower().replace(" ", "")
    assert tokenizer("", add_special_tokens=False)["input_ids"] == []
    ids = np.array(tokenizer(["a red circle", "two blue squares ."], padding=True)["input_ids"])
    assert ids.shape == (2, 4) and ids[0, -1] == tokenizer.pad_token_id

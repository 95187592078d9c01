"""The Shapes stand-in for Qwen2.5: a word-level text tokenizer trained on the world's own language (captions,
GenEval-style prompts, edit instructions) and a small Qwen2 decoder, saved together as a Qwen2-format directory.

The generator loads it exactly as it loads `Qwen/Qwen2.5-0.5B`: `Qwen2Model.from_pretrained(dir)` and
`AutoTokenizer.from_pretrained(dir)`. Only the sizes differ. The decoder starts from random weights (there is
no language pretraining in the miniature world); its text embeddings learn during generator training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

PAD_TOKEN = "<|endoftext|>"  # Qwen2.5's pad token, so the two tokenizers behave alike
UNKNOWN_TOKEN = "<unk>"


@dataclass
class ShapesTextModelConfig:
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 384
    max_position_embeddings: int = 512
    # Scenes whose captions (and edit instructions) train the tokenizer's vocabulary.
    corpus_scenes: int = 4000
    seed: int = 0


def shapes_corpus(num_scenes: int, seed: int = 0) -> list[str]:
    """Every kind of text the Shapes world produces: short and long captions, GenEval prompts, edit instructions."""
    from data.shapes.captions import captions_for
    from data.shapes.edits import EDIT_TASKS, make_edit
    from data.shapes.prompts import geneval_prompts
    from data.shapes.scene import sample_scene

    rng = np.random.default_rng(seed)
    texts = [spec["prompt"] for spec in geneval_prompts(seed)]
    for _ in range(num_scenes):
        scene = sample_scene(rng)
        texts += list(captions_for(scene, rng).values())
        edit = make_edit(scene, EDIT_TASKS[int(rng.integers(len(EDIT_TASKS)))], rng)
        if edit is not None:
            texts += list(edit.instructions)
    return texts


def train_text_tokenizer(texts: list[str]):
    """A lower-cased word-level tokenizer (words and punctuation) as a `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token=UNKNOWN_TOKEN))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=[PAD_TOKEN, UNKNOWN_TOKEN]))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD_TOKEN, unk_token=UNKNOWN_TOKEN)


def small_qwen2_config(tokenizer, hidden_size: int, num_hidden_layers: int, num_attention_heads: int,
                       num_key_value_heads: int, intermediate_size: int, max_position_embeddings: int):
    """A small Qwen2 decoder config over a word tokenizer of `train_text_tokenizer`: tied embeddings, and the
    pad token doubling as end of text (Qwen2.5's convention). Shared by the Shapes text model and the
    miniature understanding model's LLM."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )


def write_shapes_text_model(out_dir: str | Path, config: ShapesTextModelConfig | None = None) -> Path:
    """Write tokenizer files + config.json + model.safetensors of a small random Qwen2 decoder to `out_dir`."""
    import torch
    from transformers import Qwen2ForCausalLM

    config = config or ShapesTextModelConfig()
    out_dir = Path(out_dir)
    tokenizer = train_text_tokenizer(shapes_corpus(config.corpus_scenes, config.seed))
    qwen_config = small_qwen2_config(
        tokenizer, config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
        config.num_key_value_heads, config.intermediate_size, config.max_position_embeddings,
    )
    torch.manual_seed(config.seed)
    # Saved as Qwen2ForCausalLM, the class of the Qwen2.5 hub checkpoints, so both load the same way.
    Qwen2ForCausalLM(qwen_config).save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir

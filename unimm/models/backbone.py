"""The Qwen2 backbone and its text tokenizer, loaded through `transformers` from a hub id or a local directory.

`BACKBONE_CATALOG` holds the architecture of the Qwen2.5 checkpoints the presets name, so `unimm info` can
build them on the meta device on a machine that has never downloaded them. A local directory or a cached
hub config always wins over the catalog.
"""

from __future__ import annotations

from pathlib import Path

from unimm.errors import UserError
from unimm.models import varlen_attention

varlen_attention.register()

_QWEN25_COMMON = dict(
    vocab_size=151936,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    hidden_act="silu",
    attention_dropout=0.0,
    use_sliding_window=False,
)

# hub id -> Qwen2Config fields (from the checkpoints' config.json; DESIGN.md §4).
BACKBONE_CATALOG: dict[str, dict] = {
    "Qwen/Qwen2.5-0.5B": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864, **_QWEN25_COMMON),
    "Qwen/Qwen2.5-1.5B": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, intermediate_size=8960, **_QWEN25_COMMON),
    "Qwen/Qwen2.5-3B": dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2, intermediate_size=11008, **_QWEN25_COMMON),
}


def load_backbone_config(name_or_path: str, attention: str = "sdpa"):
    """The Qwen2Config of a local directory, a cached hub id, or (offline) the catalog entry."""
    from transformers import AutoConfig, Qwen2Config

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"backbone directory {path} has no config.json; point backbone.name_or_path at a Qwen2-format directory")
        config = AutoConfig.from_pretrained(str(path))
    else:
        try:  # the hub cache first; the catalog before the network (this machine may be offline)
            config = AutoConfig.from_pretrained(name_or_path, local_files_only=True)
        except OSError:
            if name_or_path in BACKBONE_CATALOG:
                config = Qwen2Config(**BACKBONE_CATALOG[name_or_path])
            else:
                try:
                    config = AutoConfig.from_pretrained(name_or_path)
                except OSError:
                    raise UserError(
                        f"cannot find the backbone '{name_or_path}': not a local directory, not in the hub cache, and not one of "
                        f"{', '.join(BACKBONE_CATALOG)}; pass a local Qwen2-format directory"
                    ) from None
    if config.model_type != "qwen2":
        raise UserError(f"backbone '{name_or_path}' is a {config.model_type} model; the generator needs a Qwen2-format decoder")
    config._attn_implementation = resolve_attention(attention)
    return config


def resolve_attention(requested: str) -> str:
    """The attention implementation the backbone runs with.

    The generator's mask is block-causal (causal text, full image blocks, no attention across packed samples),
    which `transformers`' own flash_attention_2 path cannot express: it would silently apply a plain causal
    mask. A request for it runs our varlen plan instead (`varlen_attention.py`): flash-attn's varlen kernel
    for CUDA fp16/bf16 tensors when flash-attn is installed, PyTorch SDPA with the exact mask otherwise.
    """
    if requested in ("flash_attention_2", varlen_attention.IMPLEMENTATION_NAME):
        return varlen_attention.IMPLEMENTATION_NAME
    return requested


def build_backbone(name_or_path: str, pretrained: bool, attention: str = "sdpa"):
    """A `Qwen2Model` (the decoder without its LM head): pretrained weights, or the same architecture at random."""
    from transformers import Qwen2Model

    config = load_backbone_config(name_or_path, attention)
    if not pretrained:
        return Qwen2Model(config)
    try:
        return Qwen2Model.from_pretrained(name_or_path, config=config, dtype="float32")
    except OSError as error:
        raise UserError(
            f"cannot load the backbone weights from '{name_or_path}' ({error.__class__.__name__}); download them or pass a local directory"
        ) from None


def load_text_tokenizer(name_or_path: str):
    """AutoTokenizer, except for a directory whose tokenizer is a generic `tokenizers` file (the Shapes word
    tokenizer): AutoTokenizer would pick Qwen2Tokenizer from config.json's model type and rebuild it as BPE."""
    import json

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    settings = Path(name_or_path).expanduser() / "tokenizer_config.json"
    generic = settings.is_file() and json.loads(settings.read_text()).get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast")
    try:
        if generic:
            return PreTrainedTokenizerFast.from_pretrained(name_or_path)
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load the text tokenizer from '{name_or_path}' ({error.__class__.__name__}); pass a local directory with tokenizer files") from None


def encode_text(text_tokenizer, texts: list[str], max_tokens: int) -> list[list[int]]:
    """Token ids of each text: no special tokens, truncated to `max_tokens`; an empty text gives no tokens."""
    if not texts:
        return []
    encoded = text_tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_tokens)["input_ids"]
    return [list(ids) for ids in encoded]

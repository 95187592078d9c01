"""Architecture hyper-parameters of the public representation encoders the presets name.

`unimm info` builds presets on the meta device without network access, so it needs each encoder's
architecture without downloading its `config.json`. These values mirror the public configs of the
hub ids (hidden size, depth, heads, MLP width, patch, registers); training always loads the real
checkpoint with `from_pretrained`, which brings its own config.
"""

from __future__ import annotations

CATALOG: dict[str, tuple[str, dict]] = {
    "facebook/dinov2-base": ("dinov2", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, patch_size=14, image_size=518)),
    "facebook/dinov2-large": ("dinov2", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4, patch_size=14, image_size=518)),
    "facebook/dinov2-with-registers-base": ("dinov2_registers", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, patch_size=14, image_size=518, num_register_tokens=4)),
    "facebook/dinov2-with-registers-large": ("dinov2_registers", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4, patch_size=14, image_size=518, num_register_tokens=4)),
    "facebook/dinov3-vith16plus-pretrain-lvd1689m": ("dinov3", dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120, use_gated_mlp=True, patch_size=16, num_register_tokens=4, image_size=224)),
    "facebook/dinov3-vitl16-pretrain-lvd1689m": ("dinov3", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, use_gated_mlp=False, patch_size=16, num_register_tokens=4, image_size=224)),
    "google/siglip2-so400m-patch14-224": ("siglip", dict(hidden_size=1152, num_hidden_layers=27, num_attention_heads=16, intermediate_size=4304, patch_size=14, image_size=224)),
    "google/siglip2-base-patch16-256": ("siglip", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, patch_size=16, image_size=256)),
}


def catalog_config(name: str):
    """The transformers config of a catalogued hub id, or None."""
    import transformers

    if name not in CATALOG:
        return None
    kind, values = CATALOG[name]
    config_class = {
        "dinov2": transformers.Dinov2Config,
        "dinov2_registers": transformers.Dinov2WithRegistersConfig,
        "dinov3": transformers.DINOv3ViTConfig,
        "siglip": transformers.SiglipVisionConfig,
    }[kind]
    return config_class(**values)

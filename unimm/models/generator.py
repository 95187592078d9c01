"""The unified generator: a Qwen2 decoder shared by text and image tokens (Transfusion-style deep fusion),
latent embeddings at its input, and the wide DDT head at its output.

Image latents enter the backbone through a linear projection, plus the fixed 2D sin-cos code of their grid
position, plus an embedding of their timestep (t = 0 for the clean input image of an edit), as in Bagel.
The backbone's output at the noisy image tokens conditions the DDT head, which predicts the velocity.
With `text_summary`, the backbone's final state at the caption's last token is added to the noisy image tokens'
input as well (see `GeneratorModelConfig.text_summary`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from unimm.config import config_from_dict
from unimm.errors import UserError
from unimm.models.backbone import build_backbone, resolve_attention
from unimm.models.config import GeneratorModelConfig
from unimm.models.ddt_head import DDTHead
from unimm.models.embeddings import TimestepEmbedder, patchify, sincos_2d_positions, unpatchify
from unimm.models.sequence import NOISY_IMAGE, TEXT, SequenceLayout
from unimm.models.varlen_attention import IMPLEMENTATION_NAME as VARLEN_ATTENTION
from unimm.models.varlen_attention import BlockCausalAttention


def _backbone_cache_keyword() -> str:
    """The name under which Qwen2Model takes and returns its KV cache.

    transformers 5.x renamed `past_key_values` to `cache`: 5.25 warns on every call with the old name and marks
    it for removal in 5.40, while older releases (pyproject allows >= 4.45) only know `past_key_values`.
    """
    import inspect

    from transformers import Qwen2Model

    return "cache" if "cache" in inspect.signature(Qwen2Model.forward).parameters else "past_key_values"


_CACHE_KEYWORD = _backbone_cache_keyword()

CONFIG_FILE = "generator_config.json"
WEIGHTS_FILE = "generator.safetensors"
# Parameters that start at zero, so a checkpoint saved without them loads into a model that has them and
# predicts exactly what it predicted before (`train.init_from` a model trained without `text_summary`).
ZERO_INITIALISED_PREFIXES = ("text_summary_projection.",)


@dataclass
class EncodedPrefix:
    """The text (and clean input image) prefix run once for KV-cached sampling."""

    cache: object | None  # transformers DynamicCache of the prefix; None for an empty prefix
    text_summary: torch.Tensor | None  # (samples, hidden) when the model uses `text_summary`, else None


class UnimmGenerator(nn.Module):
    def __init__(self, config: GeneratorModelConfig, backbone: nn.Module):
        super().__init__()
        if config.latent_channels < 1:
            raise ValueError("latent_channels must be set (read it from the tokenizer) before building the generator")
        layers = backbone.config.num_hidden_layers
        if not 0 <= config.text_blind_layers <= layers:
            raise ValueError(f"text_blind_layers must be between 0 and the backbone's {layers} layers, got {config.text_blind_layers}")
        if config.text_blind_layers and backbone.config._attn_implementation == VARLEN_ATTENTION:
            raise ValueError("text_blind_layers needs attention sdpa, eager or flex_attention: the varlen plan has one mask for every layer")
        self.config = config
        self.backbone = backbone  # transformers Qwen2Model
        hidden_size = backbone.config.hidden_size
        self.token_size = config.latent_channels * config.latent_patch_size**2
        self.latent_projection = nn.Linear(self.token_size, hidden_size)
        self.timestep_embedder = TimestepEmbedder(hidden_size, config.timestep_frequency_size)
        self.head = DDTHead(config.head, self.token_size, hidden_size, config.timestep_frequency_size)
        nn.init.normal_(self.timestep_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.timestep_embedder.mlp[2].weight, std=0.02)
        self.text_summary_projection = nn.Linear(hidden_size, hidden_size) if config.text_summary else None
        if self.text_summary_projection is not None:
            nn.init.zeros_(self.text_summary_projection.weight)
            nn.init.zeros_(self.text_summary_projection.bias)

    @classmethod
    def build(cls, config: GeneratorModelConfig, pretrained: bool | None = None) -> UnimmGenerator:
        """The backbone from `config.backbone` (its pretrained weights unless told otherwise), new embeddings and head."""
        backbone_config = config.backbone
        load = backbone_config.pretrained if pretrained is None else pretrained
        backbone = build_backbone(backbone_config.name_or_path, load, backbone_config.attention)
        return cls(config, backbone)

    @property
    def hidden_size(self) -> int:
        return self.backbone.config.hidden_size

    # --------------------------------------------------------------------------------- embeddings
    def embed_latents(self, latents: torch.Tensor, t: torch.Tensor, text_summary: torch.Tensor | None = None) -> torch.Tensor:
        """latents (S, C, H, W), t (S,), text_summary (S, hidden) or None -> backbone inputs (S, n, hidden)."""
        patch = self.config.latent_patch_size
        tokens = patchify(latents, patch).to(self.latent_projection.weight.dtype)
        grid = (latents.shape[-2] // patch, latents.shape[-1] // patch)
        positions = sincos_2d_positions(*grid, self.hidden_size, device=latents.device).to(tokens.dtype)
        embedded = self.latent_projection(tokens) + positions[None] + self.timestep_embedder(t)[:, None]
        if text_summary is not None:
            embedded = embedded + self.text_summary_projection(text_summary.to(embedded.dtype))[:, None]
        return embedded

    def input_embeddings(
        self,
        layout: SequenceLayout,
        noisy_latents: torch.Tensor | None,
        t: torch.Tensor | None,
        clean_latents: torch.Tensor | None,
        text_summary: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(rows, L, hidden): text embeddings, image embeddings at their slots, zeros at padding (and at the
        noisy slots when `noisy_latents` is None, for encoding a prefix)."""
        rows, length = layout.token_kinds.shape
        text = self.backbone.embed_tokens(layout.input_ids)
        flat = (text * (layout.token_kinds == TEXT)[..., None].to(text.dtype)).flatten(0, 1)
        if noisy_latents is not None:
            noisy = self.embed_latents(noisy_latents, t, text_summary).to(flat.dtype)
            flat = flat.index_copy(0, layout.noisy_index.flatten(), noisy.flatten(0, 1))
        if len(layout.clean_samples):
            if clean_latents is None or len(clean_latents) != len(layout.clean_samples):
                raise ValueError(f"the layout has {len(layout.clean_samples)} clean images but {0 if clean_latents is None else len(clean_latents)} were given")
            zero_time = torch.zeros(len(clean_latents), device=clean_latents.device)
            clean = self.embed_latents(clean_latents, zero_time).to(flat.dtype)
            flat = flat.index_copy(0, layout.clean_index.flatten(), clean.flatten(0, 1))
        return flat.view(rows, length, -1)

    def _mask(self, attention: BlockCausalAttention, dtype: torch.dtype, hidden: torch.Tensor | None = None):
        """The visibility rule in the form the backbone's attention implementation takes (`hidden`: (rows, 1, Lq, Lk)
        pairs to hide on top of it)."""
        implementation = self.backbone.config._attn_implementation
        if implementation == VARLEN_ATTENTION:  # a dict skips transformers' mask building; every layer gets the plan
            if hidden is not None:
                raise ValueError("text_blind_layers needs attention sdpa, eager or flex_attention, not the varlen plan")
            return {"full_attention": attention}
        mask = attention.dense if hidden is None else attention.dense & ~hidden
        if implementation == "eager":  # additive float mask
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        if implementation == "flex_attention":
            from torch.nn.attention.flex_attention import create_block_mask

            dense = mask[:, 0]
            return create_block_mask(
                lambda b, h, q, k: dense[b, q, k], dense.shape[0], None, dense.shape[1], dense.shape[2], device=str(mask.device)
            )
        return mask

    def run_backbone(self, embeddings, attention: BlockCausalAttention, position_ids, cache=None, use_cache: bool = False,
                     query_kinds: torch.Tensor | None = None, key_kinds: torch.Tensor | None = None):
        """Backbone forward; returns (last hidden state, the KV cache or None). The token kinds of the queries and
        keys, (rows, Lq) and (rows, Lk), are needed only by a model with `text_blind_layers`."""
        blind_layers = self.config.text_blind_layers
        hooks = []
        if blind_layers and query_kinds is not None:  # without noisy queries the extra mask hides nothing
            # noisy image queries x text keys, hidden in the first layers (their own mask, swapped in per layer)
            hidden = (query_kinds == NOISY_IMAGE)[:, None, :, None] & (key_kinds == TEXT)[:, None, None, :]
            blind = self._mask(attention, embeddings.dtype, hidden)

            def swap_mask(module, args, kwargs):
                return args, {**kwargs, "attention_mask": blind}

            hooks = [layer.register_forward_pre_hook(swap_mask, with_kwargs=True) for layer in self.backbone.layers[:blind_layers]]
        try:
            output = self.backbone(
                inputs_embeds=embeddings,
                attention_mask=self._mask(attention, embeddings.dtype),
                position_ids=position_ids,
                use_cache=use_cache,
                **{_CACHE_KEYWORD: cache},
            )
        finally:
            for hook in hooks:
                hook.remove()
        return output.last_hidden_state, output.get(_CACHE_KEYWORD)

    def predict_velocity(self, hidden: torch.Tensor, noisy_latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """hidden (S, n, hidden) at the noisy tokens -> velocity (S, C, H, W)."""
        patch = self.config.latent_patch_size
        grid = (noisy_latents.shape[-2] // patch, noisy_latents.shape[-1] // patch)
        tokens = patchify(noisy_latents, patch).to(hidden.dtype)
        velocity = self.head(tokens, hidden, t, grid)
        return unpatchify(velocity, patch, *grid)

    # ---------------------------------------------------------------------------------- forward
    def forward(
        self, layout: SequenceLayout, noisy_latents: torch.Tensor, t: torch.Tensor, clean_latents: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The whole sequence at once: noisy_latents (S, C, H, W) and t (S,) in sample order -> velocity (S, C, H, W)."""
        summary = self.text_summary(layout, clean_latents) if self.text_summary_projection is not None else None
        embeddings = self.input_embeddings(layout, noisy_latents, t, clean_latents, summary)
        hidden, _ = self.run_backbone(embeddings, layout.visibility(), layout.position_ids,
                                      query_kinds=layout.token_kinds, key_kinds=layout.token_kinds)
        noisy_hidden = hidden.flatten(0, 1)[layout.noisy_index.flatten()].view(*layout.noisy_index.shape, -1)
        return self.predict_velocity(noisy_hidden, noisy_latents, t)

    def text_summary(self, layout: SequenceLayout, clean_latents: torch.Tensor | None = None) -> torch.Tensor:
        """(samples, hidden): the backbone's final state at each sample's last text token (zeros without text).

        Text never sees the noisy image, so its states do not depend on it: the aligned layout runs only its prefix
        columns; a packed layout runs every column with the noisy slots left empty.
        """
        if layout.prefix_length == 0:
            return self._no_text(layout)
        if layout.prefix_length > 0:
            columns = slice(0, layout.prefix_length)
            hidden, _ = self._run_prefix(layout, clean_latents)
        else:
            columns = slice(None)
            hidden, _ = self.run_backbone(self.input_embeddings(layout, None, None, clean_latents), layout.visibility(), layout.position_ids)
        return self._last_text_states(layout, columns, hidden)

    def _run_prefix(self, layout: SequenceLayout, clean_latents: torch.Tensor | None, cache=None):
        """The backbone over the first `prefix_length` columns of an aligned layout: (hidden, the filled cache or None)."""
        columns = slice(0, layout.prefix_length)
        embeddings = self.input_embeddings(layout, None, None, clean_latents)[:, columns]
        return self.run_backbone(embeddings, layout.visibility(columns, columns), layout.position_ids[:, columns],
                                 cache=cache, use_cache=cache is not None)

    def _no_text(self, layout: SequenceLayout) -> torch.Tensor:
        return torch.zeros(layout.noisy_index.shape[0], self.hidden_size, device=layout.token_kinds.device, dtype=self.latent_projection.weight.dtype)

    def _last_text_states(self, layout: SequenceLayout, columns: slice, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (rows, columns, hidden) over `columns` of the layout -> (samples, hidden) at each sample's last text
        token, zeros for a sample without text."""
        samples = layout.noisy_index.shape[0]
        kinds, sample_ids = layout.token_kinds[:, columns], layout.sample_ids[:, columns]
        summary = hidden.new_zeros(samples, hidden.shape[-1])
        is_text = (kinds == TEXT).flatten()
        flat_positions = torch.arange(is_text.numel(), device=hidden.device)
        # The last text token of a sample is its text token with the largest flat position (columns count up).
        last = torch.full((samples,), -1, dtype=torch.long, device=hidden.device)
        last = last.scatter_reduce(0, sample_ids.flatten()[is_text], flat_positions[is_text], reduce="amax")
        has_text = last >= 0
        summary[has_text] = hidden.flatten(0, 1)[last[has_text]]
        return summary

    def encode_prefix(self, layout: SequenceLayout, clean_latents: torch.Tensor | None = None) -> EncodedPrefix:
        """Run the text (and clean input image) prefix once: its KV cache (None for an empty prefix) and, for a
        model with `text_summary`, the summary its noisy tokens take.

        Needs the aligned layout (`build_layout(..., rows=None)`): the prefix is the first `prefix_length` columns.
        """
        if layout.prefix_length < 0:
            raise ValueError("the KV-cached path needs an aligned layout (one sample per row)")
        prefix = layout.prefix_length
        uses_summary = self.text_summary_projection is not None
        if prefix == 0:
            return EncodedPrefix(None, self._no_text(layout) if uses_summary else None)
        from transformers import DynamicCache

        hidden, cache = self._run_prefix(layout, clean_latents, cache=DynamicCache(config=self.backbone.config))
        return EncodedPrefix(cache, self._last_text_states(layout, slice(0, prefix), hidden) if uses_summary else None)

    def forward_cached(self, layout: SequenceLayout, prefix_state: EncodedPrefix, noisy_latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """One denoising step that reuses the encoded prefix: only the n noisy tokens go through the backbone."""
        prefix = layout.prefix_length
        cache = prefix_state.cache
        embeddings = self.embed_latents(noisy_latents, t, prefix_state.text_summary)
        if cache is not None:
            surplus = cache.get_seq_length() - prefix
            if surplus > 0:
                cache.crop(-surplus)  # drop the previous step's noisy keys/values
            attention, keys = layout.visibility(slice(prefix, None)), slice(None)
        else:
            attention, keys = layout.visibility(slice(prefix, None), slice(prefix, None)), slice(prefix, None)
        hidden, _ = self.run_backbone(embeddings, attention, layout.position_ids[:, prefix:], cache=cache, use_cache=cache is not None,
                                      query_kinds=layout.token_kinds[:, prefix:], key_kinds=layout.token_kinds[:, keys])
        return self.predict_velocity(hidden, noisy_latents, t)

    # ------------------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | Path, state_dict: dict | None = None) -> Path:
        """generator_config.json (our config + the backbone's Qwen2 config) and generator.safetensors."""
        from safetensors.torch import save_file

        from unimm.atomic import atomic_write

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        description = {"model": asdict(self.config), "backbone_config": self.backbone.config.to_dict()}
        atomic_write(directory / CONFIG_FILE, lambda path: path.write_text(json.dumps(description, indent=2) + "\n"))
        state = state_dict if state_dict is not None else self.state_dict()
        tensors = {name: value.detach().contiguous().cpu() for name, value in state.items()}
        atomic_write(directory / WEIGHTS_FILE, lambda path: save_file(tensors, str(path), metadata={"format": "pt"}))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, attention: str | None = None, map_location: str = "cpu") -> UnimmGenerator:
        from safetensors.torch import load_file
        from transformers import Qwen2Config, Qwen2Model

        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
            raise UserError(f"{directory} is not a saved generator (it needs {CONFIG_FILE} and {WEIGHTS_FILE})")
        description = json.loads((directory / CONFIG_FILE).read_text())
        config = config_from_dict(GeneratorModelConfig, description["model"], source=str(directory / CONFIG_FILE))
        backbone_config = Qwen2Config.from_dict(description["backbone_config"])
        backbone_config._attn_implementation = resolve_attention(attention or config.backbone.attention)
        model = cls(config, Qwen2Model(backbone_config))
        state = load_file(str(directory / WEIGHTS_FILE), device=map_location)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UserError(f"{directory / WEIGHTS_FILE} does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
        return model


def count_parameters(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())

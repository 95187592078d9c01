"""How samples become token sequences for the deep-fusion backbone, and who may attend to whom.

A sample is a list of segments: text-to-image is ``[caption text][noisy image]``; editing is
``[clean input image][instruction text][noisy image]``. Each token carries

- its **sample id** (packed rows hold several samples; -1 marks padding),
- its **block id**: every text token is its own block, all tokens of one image share a block,
- its RoPE **position**: text tokens count up; all tokens of one image share one position (their layout is
  given by the 2D sin-cos code added to their embeddings, as in Bagel), and the next segment continues after it.

The attention rule is then one line: token i sees token j iff they belong to the same sample and
``block[j] <= block[i]``. That gives causal text, full attention inside an image, noisy latents that see the
whole prefix, clean input latents that see neither the instruction nor the noisy latents, and no attention
across packed samples. Padding tokens see only themselves (so no softmax row is empty).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from unimm.models.varlen_attention import BlockCausalAttention

PAD, TEXT, CLEAN_IMAGE, NOISY_IMAGE = -1, 0, 1, 2


@dataclass
class SampleSpec:
    text_ids: list[int]
    has_clean_image: bool = False  # editing: the input image comes first


@dataclass
class SequenceLayout:
    input_ids: torch.Tensor  # (rows, L) text token ids; 0 where the token is not text
    token_kinds: torch.Tensor  # (rows, L) PAD / TEXT / CLEAN_IMAGE / NOISY_IMAGE
    sample_ids: torch.Tensor  # (rows, L) global sample index, -1 for padding
    block_ids: torch.Tensor  # (rows, L)
    position_ids: torch.Tensor  # (rows, L)
    noisy_index: torch.Tensor  # (samples, n) flat positions (row * L + column) of each sample's noisy tokens
    clean_index: torch.Tensor  # (samples with a clean image, n) flat positions, in sample order
    clean_samples: torch.Tensor  # (samples with a clean image,) their sample ids
    grid: tuple[int, int]  # the image token grid (h, w); n = h * w
    prefix_length: int  # columns before the noisy block when it is aligned at the end of every row, else -1
    # (query columns, key columns) -> BlockCausalAttention: the KV-cached sampler asks for the same view at every
    # denoising step, and its dense mask / varlen plan are built once per layout instead of once per step.
    _views: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def length(self) -> int:
        return self.token_kinds.shape[1]

    def to(self, device) -> SequenceLayout:
        moved = {name: (value.to(device) if isinstance(value, torch.Tensor) else value)
                 for name, value in self.__dict__.items() if name != "_views"}
        return SequenceLayout(**moved)

    def visibility(self, queries: slice = slice(None), keys: slice = slice(None)) -> BlockCausalAttention:
        """Who sees whom among the query columns and key columns (the queries are the last key columns)."""
        key = (queries.start, queries.stop, keys.start, keys.stop)
        if key not in self._views:
            self._views[key] = BlockCausalAttention(self.sample_ids[:, queries], self.block_ids[:, queries],
                                                    self.sample_ids[:, keys], self.block_ids[:, keys])
        return self._views[key]

    def attention_mask(self) -> torch.Tensor:
        """(rows, 1, L, L) boolean, True where query i may attend key j."""
        return visibility(self.sample_ids, self.block_ids, self.sample_ids, self.block_ids)


def visibility(query_samples, query_blocks, key_samples, key_blocks) -> torch.Tensor:
    """(rows, 1, Lq, Lk) boolean mask of the rule above for query tokens against key tokens."""
    same_sample = (query_samples[:, :, None] == key_samples[:, None, :]) & (query_samples[:, :, None] >= 0)
    visible = same_sample & (key_blocks[:, None, :] <= query_blocks[:, :, None])
    if query_samples.shape[1] == key_samples.shape[1]:
        visible |= torch.eye(query_samples.shape[1], dtype=torch.bool, device=visible.device)[None]
    else:  # queries are the last Lq keys (a cached prefix precedes them): each pad still sees itself
        offset = key_samples.shape[1] - query_samples.shape[1]
        eye = torch.zeros(query_samples.shape[1], key_samples.shape[1], dtype=torch.bool, device=visible.device)
        eye[:, offset:] = torch.eye(query_samples.shape[1], dtype=torch.bool, device=visible.device)
        visible |= eye[None]
    return visible[:, None]


def _sample_tokens(spec: SampleSpec, tokens_per_image: int):
    """(kinds, ids, blocks, positions) of one sample as int64 arrays, prefix first and the noisy image last,
    and the prefix length."""
    clean = tokens_per_image if spec.has_clean_image else 0
    text = len(spec.text_ids)
    prefix = clean + text
    kinds = np.full(prefix + tokens_per_image, NOISY_IMAGE, dtype=np.int64)
    kinds[:clean] = CLEAN_IMAGE
    kinds[clean:prefix] = TEXT
    ids = np.zeros(prefix + tokens_per_image, dtype=np.int64)
    ids[clean:prefix] = np.asarray(spec.text_ids, dtype=np.int64)
    # The clean image is block (and position) 0 when present; each text token one more; the noisy image last.
    first = 1 if clean else 0
    steps = np.concatenate([np.zeros(clean, dtype=np.int64), first + np.arange(text, dtype=np.int64),
                            np.full(tokens_per_image, first + text, dtype=np.int64)])
    return kinds, ids, steps, steps, prefix


def build_layout(samples: list[SampleSpec], grid: tuple[int, int], rows: list[list[int]] | None = None) -> SequenceLayout:
    """Lay samples out in rows.

    rows=None puts one sample per row and aligns every noisy block at the end of its row (padding goes
    between the prefix and the noisy block), so the noisy tokens are the last n columns everywhere: the
    layout the KV-cached sampler needs. ``rows=[[0, 2], [1]]`` packs samples 0 and 2 into one row
    (padding at the end of each row). Built with numpy and converted once: it runs every training step.
    """
    tokens_per_image = grid[0] * grid[1]
    pieces = [_sample_tokens(spec, tokens_per_image) for spec in samples]
    aligned = rows is None
    rows = [[index] for index in range(len(samples))] if rows is None else rows
    if sorted(index for row in rows for index in row) != list(range(len(samples))):
        raise ValueError("rows must use every sample exactly once")
    if aligned:
        prefix_length = max(piece[4] for piece in pieces)
        length = prefix_length + tokens_per_image
    else:
        prefix_length = -1
        length = max(sum(len(pieces[index][0]) for index in row) for row in rows)

    shape = (len(rows), length)
    input_ids = np.zeros(shape, dtype=np.int64)
    token_kinds = np.full(shape, PAD, dtype=np.int64)
    sample_ids = np.full(shape, -1, dtype=np.int64)
    block_ids = np.zeros(shape, dtype=np.int64)
    position_ids = np.zeros(shape, dtype=np.int64)
    noisy_index = np.zeros((len(samples), tokens_per_image), dtype=np.int64)
    clean_index, clean_samples = [], []
    for row_number, row in enumerate(rows):
        column = 0
        for sample in row:
            kinds, ids, blocks, positions, prefix = pieces[sample]
            if aligned:
                # prefix at the start, noisy block at the very end; pads between them repeat the last position
                columns = np.concatenate([np.arange(prefix), np.arange(length - tokens_per_image, length)])
                position_ids[row_number, prefix:length - tokens_per_image] = positions[prefix]
            else:
                columns = np.arange(column, column + len(kinds))
                column += len(kinds)
            input_ids[row_number, columns] = ids
            token_kinds[row_number, columns] = kinds
            sample_ids[row_number, columns] = sample
            block_ids[row_number, columns] = blocks
            position_ids[row_number, columns] = positions
            flat = row_number * length + columns
            noisy_index[sample] = flat[kinds == NOISY_IMAGE]
            if samples[sample].has_clean_image:
                clean_index.append(flat[kinds == CLEAN_IMAGE])
                clean_samples.append(sample)
    order = sorted(range(len(clean_samples)), key=lambda position: clean_samples[position])
    return SequenceLayout(
        input_ids=torch.from_numpy(input_ids),
        token_kinds=torch.from_numpy(token_kinds),
        sample_ids=torch.from_numpy(sample_ids),
        block_ids=torch.from_numpy(block_ids),
        position_ids=torch.from_numpy(position_ids),
        noisy_index=torch.from_numpy(noisy_index),
        clean_index=torch.from_numpy(np.stack([clean_index[i] for i in order])) if clean_index else torch.zeros(0, tokens_per_image, dtype=torch.long),
        clean_samples=torch.tensor([clean_samples[i] for i in order], dtype=torch.long),
        grid=grid,
        prefix_length=prefix_length,
    )

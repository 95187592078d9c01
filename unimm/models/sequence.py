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

from dataclasses import dataclass

import torch

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

    @property
    def length(self) -> int:
        return self.token_kinds.shape[1]

    def to(self, device) -> SequenceLayout:
        moved = {name: (value.to(device) if isinstance(value, torch.Tensor) else value) for name, value in self.__dict__.items()}
        return SequenceLayout(**moved)

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
    """(kinds, ids, blocks, positions) of one sample, each a list, prefix first and the noisy image last."""
    kinds, ids, blocks, positions = [], [], [], []
    block = position = 0
    if spec.has_clean_image:
        kinds += [CLEAN_IMAGE] * tokens_per_image
        ids += [0] * tokens_per_image
        blocks += [block] * tokens_per_image
        positions += [position] * tokens_per_image
        block += 1
        position += 1
    for token in spec.text_ids:
        kinds.append(TEXT)
        ids.append(int(token))
        blocks.append(block)
        positions.append(position)
        block += 1
        position += 1
    prefix = len(kinds)
    kinds += [NOISY_IMAGE] * tokens_per_image
    ids += [0] * tokens_per_image
    blocks += [block] * tokens_per_image
    positions += [position] * tokens_per_image
    return kinds, ids, blocks, positions, prefix


def build_layout(samples: list[SampleSpec], grid: tuple[int, int], rows: list[list[int]] | None = None) -> SequenceLayout:
    """Lay samples out in rows.

    rows=None puts one sample per row and aligns every noisy block at the end of its row (padding goes
    between the prefix and the noisy block), so the noisy tokens are the last n columns everywhere: the
    layout the KV-cached sampler needs. ``rows=[[0, 2], [1]]`` packs samples 0 and 2 into one row
    (padding at the end of each row).
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
    input_ids = torch.zeros(shape, dtype=torch.long)
    token_kinds = torch.full(shape, PAD, dtype=torch.long)
    sample_ids = torch.full(shape, -1, dtype=torch.long)
    block_ids = torch.zeros(shape, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    noisy_index = torch.zeros(len(samples), tokens_per_image, dtype=torch.long)
    clean_index, clean_samples = [], []
    for row_number, row in enumerate(rows):
        column = 0
        for sample in row:
            kinds, ids, blocks, positions, prefix = pieces[sample]
            if aligned:
                # prefix at the start, noisy block at the very end; pads between them repeat the last position
                columns = list(range(prefix)) + list(range(length - tokens_per_image, length))
                pad_columns = range(prefix, length - tokens_per_image)
                position_ids[row_number, list(pad_columns)] = positions[prefix] if pad_columns else 0
            else:
                columns = list(range(column, column + len(kinds)))
                column += len(kinds)
            columns_tensor = torch.tensor(columns, dtype=torch.long)
            input_ids[row_number, columns_tensor] = torch.tensor(ids, dtype=torch.long)
            token_kinds[row_number, columns_tensor] = torch.tensor(kinds, dtype=torch.long)
            sample_ids[row_number, columns_tensor] = sample
            block_ids[row_number, columns_tensor] = torch.tensor(blocks, dtype=torch.long)
            position_ids[row_number, columns_tensor] = torch.tensor(positions, dtype=torch.long)
            flat = row_number * length + columns_tensor
            kinds_tensor = torch.tensor(kinds)
            noisy_index[sample] = flat[kinds_tensor == NOISY_IMAGE]
            if samples[sample].has_clean_image:
                clean_index.append(flat[kinds_tensor == CLEAN_IMAGE])
                clean_samples.append(sample)
    order = sorted(range(len(clean_samples)), key=lambda position: clean_samples[position])
    return SequenceLayout(
        input_ids=input_ids,
        token_kinds=token_kinds,
        sample_ids=sample_ids,
        block_ids=block_ids,
        position_ids=position_ids,
        noisy_index=noisy_index,
        clean_index=torch.stack([clean_index[i] for i in order]) if clean_index else torch.zeros(0, tokens_per_image, dtype=torch.long),
        clean_samples=torch.tensor([clean_samples[i] for i in order], dtype=torch.long),
        grid=grid,
        prefix_length=prefix_length,
    )

"""The data section of a run's configuration (a dataclass schema for ``unimm.config.build_config``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class DataConfig:
    # Storage layout of the shards: webdataset tars (pixparse/cc12m-wds style) or parquet tables
    # (Hugging Face ``datasets`` exports such as OmniEdit).
    format: Literal["webdataset", "parquet"] = "webdataset"
    # Files, directories or glob patterns; expanded and sorted so every process sees the same list.
    shards: list[str] = field(default_factory=list)
    kind: Literal["text_to_image", "edit", "image"] = "text_to_image"

    # Text-to-image fields. For webdataset a field is a member extension, for parquet a column name.
    # Image: the first field present wins.
    image_fields: list[str] = field(default_factory=lambda: ["jpg", "jpeg", "png", "webp", "image"])
    # Caption: every present non-empty field is a candidate and one is drawn per sample (seeded).
    # A dotted name reads a key inside a JSON member or column, e.g. "json.caption_llava".
    caption_fields: list[str] = field(default_factory=lambda: ["txt"])

    # Edit fields (OmniEdit layout).
    source_image_field: str = "src_img"
    edited_image_field: str = "edited_img"
    instruction_field: str = "edited_prompt_list"
    task_field: str = "task"

    # Shorter side resized to this, then center crop (the ImageNet / PS-VAE evaluation protocol).
    resolution: int = 256

    seed: int = 0
    shuffle: bool = True
    # Number of consecutive shuffled blocks (~256 samples each) whose samples are mixed together:
    # larger mixes better, smaller keeps reads closer together on disk.
    shuffle_window: int = 8
    batch_size: int = 32
    num_workers: int = 0
    drop_last: bool = True

    # Limits beyond which an image is treated as corrupt rather than decoded ("absurd size").
    max_image_pixels: int = 64_000_000
    min_image_side: int = 8
    max_aspect_ratio: float = 8.0
    # Tar shards are indexed from their headers once and the tables cached here, keyed by each shard's
    # path, size and modification time (a changed shard is re-indexed). Empty string: no cache.
    index_cache_dir: str = "~/.cache/unimm/shard-index"
    # Threads that index shards on a first (uncached) run. On a local disk the scan is CPU-bound and one
    # thread is fastest (scripts/bench_index.py); raise it only where each seek is slow (network storage).
    index_threads: int = 1

"""Map-style datasets over a ``ShardIndex``: text-to-image pairs and (source, instruction, edited) triples.

``__getitem__`` takes a sample id, or ``(epoch, sample_id)`` as the resumable loader passes it. The
epoch travels with the request (rather than living in dataset state) so DataLoader workers, which hold
copies of the dataset, always draw the same random caption for the same (seed, epoch, sample).

A corrupt sample never raises: it comes back as ``{"corrupt": reason, "key": key}`` so a worker process
survives any bad file and the loader can count the skip.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from data.config import DataConfig
from data.decode import (
    REASON_MISSING_IMAGE,
    REASON_MISSING_INSTRUCTION,
    CorruptSample,
    decode_image,
    lookup_field,
    pick_caption,
    text_candidates,
)
from data.index import ShardIndex
from data.transforms import resize_center_crop, to_tensor_minus1_1


def sample_rng(seed: int, epoch: int, sample_id: int) -> np.random.Generator:
    """The random source for one sample in one epoch, independent of worker and read order."""
    return np.random.Generator(
        np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch), int(sample_id)]))
    )


def split_request(request: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(request, (tuple, list)):
        epoch, sample_id = request
        return int(epoch), int(sample_id)
    return 0, int(request)


def image_field_data(record: dict[str, Any], config: DataConfig) -> Any:
    """The raw data of the first present image field; ``CorruptSample("missing image")`` if none."""
    field = next((name for name in config.image_fields if record.get(name) is not None), None)
    if field is None:
        raise CorruptSample(REASON_MISSING_IMAGE)
    return record[field]


def edit_record_fields(record: dict[str, Any], config: DataConfig) -> tuple[list[str], Any, Any, str]:
    """(every instruction candidate, source image data, edited image data, task) of an OmniEdit-layout record.

    Instructions are checked first (cheap): a record without one is skipped before any image is decoded."""
    instructions = text_candidates(lookup_field(record, config.instruction_field))
    if not instructions:
        raise CorruptSample(REASON_MISSING_INSTRUCTION)
    source = lookup_field(record, config.source_image_field)
    edited = lookup_field(record, config.edited_image_field)
    if source is None or edited is None:
        raise CorruptSample(REASON_MISSING_IMAGE)
    task = text_candidates(lookup_field(record, config.task_field))
    return instructions, source, edited, task[0] if task else ""


class IndexedDataset(Dataset):
    """Shared plumbing: the index, the request format and corruption handling."""

    def __init__(self, config: DataConfig, index: ShardIndex | None = None):
        self.config = config
        self.index = index if index is not None else ShardIndex.build(config)

    def __len__(self) -> int:
        return self.index.num_samples

    def __getitem__(self, request: int | tuple[int, int]) -> dict[str, Any]:
        epoch, sample_id = split_request(request)
        key = ""
        try:
            record = self.index.read_record(sample_id)
            key = record["__key__"]
            sample = self.build_sample(record, sample_rng(self.config.seed, epoch, sample_id))
        except CorruptSample as corrupt:
            return {"corrupt": corrupt.reason, "key": key or f"#{sample_id}"}
        sample["key"] = key
        return sample

    def build_sample(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        raise NotImplementedError

    def image_tensor(self, data: Any) -> torch.Tensor:
        if data is not None and not isinstance(data, (bytes, bytearray, memoryview)):
            raise CorruptSample(REASON_MISSING_IMAGE)
        image = decode_image(bytes(data) if data is not None else None, self.config)
        return to_tensor_minus1_1(resize_center_crop(image, self.config.resolution))


class TextToImageDataset(IndexedDataset):
    """``{"image": (3, R, R) float in [-1, 1], "caption": str, "key": str}`` per sample."""

    def build_sample(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        # Caption first: it is cheap, and a sample without one is skipped without decoding its image.
        caption = pick_caption(record, self.config.caption_fields, rng)
        return {"image": self.image_tensor(image_field_data(record, self.config)), "caption": caption}


class ImageDataset(IndexedDataset):
    """``{"image": (3, R, R) float in [-1, 1], "key": str}`` per sample: images only (tokenizer training,
    reconstruction metrics); captions are not required."""

    def build_sample(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        return {"image": self.image_tensor(image_field_data(record, self.config))}


class EditDataset(IndexedDataset):
    """``{"source_image", "edited_image", "instruction", "task", "key"}`` per sample (OmniEdit layout);
    the instruction is drawn at random (seeded) from the instruction field's list."""

    def build_sample(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        instructions, source, edited, task = edit_record_fields(record, self.config)
        return {
            "source_image": self.image_tensor(source),
            "edited_image": self.image_tensor(edited),
            "instruction": instructions[int(rng.integers(len(instructions)))],  # as pick_text draws
            "task": task,
        }


def build_dataset(config: DataConfig, index: ShardIndex | None = None) -> IndexedDataset:
    if config.kind == "edit":
        return EditDataset(config, index)
    if config.kind == "image":
        return ImageDataset(config, index)
    return TextToImageDataset(config, index)

"""Evaluation images from a folder of image files or from webdataset / parquet shards.

Every source yields batches ``{"image": (B, 3, R, R) float in [-1, 1], "key": [str], "meta": [dict]}``
in a fixed order (sorted files; shard order without shuffling), at resolution ``R`` with the ImageNet
protocol of ``data.transforms`` (shorter side resized, center crop). ``meta`` holds a sample's other
fields, for labels: for shards every non-image member/column (JSON members parsed, text decoded), for
folders ``{"path", "folder"}`` where ``folder`` is the sub-directory the file sits in ("" at the root).

Shards go through the project's loaders (``data.index.ShardIndex`` + ``data.loader.ResumableLoader``),
so corrupt samples are skipped and counted by reason exactly as in training; image files in a folder
are decoded with the same checks (``data.decode.decode_image``). ``report()`` gives the counts: a
result must say how many images it was computed on and how many were skipped.
"""

from __future__ import annotations

import glob
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from data.config import DataConfig
from data.datasets import IndexedDataset
from data.decode import REASON_MISSING_IMAGE, CorruptSample, decode_image, lookup_field, parse_json
from data.transforms import resize_center_crop, to_tensor_minus1_1
from unimm.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SHARD_FORMATS = {".tar": "webdataset", ".parquet": "parquet"}


def _text_or_value(value: Any) -> Any:
    """Bytes members as text when they are UTF-8 (binary blobs are dropped: ``None``)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value


class MetadataImageDataset(IndexedDataset):
    """``{"image", "meta", "key"}`` per shard sample: the image (first of ``image_fields`` present) and
    every other field, for labels (no caption needed, unlike ``TextToImageDataset``)."""

    def build_sample(self, record: dict[str, Any], rng) -> dict[str, Any]:
        field = next((name for name in self.config.image_fields if record.get(name) is not None), None)
        if field is None:
            raise CorruptSample(REASON_MISSING_IMAGE)
        meta: dict[str, Any] = {}
        for name, value in record.items():
            if name == field or name in self.config.image_fields or name == "__key__":
                continue
            value = _text_or_value(value)
            if value is None:
                continue
            if name == "json":
                parsed = parse_json(value)
                value = parsed if parsed is not None else value
            meta[name] = value
        return {"image": self.image_tensor(record[field]), "meta": meta}


class ImageFileDataset(Dataset):
    """Image files, decoded with the loaders' safety checks; a bad file comes back as ``{"corrupt"}``."""

    def __init__(self, files: list[Path], root: Path | None, config: DataConfig):
        self.files = files
        self.root = root
        self.config = config

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.files[index]
        relative = path.relative_to(self.root) if self.root is not None else Path(path.name)
        key = relative.with_suffix("").as_posix()
        try:
            image = decode_image(path.read_bytes(), self.config)
        except CorruptSample as corrupt:
            return {"corrupt": corrupt.reason, "key": key}
        except OSError:
            return {"corrupt": "unreadable file", "key": key}
        folder = relative.parent.as_posix()
        return {
            "image": to_tensor_minus1_1(resize_center_crop(image, self.config.resolution)),
            "key": key,
            "meta": {"path": str(path), "folder": "" if folder == "." else folder},
        }


def _classify(path: Path) -> str:
    """'folder' (image files), 'webdataset' or 'parquet' for one existing path."""
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in SHARD_FORMATS:
            return SHARD_FORMATS[suffix]
        if suffix in IMAGE_EXTENSIONS:
            return "folder"
        raise UserError(f"'{path}' is neither an image ({', '.join(IMAGE_EXTENSIONS)}) nor a shard (.tar, .parquet)")
    for suffix, kind in SHARD_FORMATS.items():
        if any(p.is_file() and not p.name.startswith(".") for p in path.rglob(f"*{suffix}")):
            return kind
    if any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.rglob("*") if p.is_file()):
        return "folder"
    raise UserError(f"directory '{path}' holds no images ({', '.join(IMAGE_EXTENSIONS)}) and no .tar or .parquet shards")


def resolve_paths(paths: Sequence[str | Path]) -> tuple[str, list[Path]]:
    """The kind of source and its paths (globs expanded); one kind per source."""
    if not paths:
        raise UserError("no data given; pass a folder of images or webdataset/parquet shards")
    expanded: list[Path] = []
    for item in paths:
        path = Path(item).expanduser()
        if path.exists():
            expanded.append(path)
        elif glob.has_magic(str(path)):
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
            if not matches:
                raise UserError(f"pattern '{item}' matches no file")
            expanded.extend(matches)
        else:
            raise UserError(f"data path '{item}' does not exist")
    kinds = {_classify(path) for path in expanded}
    if len(kinds) > 1:
        raise UserError(f"data paths mix {' and '.join(sorted(kinds))} inputs; pass one kind per source")
    return kinds.pop(), expanded


class ImageSource:
    """Batches of evaluation images in a fixed order (see the module docstring)."""

    def __init__(
        self,
        paths: Sequence[str | Path] | str | Path,
        resolution: int,
        batch_size: int = 32,
        max_images: int | None = None,
        num_workers: int = 0,
        image_fields: Sequence[str] | None = None,
    ):
        if isinstance(paths, (str, Path)):
            paths = [paths]
        if resolution < 8:
            raise UserError(f"resolution must be at least 8, got {resolution}")
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}")
        if max_images is not None and max_images < 1:
            raise UserError(f"max images must be at least 1, got {max_images}")
        self.kind, self.paths = resolve_paths(list(paths))
        self.resolution = int(resolution)
        self.batch_size = int(batch_size)
        self.max_images = max_images
        config = DataConfig(
            format="parquet" if self.kind == "parquet" else "webdataset",
            shards=[str(path) for path in self.paths],
            resolution=self.resolution,
            batch_size=self.batch_size,
            shuffle=False,
            drop_last=False,
            num_workers=num_workers,
        )
        if image_fields:
            config.image_fields = list(image_fields)
        self.config = config
        self.delivered = 0
        self.skipped: Counter[str] = Counter()
        self._loader = None
        if self.kind == "folder":
            self._files, self._root = self._list_files()
        else:
            from data.loader import ResumableLoader

            self._loader = ResumableLoader(MetadataImageDataset(config), config)

    def _list_files(self) -> tuple[list[Path], Path | None]:
        files: list[Path] = []
        for path in self.paths:
            if path.is_dir():
                files.extend(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            else:
                files.append(path)
        files = sorted(set(files))
        root = self.paths[0] if len(self.paths) == 1 and self.paths[0].is_dir() else None
        return files, root

    def __len__(self) -> int:
        """Samples available before skips and ``max_images``."""
        count = len(self._files) if self.kind == "folder" else len(self._loader.dataset)
        return min(count, self.max_images) if self.max_images is not None else count

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.delivered, self.skipped = 0, Counter()
        batches = self._folder_batches() if self.kind == "folder" else self._shard_batches()
        for batch in batches:
            if self.max_images is not None:
                room = self.max_images - self.delivered
                if room <= 0:
                    return
                if len(batch["key"]) > room:
                    batch = {name: value[:room] for name, value in batch.items()}
            self.delivered += len(batch["key"])
            yield batch

    def images(self) -> Iterator[torch.Tensor]:
        for batch in self:
            yield batch["image"]

    def _shard_batches(self) -> Iterator[dict[str, Any]]:
        loader = self._loader
        loader.epoch, loader.position = 0, 0
        loader.skipped = Counter()
        try:
            yield from loader
        finally:
            self.skipped.update(loader.skipped)

    def _folder_batches(self) -> Iterator[dict[str, Any]]:
        from data.loader import collate_samples

        samples = DataLoader(
            ImageFileDataset(self._files, self._root, self.config),
            batch_size=None,
            num_workers=self.config.num_workers,
        )
        good: list[dict[str, Any]] = []
        for sample in samples:
            if "corrupt" in sample:
                self.skipped[sample["corrupt"]] += 1
                continue
            good.append(sample)
            if len(good) == self.batch_size:
                yield collate_samples(good)
                good = []
        if good:
            yield collate_samples(good)

    def report(self) -> dict[str, Any]:
        """What was read: the source kind, images delivered, skips by reason."""
        return {
            "source": self.kind,
            "paths": [str(path) for path in self.paths],
            "resolution": self.resolution,
            "delivered": self.delivered,
            "skipped": dict(self.skipped),
            "skipped_total": sum(self.skipped.values()),
        }


def scene_from_metadata(meta: dict[str, Any]) -> dict | None:
    """The Shapes scene graph of a sample: ``json.scene`` (webdataset) or the ``scene`` column (parquet)."""
    for name in ("json.scene", "scene"):
        value = lookup_field(meta, name)
        scene = parse_json(value) if value is not None else None
        if isinstance(scene, dict) and "objects" in scene:
            return scene
    return None

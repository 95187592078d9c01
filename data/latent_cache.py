"""Latent caching: encode a dataset once with a frozen tokenizer, then train the generator on the latents.

``write_latent_cache`` reads the source shards in storage order (every good sample once, corrupt ones
skipped and counted by reason, exactly as the training loader would) and writes the tokenizer's raw
latents (``tokenizer.encode``, *not* normalised: the generator normalises with the tokenizer's latent
statistics itself). ``LatentCacheDataset`` reads them back with the same request format, per-sample
seeding and corruption convention as ``data.datasets``, so ``data.loader.ResumableLoader`` runs over it
unchanged (shuffled blocks, exact resume).

Layout of a cache directory (safetensors and JSON only, every file written atomically)::

    manifest.json              kind, latent shape, dtype, counts, shards, skip counts, tokenizer, source
    shard-00000.safetensors    t2i: ``latents`` (N, C, h, w); edit: ``source_latents``, ``edited_latents``
    shard-00000.json           ``keys``, ``source_ids`` and ``captions`` (t2i: every caption candidate of
                               each sample) or ``instructions`` + ``tasks`` (edit)

Cache shard ``i`` holds the good samples among source samples ``[i * shard_size, (i + 1) * shard_size)``
of the ordered source. The manifest is rewritten after each finished shard, so an interrupted run that
is started again with the same arguments encodes only the shards the manifest does not list yet.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.config import DataConfig
from data.datasets import IndexedDataset, edit_record_fields, image_field_data, sample_rng, split_request
from data.decode import (
    REASON_MISSING_CAPTION,
    REASON_MISSING_INSTRUCTION,
    CorruptSample,
    lookup_field,
    text_candidates,
)
from data.index import TAR_BLOCK_SIZE, ShardIndex, epoch_order
from unimm.atomic import atomic_write, atomic_write_text
from unimm.errors import UserError

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
CACHE_FORMAT = "unimm-latent-cache"
CACHE_VERSION = 1
CACHE_KINDS = ("text_to_image", "edit")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Samples per shuffle block when reading a cache (blocks never straddle two cache shards).
CACHE_BLOCK_SIZE = TAR_BLOCK_SIZE
# Per process: open safetensors files and parsed sidecars kept.
OPEN_SHARD_LIMIT = 32
SIDECAR_CACHE_SIZE = 8
TENSOR_NAMES = {"text_to_image": ("latents",), "edit": ("source_latents", "edited_latents")}


def shard_stem(number: int) -> str:
    return f"shard-{number:05d}"


def is_latent_cache(path: str | os.PathLike) -> bool:
    """A directory holding a latent cache manifest."""
    path = Path(path).expanduser()
    return path.is_dir() and (path / MANIFEST_NAME).is_file()


# ----------------------------------------------------------------------------------------------------
# Reading the source: every caption / instruction candidate, not one drawn
# ----------------------------------------------------------------------------------------------------
class _SourceDataset(IndexedDataset):
    """The source shards as the writer needs them: decoded images plus *all* text candidates.

    Decoding and corruption handling are ``IndexedDataset``'s (the same checks, the same reasons, in
    the same order as ``TextToImageDataset`` / ``EditDataset``: text first, then images)."""

    def __getitem__(self, request: int | tuple[int, int]) -> dict[str, Any]:
        sample = super().__getitem__(request)
        sample["source_id"] = split_request(request)[1]
        return sample

    def build_sample(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        config = self.config
        if config.kind == "edit":
            instructions, source, edited, task = edit_record_fields(record, config)
            return {
                "source_image": self.image_tensor(source),
                "edited_image": self.image_tensor(edited),
                "instructions": instructions,
                "task": task,
            }
        captions = [text for name in config.caption_fields for text in text_candidates(lookup_field(record, name))]
        if not captions:
            raise CorruptSample(REASON_MISSING_CAPTION)
        return {"image": self.image_tensor(image_field_data(record, config)), "captions": captions}


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------
def _settings(data_config: DataConfig, index: ShardIndex, shard_size: int, dtype: str, tokenizer_path: str | None) -> dict[str, Any]:
    """What must match for a rerun to continue an existing cache."""
    fields: dict[str, Any]
    if data_config.kind == "edit":
        fields = {
            "source_image_field": data_config.source_image_field,
            "edited_image_field": data_config.edited_image_field,
            "instruction_field": data_config.instruction_field,
            "task_field": data_config.task_field,
        }
    else:
        fields = {"image_fields": list(data_config.image_fields), "caption_fields": list(data_config.caption_fields)}
    return {
        "kind": data_config.kind,
        "dtype": dtype,
        "shard_size": shard_size,
        "resolution": data_config.resolution,
        "tokenizer": tokenizer_path,
        "fields": fields,
        "source": {
            "format": data_config.format,
            "shards": [str(Path(table.path).resolve()) for table in index.shards],
            "num_samples": index.num_samples,
        },
    }


def _describe_tokenizer(tokenizer: Any, tokenizer_path: str | os.PathLike | None) -> str | None:
    path = tokenizer_path if tokenizer_path is not None else getattr(tokenizer, "name_or_path", None)
    if path is None:
        return None
    local = Path(path).expanduser()
    return str(local.resolve()) if local.exists() else str(path)


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise UserError(
            f"'{directory}' is not a latent cache (no {MANIFEST_NAME}); write one with "
            "`unimm cache-latents --tokenizer DIR --data SHARDS -o OUT`"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UserError(
            f"latent cache manifest '{path}' is unreadable ({error.__class__.__name__}); delete '{directory}' "
            "and write the cache again with `unimm cache-latents`"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        raise UserError(
            f"'{path}' is not a unimm latent cache manifest; delete '{directory}' and write the cache again "
            "with `unimm cache-latents`"
        )
    if manifest.get("version") != CACHE_VERSION:
        raise UserError(
            f"latent cache '{directory}' has format version {manifest.get('version')}, this unimm reads "
            f"version {CACHE_VERSION}; write the cache again with `unimm cache-latents`"
        )
    return manifest


def _resumable_shards(out_dir: Path, settings: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Finished shards of an earlier run with the same settings: {shard number: manifest entry}."""
    if not (out_dir / MANIFEST_NAME).is_file():
        return {}
    manifest = _read_manifest(out_dir)
    previous = manifest.get("settings", {})
    for key, value in settings.items():
        if previous.get(key) != value:
            raise UserError(
                f"'{out_dir}' holds a latent cache written with a different {key} "
                f"({previous.get(key)!r}, now {value!r}); pass another output directory or delete it"
            )
    finished = {}
    for entry in manifest.get("shards", []):
        stem = entry["name"]
        if (out_dir / f"{stem}.safetensors").is_file() and (out_dir / f"{stem}.json").is_file():
            finished[int(entry["number"])] = entry
    return finished


def _build_manifest(
    settings: dict[str, Any], latent_shape: list[int] | None, shards: dict[int, dict[str, Any]], total_shards: int
) -> dict[str, Any]:
    entries = [shards[number] for number in sorted(shards)]
    skipped: Counter[str] = Counter()
    for entry in entries:
        skipped.update(entry["skipped"])
    return {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "complete": len(entries) == total_shards,
        "kind": settings["kind"],
        "latent_shape": latent_shape,
        "dtype": settings["dtype"],
        "num_samples": sum(entry["count"] for entry in entries),
        "num_shards": total_shards,
        "shard_size": settings["shard_size"],
        "resolution": settings["resolution"],
        "tokenizer": settings["tokenizer"],
        "source": settings["source"],
        "skipped": dict(sorted(skipped.items())),
        "skipped_total": sum(skipped.values()),
        "shards": entries,
        "settings": settings,
    }


class _Requests:
    """Sample ids as a sampler, produced lazily (a list of ints costs ~36 bytes per sample)."""

    def __init__(self, sample_ids: np.ndarray):
        self.sample_ids = sample_ids

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __iter__(self) -> Iterator[int]:
        return (int(sample_id) for sample_id in self.sample_ids)


class _ShardBuffer:
    """The samples of one cache shard being encoded."""

    def __init__(self, number: int, start: int, stop: int):
        self.number, self.start, self.stop = number, start, stop
        self.latents: dict[str, list[torch.Tensor]] = {}
        self.pending: list[dict[str, Any]] = []  # decoded, not yet encoded
        self.meta: dict[str, list[Any]] = {"keys": [], "source_ids": []}
        self.skipped: Counter[str] = Counter()


def _encode_pending(tokenizer: Any, buffer: _ShardBuffer, kind: str, device: torch.device, dtype: torch.dtype) -> None:
    samples, buffer.pending = buffer.pending, []
    if not samples:
        return
    if kind == "edit":
        images = torch.stack([s["source_image"] for s in samples] + [s["edited_image"] for s in samples])
        latents = tokenizer.encode(images.to(device)).float().cpu().to(dtype)
        parts = {"source_latents": latents[: len(samples)], "edited_latents": latents[len(samples) :]}
    else:
        images = torch.stack([s["image"] for s in samples])
        parts = {"latents": tokenizer.encode(images.to(device)).float().cpu().to(dtype)}
    for name, tensor in parts.items():
        buffer.latents.setdefault(name, []).append(tensor)


def _write_shard(
    out_dir: Path, buffer: _ShardBuffer, kind: str, latent_shape: list[int], dtype: torch.dtype
) -> dict[str, Any]:
    stem = shard_stem(buffer.number)
    count = len(buffer.meta["keys"])
    tensors = {}
    for name in TENSOR_NAMES[kind]:
        pieces = buffer.latents.get(name)
        tensors[name] = torch.cat(pieces).contiguous() if pieces else torch.zeros((0, *latent_shape), dtype=dtype)
        assert tensors[name].shape[0] == count
    from safetensors.torch import save_file

    metadata = {"format": CACHE_FORMAT, "kind": kind, "count": str(count)}
    atomic_write(out_dir / f"{stem}.safetensors", lambda path: save_file(tensors, str(path), metadata=metadata))
    atomic_write_text(out_dir / f"{stem}.json", json.dumps(buffer.meta, ensure_ascii=False) + "\n")
    return {
        "number": buffer.number,
        "name": stem,
        "source_start": buffer.start,
        "source_stop": buffer.stop,
        "count": count,
        "skipped": dict(sorted(buffer.skipped.items())),
    }


def write_latent_cache(
    tokenizer: Any,
    data_config: DataConfig,
    out_dir: str | os.PathLike,
    shard_size: int = 4096,
    batch_size: int = 64,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    progress: bool = True,
    tokenizer_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Encode every good sample of ``data_config``'s shards with ``tokenizer.encode`` into ``out_dir``.

    Reads in storage order (no shuffle, no drop_last; ``data_config.num_workers`` decode in parallel),
    ``batch_size`` images per ``encode`` call on ``device`` (the tokenizer is moved there and put in
    eval mode). Latents are stored raw, cast to ``dtype``. Returns the manifest (also written to
    ``out_dir/manifest.json``). Started again on the same ``out_dir`` with the same settings, it skips
    the shards already finished; with different settings it raises ``UserError``.
    """
    kind = data_config.kind
    if kind not in CACHE_KINDS:
        raise UserError(f"latent caching supports data.kind text_to_image or edit, not '{kind}'")
    if dtype not in DTYPES:
        raise UserError(f"cache dtype must be one of {', '.join(DTYPES)}, not '{dtype}'")
    if shard_size < 1 or batch_size < 1:
        raise UserError(f"shard size and batch size must be at least 1 (got {shard_size} and {batch_size})")
    out_dir = Path(out_dir).expanduser()
    torch_dtype = DTYPES[dtype]
    device = torch.device(device)

    config = dataclasses.replace(data_config, shuffle=False, drop_last=False)
    index = ShardIndex.build(config)
    dataset = _SourceDataset(config, index)
    settings = _settings(config, index, shard_size, dtype, _describe_tokenizer(tokenizer, tokenizer_path))
    total = index.num_samples
    total_shards = -(-total // shard_size)
    finished = _resumable_shards(out_dir, settings)
    finished = {number: entry for number, entry in finished.items() if number < total_shards}
    declared_shape = getattr(tokenizer, "latent_shape", None)
    latent_shape = list(declared_shape) if declared_shape is not None else None
    out_dir.mkdir(parents=True, exist_ok=True)

    def save_manifest() -> dict[str, Any]:
        manifest = _build_manifest(settings, latent_shape, finished, total_shards)
        atomic_write_text(out_dir / MANIFEST_NAME, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
        return manifest

    pending_shards = [number for number in range(total_shards) if number not in finished]
    if progress and finished:
        print(f"cache: {len(finished)} of {total_shards} shards already written, continuing", file=sys.stderr, flush=True)
    save_manifest()
    if not pending_shards:
        return save_manifest()

    sample_ids = np.concatenate(
        [np.arange(n * shard_size, min((n + 1) * shard_size, total), dtype=np.int64) for n in pending_shards]
    )
    samples = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        sampler=_Requests(sample_ids),
        num_workers=config.num_workers,
        generator=torch.Generator().manual_seed(config.seed),
    )
    was_training = tokenizer.training
    tokenizer.to(device).eval()
    buffer: _ShardBuffer | None = None

    def finish(buffer: _ShardBuffer) -> None:
        nonlocal latent_shape
        _encode_pending(tokenizer, buffer, kind, device, torch_dtype)
        first = next(iter(buffer.latents.values()), None)
        if first is not None:
            encoded = list(first[0].shape[1:])
            if latent_shape is not None and encoded != latent_shape:
                raise UserError(f"the tokenizer encoded latents of shape {encoded}, its latent_shape says {latent_shape}")
            latent_shape = encoded
        if latent_shape is None:
            raise UserError("every sample of the first cache shard is corrupt and the tokenizer has no latent_shape")
        finished[buffer.number] = _write_shard(out_dir, buffer, kind, latent_shape, torch_dtype)
        save_manifest()
        if progress:
            entry = finished[buffer.number]
            skipped = sum(entry["skipped"].values())
            print(
                f"cache: shard {buffer.number + 1}/{total_shards}: {entry['count']} samples, {skipped} skipped",
                file=sys.stderr,
                flush=True,
            )

    try:
        with torch.inference_mode():
            for sample in samples:
                source_id = int(sample["source_id"])
                number = source_id // shard_size
                if buffer is None or buffer.number != number:
                    if buffer is not None:
                        finish(buffer)
                    buffer = _ShardBuffer(number, number * shard_size, min((number + 1) * shard_size, total))
                if "corrupt" in sample:
                    buffer.skipped[sample["corrupt"]] += 1
                    logger.warning("skipped sample %s: %s", sample["key"], sample["corrupt"])
                    continue
                buffer.meta["keys"].append(sample["key"])
                buffer.meta["source_ids"].append(source_id)
                if kind == "edit":
                    buffer.meta.setdefault("instructions", []).append(list(sample["instructions"]))
                    buffer.meta.setdefault("tasks", []).append(sample["task"])
                else:
                    buffer.meta.setdefault("captions", []).append(list(sample["captions"]))
                buffer.pending.append(sample)
                if len(buffer.pending) == batch_size:
                    _encode_pending(tokenizer, buffer, kind, device, torch_dtype)
            if buffer is not None:
                finish(buffer)
    finally:
        tokenizer.train(was_training)
    # Every pending shard has at least one source sample (good or skipped), so each produced a buffer.
    return save_manifest()


# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------
class LatentCacheIndex:
    """Sample ids of a latent cache (shard by shard, in shard order) and their per-epoch order."""

    def __init__(self, counts: Sequence[int]):
        self.counts = [int(count) for count in counts]
        self.shard_starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)

    @property
    def num_samples(self) -> int:
        return int(self.shard_starts[-1])

    def __len__(self) -> int:
        return self.num_samples

    def block_sizes(self) -> list[int]:
        sizes = []
        for count in self.counts:
            full, rest = divmod(count, CACHE_BLOCK_SIZE)
            sizes += [CACHE_BLOCK_SIZE] * full + ([rest] if rest else [])
        return sizes

    def epoch_order(self, seed: int, epoch: int, shuffle: bool = True, shuffle_window: int = 8) -> np.ndarray:
        return epoch_order(self.block_sizes(), seed, epoch, shuffle, shuffle_window)

    def locate(self, sample_id: int) -> tuple[int, int]:
        """(shard position in the manifest, row inside that shard)."""
        if not 0 <= sample_id < self.num_samples:
            raise IndexError(f"sample id {sample_id} is outside [0, {self.num_samples})")
        shard = int(np.searchsorted(self.shard_starts, sample_id, side="right")) - 1
        return shard, int(sample_id - self.shard_starts[shard])


class LatentCacheDataset(torch.utils.data.Dataset):
    """A written latent cache as a map-style dataset, interchangeable with ``data.datasets``' ones.

    ``__getitem__`` takes a sample id or ``(epoch, sample_id)``. Text-to-image samples are
    ``{"latent": (C, h, w) float32, "caption": str, "key": str}`` with the caption drawn among the
    stored candidates by ``sample_rng(seed, epoch, sample_id)``; edit samples are
    ``{"source_latent", "edited_latent", "instruction", "task", "key"}``. ``seed`` plays the part of
    ``data.seed`` in ``data.datasets``. Shards are opened lazily, per process.
    """

    def __init__(self, directory: str | os.PathLike, seed: int = 0):
        self.directory = Path(directory).expanduser()
        self.manifest = _read_manifest(self.directory)
        manifest = self.manifest
        if not manifest.get("complete"):
            done = len(manifest.get("shards", []))
            raise UserError(
                f"latent cache '{self.directory}' is incomplete ({done} of {manifest.get('num_shards')} shards); "
                "run the same `unimm cache-latents` command again to finish it"
            )
        self.kind = manifest["kind"]
        if self.kind not in CACHE_KINDS:
            raise UserError(f"latent cache '{self.directory}' has unknown kind '{self.kind}'; write it again")
        self.seed = int(seed)
        self.latent_shape = tuple(manifest["latent_shape"] or ())
        # The caption fields a text-to-image cache was written with (training draws among their texts); None for
        # edit caches and for caches written before the settings were recorded.
        caption_fields = manifest.get("settings", {}).get("fields", {}).get("caption_fields")
        self.caption_fields: list[str] | None = list(caption_fields) if caption_fields is not None else None
        self.shard_names = [entry["name"] for entry in manifest["shards"]]
        for name in self.shard_names:
            for suffix in (".safetensors", ".json"):
                if not (self.directory / f"{name}{suffix}").is_file():
                    raise UserError(
                        f"latent cache '{self.directory}' lacks {name}{suffix}; run the same "
                        "`unimm cache-latents` command again to rewrite it"
                    )
        self.index = LatentCacheIndex([entry["count"] for entry in manifest["shards"]])
        self._reset_process_state()

    # -- per-process resources -----------------------------------------------------------------------
    def _reset_process_state(self) -> None:
        self._process_id: int | None = os.getpid()
        self._handles: OrderedDict[int, Any] = OrderedDict()
        self._sidecars: OrderedDict[int, dict[str, Any]] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"], state["_sidecars"], state["_process_id"] = OrderedDict(), OrderedDict(), None
        return state

    def _check_process(self) -> None:
        # DataLoader workers inherit this object; open files must not be shared across processes.
        if self._process_id != os.getpid():
            self._reset_process_state()

    def _handle(self, shard: int):
        handle = self._handles.get(shard)
        if handle is None:
            from safetensors import safe_open

            handle = safe_open(str(self.directory / f"{self.shard_names[shard]}.safetensors"), framework="pt")
            self._handles[shard] = handle
            if len(self._handles) > OPEN_SHARD_LIMIT:
                self._handles.popitem(last=False)
        else:
            self._handles.move_to_end(shard)
        return handle

    def _sidecar(self, shard: int) -> dict[str, Any]:
        sidecar = self._sidecars.get(shard)
        if sidecar is None:
            sidecar = json.loads((self.directory / f"{self.shard_names[shard]}.json").read_text())
            self._sidecars[shard] = sidecar
            if len(self._sidecars) > SIDECAR_CACHE_SIZE:
                self._sidecars.popitem(last=False)
        else:
            self._sidecars.move_to_end(shard)
        return sidecar

    def _row(self, shard: int, name: str, row: int) -> torch.Tensor:
        return self._handle(shard).get_slice(name)[row : row + 1][0].to(torch.float32).contiguous()

    # -- samples -------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.index.num_samples

    def __getitem__(self, request: int | tuple[int, int]) -> dict[str, Any]:
        epoch, sample_id = split_request(request)
        self._check_process()
        shard, row = self.index.locate(sample_id)
        sidecar = self._sidecar(shard)
        key = sidecar["keys"][row]
        rng = sample_rng(self.seed, epoch, sample_id)
        if self.kind == "edit":
            instructions = sidecar["instructions"][row]
            if not instructions:
                return {"corrupt": REASON_MISSING_INSTRUCTION, "key": key}
            return {
                "source_latent": self._row(shard, "source_latents", row),
                "edited_latent": self._row(shard, "edited_latents", row),
                "instruction": instructions[int(rng.integers(len(instructions)))],
                "task": sidecar["tasks"][row],
                "key": key,
            }
        captions = sidecar["captions"][row]
        if not captions:
            return {"corrupt": REASON_MISSING_CAPTION, "key": key}
        return {
            "latent": self._row(shard, "latents", row),
            "caption": captions[int(rng.integers(len(captions)))],
            "key": key,
        }

    def candidates(self, sample_id: int) -> list[str]:
        """Every stored caption (t2i) or instruction (edit) of one sample."""
        shard, row = self.index.locate(sample_id)
        self._check_process()
        return list(self._sidecar(shard)["instructions" if self.kind == "edit" else "captions"][row])

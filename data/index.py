"""An index of every sample in a list of shards, for map-style random access and exact resume.

Building the index reads only tar headers and parquet footers, never image bytes, so it is cheap even
for millions of samples. Each sample gets a global integer id (shard by shard, in sorted shard order);
``read_record`` fetches one sample's raw fields by id.

Sample order per epoch comes from ``epoch_order``: a deterministic function of (seed, epoch) that
shuffles *blocks* of consecutive samples and then samples within a small window of blocks, so reads stay
close together on disk while batches still mix many shards. Distributed ranks take interleaved
positions of that order (``rank_positions``).
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data.config import DataConfig
from data.decode import REASON_TRUNCATED_SHARD, CorruptSample
from unimm.atomic import atomic_write
from unimm.errors import UserError

logger = logging.getLogger(__name__)

SHARD_EXTENSIONS = {"webdataset": ".tar", "parquet": ".parquet"}
# Samples per shuffle block for tar shards (parquet blocks are row groups).
TAR_BLOCK_SIZE = 256
# Parquet columns tried, in order, for a sample's key; otherwise "<shard name>:<row>".
PARQUET_KEY_COLUMNS = ("__key__", "key", "omni_edit_id", "id")
# Decoded parquet row groups kept per process: a block is read in order, so a few suffice.
ROW_GROUP_CACHE_SIZE = 4
# Open tar files kept per process.
OPEN_FILE_LIMIT = 32

# Webdataset's rule: the key is everything up to the first '.' after the last '/'.
_MEMBER_NAME = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def split_member_name(name: str) -> tuple[str, str] | None:
    match = _MEMBER_NAME.match(name)
    return (match.group(1), match.group(2)) if match else None


# ----------------------------------------------------------------------------------------------------
# Shard lists
# ----------------------------------------------------------------------------------------------------
def expand_shards(patterns: Sequence[str], format: str) -> list[Path]:
    """Files, directories (their matching files, recursively) and glob patterns -> sorted unique paths."""
    extension = SHARD_EXTENSIONS[format]
    if not patterns:
        raise UserError(
            f"no shards given; set data.shards to {extension} files, directories or glob patterns"
        )
    found: set[Path] = set()
    for pattern in patterns:
        path = Path(pattern).expanduser()
        if path.is_dir():
            matches = [p for p in path.rglob(f"*{extension}") if p.is_file() and not p.name.startswith(".")]
            if not matches:
                raise UserError(f"directory '{path}' holds no {extension} files (data.format is '{format}')")
        elif path.is_file():
            matches = [path]
        elif glob.has_magic(str(path)):
            matches = [Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file()]
            if not matches:
                raise UserError(f"shard pattern '{pattern}' matches no file")
        else:
            raise UserError(f"shard file '{pattern}' does not exist")
        found.update(matches)
    return sorted(found)


# ----------------------------------------------------------------------------------------------------
# Per-shard tables
# ----------------------------------------------------------------------------------------------------
@dataclass
class TarShardTable:
    """Where each sample's members lie in one tar: ``offsets[i, j]``/``sizes[i, j]`` for field
    ``fields[j]`` of sample ``i`` (-1 where the sample lacks that field)."""

    path: Path
    keys: list[str]
    fields: list[str]
    offsets: np.ndarray
    sizes: np.ndarray
    truncated: bool = False

    @property
    def num_samples(self) -> int:
        return len(self.keys)

    def block_sizes(self) -> list[int]:
        full, rest = divmod(self.num_samples, TAR_BLOCK_SIZE)
        return [TAR_BLOCK_SIZE] * full + ([rest] if rest else [])


@dataclass
class ParquetShardTable:
    path: Path
    row_group_rows: list[int]
    key_column: str | None
    row_group_starts: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.row_group_starts = np.concatenate([[0], np.cumsum(self.row_group_rows)]).astype(np.int64)

    @property
    def num_samples(self) -> int:
        return int(self.row_group_starts[-1])

    def block_sizes(self) -> list[int]:
        return [rows for rows in self.row_group_rows if rows > 0]


TAR_BLOCK = 512
_REGULAR_FILE_TYPES = (b"0", b"\0", b"7")


def _octal_field(field_bytes: bytes) -> int:
    """A numeric tar header field: octal text, or GNU base-256 when the high bit is set (huge files)."""
    if field_bytes[0] & 0x80:
        return int.from_bytes(bytes([field_bytes[0] & 0x7F]) + field_bytes[1:], "big")
    text = field_bytes.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax_path(records: bytes) -> bytes | None:
    """The ``path`` of a pax extended header (records are ``"<length> <key>=<value>\\n"``)."""
    position = 0
    while position < len(records):
        space = records.find(b" ", position)
        if space < 0:
            break
        length = int(records[position:space])
        key, _, value = records[space + 1 : position + length - 1].partition(b"=")
        if key == b"path":
            return value
        position += length
    return None


def iterate_tar_members(path: Path):
    """Yield ``(name, data_offset, size)`` for each regular file of an uncompressed tar, reading only
    the 512-byte headers and seeking over the data (ustar, GNU long names and pax paths). Returns
    ``truncated`` (True when the archive breaks off or a header is damaged) through StopIteration."""
    with open(path, "rb") as handle:
        file_size = os.fstat(handle.fileno()).st_size
        offset = 0
        long_name: bytes | None = None
        while True:
            handle.seek(offset)
            header = handle.read(TAR_BLOCK)
            if len(header) < TAR_BLOCK:
                return len(header) > 0 or offset < file_size
            if header.count(0) == TAR_BLOCK:
                return False  # end-of-archive marker
            stored_checksum = _octal_field(header[148:156])
            if stored_checksum != sum(header[:148]) + 8 * 32 + sum(header[156:]):
                if offset == 0:
                    raise ValueError("not a tar archive: the first header's checksum does not match")
                return True  # damaged header: index what came before, as for a truncated shard
            size = _octal_field(header[124:136])
            typeflag = header[156:157]
            data_offset = offset + TAR_BLOCK
            offset = data_offset + -(-size // TAR_BLOCK) * TAR_BLOCK
            if typeflag in (b"L", b"x"):  # the next member's real name
                handle.seek(data_offset)
                payload = handle.read(size)
                long_name = payload.split(b"\0", 1)[0] if typeflag == b"L" else _pax_path(payload)
                continue
            if typeflag not in _REGULAR_FILE_TYPES:
                long_name = None
                continue
            name = header[:100].split(b"\0", 1)[0]
            if header[257:262] == b"ustar":
                prefix = header[345:500].split(b"\0", 1)[0]
                if prefix:
                    name = prefix + b"/" + name
            if long_name is not None:
                name, long_name = long_name, None
            yield name.decode("utf-8", errors="surrogateescape"), data_offset, size


def scan_tar_shard(path: Path) -> TarShardTable:
    """List the samples of one tar from its headers; a truncated tail is indexed as far as it goes."""
    keys: list[str] = []
    rows: list[dict[str, tuple[int, int]]] = []
    truncated = False
    try:
        file_size = path.stat().st_size
        members = iterate_tar_members(path)
        while True:
            try:
                name, data_offset, size = next(members)
            except StopIteration as end:
                truncated = truncated or bool(end.value)
                break
            parts = split_member_name(name)
            if parts is None:
                continue
            key, extension = parts
            if not keys or keys[-1] != key:
                keys.append(key)
                rows.append({})
            rows[-1][extension] = (data_offset, size)
            if data_offset + size > file_size:
                truncated = True
    except (OSError, ValueError) as error:
        raise UserError(f"shard '{path}' cannot be read as a tar file ({error}); check or re-download it") from None
    if truncated:
        logger.warning("shard %s is truncated: indexed %d samples up to the break", path, len(keys))
    fields = sorted({name for row in rows for name in row})
    column = {name: j for j, name in enumerate(fields)}
    offsets = np.full((len(keys), len(fields)), -1, dtype=np.int64)
    sizes = np.full((len(keys), len(fields)), -1, dtype=np.int64)
    for i, row in enumerate(rows):
        for name, (offset, size) in row.items():
            offsets[i, column[name]] = offset
            sizes[i, column[name]] = size
    return TarShardTable(path, keys, fields, offsets, sizes, truncated)


def _tar_cache_path(path: Path, cache_dir: Path) -> Path:
    status = path.stat()
    identity = f"{path.resolve()}|{status.st_size}|{status.st_mtime_ns}"
    return cache_dir / f"{hashlib.sha256(identity.encode()).hexdigest()[:32]}.npz"


def cached_scan_tar_shard(path: Path, cache_dir: Path | None) -> TarShardTable:
    """``scan_tar_shard`` through an on-disk cache of plain arrays (read with ``allow_pickle=False``).

    A cache entry is keyed by the shard's resolved path, size and mtime, so a rewritten shard is
    re-indexed; an unreadable or unwritable cache only costs the scan, never the run."""
    if cache_dir is None or not path.is_file():
        return scan_tar_shard(path)
    cache_path = _tar_cache_path(path, cache_dir)
    try:
        with np.load(cache_path, allow_pickle=False) as cached:
            return TarShardTable(
                path, cached["keys"].tolist(), cached["fields"].tolist(), cached["offsets"], cached["sizes"],
                bool(cached["truncated"]),
            )
    except (OSError, KeyError, ValueError):
        pass
    table = scan_tar_shard(path)
    try:
        arrays = {
            "keys": np.asarray(table.keys, dtype=str), "fields": np.asarray(table.fields, dtype=str),
            "offsets": table.offsets, "sizes": table.sizes, "truncated": np.asarray(table.truncated),
        }

        def write(temporary: Path) -> None:
            with open(temporary, "wb") as handle:  # a file handle: np.savez would append ".npz" to a path
                np.savez(handle, **arrays)

        atomic_write(cache_path, write)
    except OSError as error:
        logger.warning("could not cache the index of %s in %s: %s", path, cache_dir, error)
    return table


def scan_parquet_shard(path: Path) -> ParquetShardTable:
    import pyarrow.parquet as pq

    try:
        metadata = pq.ParquetFile(path).metadata
    except Exception as error:
        raise UserError(
            f"shard '{path}' cannot be read as parquet ({error}); check or re-download it"
        ) from None
    rows = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
    names = set(metadata.schema.to_arrow_schema().names)
    key_column = next((name for name in PARQUET_KEY_COLUMNS if name in names), None)
    return ParquetShardTable(path, rows, key_column)


# ----------------------------------------------------------------------------------------------------
# Ordering
# ----------------------------------------------------------------------------------------------------
def epoch_order(
    block_sizes: Sequence[int], seed: int, epoch: int, shuffle: bool = True, shuffle_window: int = 8
) -> np.ndarray:
    """The sample ids of one epoch, in the order they are read.

    ``block_sizes`` cut ids ``0 .. sum(block_sizes)-1`` into consecutive blocks. With ``shuffle`` the
    blocks are permuted, then samples are permuted within each window of ``shuffle_window``
    consecutive (permuted) blocks. The result depends only on the arguments: PCG64 seeded from
    (seed, epoch), never on global random state.
    """
    sizes = np.asarray(block_sizes, dtype=np.int64)
    total = int(sizes.sum())
    if not shuffle:
        return np.arange(total, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch)])))
    block_order = rng.permutation(len(sizes))
    window = max(1, int(shuffle_window))
    pieces = []
    for first in range(0, len(block_order), window):
        blocks = block_order[first : first + window]
        ids = np.concatenate([np.arange(starts[b], starts[b] + sizes[b]) for b in blocks])
        pieces.append(rng.permutation(ids))
    return np.concatenate(pieces).astype(np.int64) if pieces else np.zeros(0, dtype=np.int64)


def rank_positions(order: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """The part of an epoch order one rank reads: positions ``rank, rank + world_size, ...``.

    Ranks are disjoint and together cover the epoch. A saved position only means something for the
    same world size, so resuming requires the world size the state was saved with.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    return order[rank::world_size]


# ----------------------------------------------------------------------------------------------------
# The index
# ----------------------------------------------------------------------------------------------------
class ShardIndex:
    """Every sample of a shard list, addressable by a global integer id."""

    def __init__(self, format: str, shards: list[TarShardTable] | list[ParquetShardTable]):
        self.format = format
        self.shards = shards
        counts = [table.num_samples for table in shards]
        self.shard_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._process_id: int | None = None
        self._open_files: OrderedDict[int, Any] = OrderedDict()
        self._row_groups: OrderedDict[tuple[int, int], list[dict[str, Any]]] = OrderedDict()

    @classmethod
    def build(cls, config: DataConfig) -> ShardIndex:
        paths = expand_shards(config.shards, config.format)
        if config.format == "webdataset":
            cache_dir = Path(os.path.expanduser(config.index_cache_dir)) if config.index_cache_dir else None
            scan = lambda path: cached_scan_tar_shard(path, cache_dir)  # noqa: E731
        else:
            scan = scan_parquet_shard
        if len(paths) > 1 and config.index_threads > 1:
            with ThreadPoolExecutor(max_workers=min(config.index_threads, len(paths))) as pool:
                tables = list(pool.map(scan, paths))  # map keeps the sorted shard order
        else:
            tables = [scan(path) for path in paths]
        return cls(config.format, tables)

    @property
    def num_samples(self) -> int:
        return int(self.shard_starts[-1])

    def __len__(self) -> int:
        return self.num_samples

    @property
    def truncated_shards(self) -> list[Path]:
        return [table.path for table in self.shards if getattr(table, "truncated", False)]

    def block_sizes(self) -> list[int]:
        return [size for table in self.shards for size in table.block_sizes()]

    def epoch_order(self, seed: int, epoch: int, shuffle: bool = True, shuffle_window: int = 8) -> np.ndarray:
        return epoch_order(self.block_sizes(), seed, epoch, shuffle, shuffle_window)

    def locate(self, sample_id: int) -> tuple[int, int]:
        """(shard number, sample number inside that shard)."""
        if not 0 <= sample_id < self.num_samples:
            raise IndexError(f"sample id {sample_id} is outside [0, {self.num_samples})")
        shard = int(np.searchsorted(self.shard_starts, sample_id, side="right")) - 1
        return shard, int(sample_id - self.shard_starts[shard])

    def read_record(self, sample_id: int) -> dict[str, Any]:
        """One sample's raw fields (``__key__`` included): tar members as bytes, parquet cells as values
        (image structs reduced to their bytes). Raises ``CorruptSample`` for a truncated tar member."""
        self._check_process()
        shard, local = self.locate(sample_id)
        table = self.shards[shard]
        if isinstance(table, TarShardTable):
            return self._read_tar(shard, table, local)
        return self._read_parquet(shard, table, local)

    # -- per-process resources ---------------------------------------------------------------------
    def _check_process(self) -> None:
        # DataLoader workers inherit this object; file handles and caches must not be shared.
        if self._process_id != os.getpid():
            self._process_id = os.getpid()
            self._open_files = OrderedDict()
            self._row_groups = OrderedDict()

    def close(self) -> None:
        for handle in self._open_files.values():
            handle.close()
        self._open_files.clear()
        self._row_groups.clear()

    def _tar_file(self, shard: int, path: Path):
        handle = self._open_files.get(shard)
        if handle is None:
            handle = open(path, "rb")
            self._open_files[shard] = handle
            if len(self._open_files) > OPEN_FILE_LIMIT:
                self._open_files.popitem(last=False)[1].close()
        else:
            self._open_files.move_to_end(shard)
        return handle

    def _read_tar(self, shard: int, table: TarShardTable, local: int) -> dict[str, Any]:
        handle = self._tar_file(shard, table.path)
        record: dict[str, Any] = {"__key__": table.keys[local]}
        for j, name in enumerate(table.fields):
            size = int(table.sizes[local, j])
            if size < 0:
                continue
            handle.seek(int(table.offsets[local, j]))
            data = handle.read(size)
            if len(data) < size:
                raise CorruptSample(REASON_TRUNCATED_SHARD)
            record[name] = data
        return record

    def _read_parquet(self, shard: int, table: ParquetShardTable, local: int) -> dict[str, Any]:
        group = int(np.searchsorted(table.row_group_starts, local, side="right")) - 1
        rows = self._row_group(shard, table, group)
        row = rows[local - int(table.row_group_starts[group])]
        record = {name: _plain_cell(value) for name, value in row.items()}
        key = record.get(table.key_column) if table.key_column else None
        record["__key__"] = str(key) if key is not None else f"{table.path.stem}:{local}"
        return record

    def _row_group(self, shard: int, table: ParquetShardTable, group: int) -> list[dict[str, Any]]:
        cache_key = (shard, group)
        rows = self._row_groups.get(cache_key)
        if rows is not None:
            self._row_groups.move_to_end(cache_key)
            return rows
        import pyarrow.parquet as pq

        try:
            rows = pq.ParquetFile(table.path).read_row_group(group).to_pylist()
        except Exception:
            raise CorruptSample(REASON_TRUNCATED_SHARD) from None
        self._row_groups[cache_key] = rows
        if len(self._row_groups) > ROW_GROUP_CACHE_SIZE:
            self._row_groups.popitem(last=False)
        return rows


def _plain_cell(value: Any) -> Any:
    """A Hugging Face Image struct ``{bytes, path}`` becomes its bytes; other values pass through."""
    if isinstance(value, dict) and set(value) == {"bytes", "path"}:
        return value["bytes"]
    return value

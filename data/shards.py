"""Writers for the two shard formats the loaders read: webdataset tars and parquet tables.

Both write each shard to a temporary file in the output directory and ``os.replace`` it into place, so
a shard that exists is complete: an interrupted writer never leaves a half shard behind for a loader
(or a resumed writer) to trust.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from unimm.atomic import atomic_write

# Parquet columns that hold encoded images by default (stored as Hugging Face ``Image`` features).
DEFAULT_IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "src_img", "edited_img")
# Small row groups keep random access cheap: reading one sample decodes at most this many rows.
PARQUET_ROW_GROUP_SIZE = 64


def shard_name(prefix: str, index: int, extension: str) -> str:
    return f"{prefix}-{index:06d}.{extension}"


def encode_member(value: Any) -> bytes:
    """A webdataset member's bytes: bytes as-is, text as UTF-8, mappings and lists as JSON."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False).encode("utf-8")
    raise TypeError(
        f"cannot write a {type(value).__name__} as a webdataset member; use bytes, str, dict or list"
    )


def write_tar_samples(path: Path, samples: Iterable[dict[str, Any]]) -> int:
    """Write ``samples`` as one uncompressed webdataset tar at ``path`` (not atomic); return the count."""
    count = 0
    with tarfile.open(path, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for sample in samples:
            key = sample.get("__key__")
            if not isinstance(key, str) or not key:
                raise ValueError("every webdataset sample needs a non-empty string '__key__'")
            if "." in key.rsplit("/", 1)[-1]:
                # Webdataset splits member names at the first dot after the last slash.
                raise ValueError(f"sample key {key!r} must not contain '.' (webdataset naming rule)")
            for extension, value in sample.items():
                if extension.startswith("__"):
                    continue
                payload = encode_member(value)
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(payload)
                info.mode = 0o444
                # Fixed metadata keeps shards byte-identical across runs of the same generator.
                info.mtime = 0
                archive.addfile(info, io.BytesIO(payload))
            count += 1
    return count


def _chunks(items: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    if size < 1:
        raise ValueError("samples per shard must be at least 1")
    chunk: list[dict[str, Any]] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def write_webdataset_shards(
    samples: Iterable[dict[str, Any]],
    out_dir: str | os.PathLike,
    prefix: str = "shard",
    samples_per_shard: int = 1000,
) -> list[Path]:
    """Write ``{prefix}-{i:06d}.tar`` shards with members ``{key}.{extension}``; return their paths."""
    out_dir = Path(out_dir)
    paths = []
    for index, chunk in enumerate(_chunks(samples, samples_per_shard)):
        path = out_dir / shard_name(prefix, index, "tar")
        atomic_write(path, lambda temporary, chunk=chunk: write_tar_samples(temporary, chunk))
        paths.append(path)
    return paths


def _image_cell(value: Any) -> dict[str, Any] | None:
    """Hugging Face ``datasets`` stores an Image feature as a ``{bytes, path}`` struct."""
    if value is None:
        return None
    if isinstance(value, dict):
        return {"bytes": value.get("bytes"), "path": value.get("path")}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"bytes": bytes(value), "path": None}
    raise TypeError(
        f"image column values must be bytes or {{bytes, path}} mappings, not {type(value).__name__}"
    )


def rows_to_table(rows: list[dict[str, Any]], image_columns: Iterable[str]):
    """One pyarrow table from row dicts; columns in first-seen order, missing cells as null."""
    import pyarrow as pa

    image_columns = set(image_columns)
    names: list[str] = []
    for row in rows:
        for name in row:
            if name not in names:
                names.append(name)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    arrays = []
    for name in names:
        values = [row.get(name) for row in rows]
        if name in image_columns:
            arrays.append(pa.array([_image_cell(v) for v in values], type=image_type))
        else:
            arrays.append(pa.array(values))
    return pa.Table.from_arrays(arrays, names=names)


def write_parquet_shards(
    rows: Iterable[dict[str, Any]],
    out_dir: str | os.PathLike,
    prefix: str = "shard",
    rows_per_shard: int = 1000,
    image_columns: Iterable[str] = DEFAULT_IMAGE_COLUMNS,
    row_group_size: int = PARQUET_ROW_GROUP_SIZE,
) -> list[Path]:
    """Write ``{prefix}-{i:06d}.parquet`` shards; image columns become ``{bytes, path}`` structs."""
    import pyarrow.parquet as pq

    image_columns = tuple(image_columns)
    out_dir = Path(out_dir)
    paths = []
    for index, chunk in enumerate(_chunks(rows, rows_per_shard)):
        table = rows_to_table(chunk, image_columns)
        path = out_dir / shard_name(prefix, index, "parquet")
        atomic_write(
            path,
            lambda temporary, table=table: pq.write_table(table, temporary, row_group_size=row_group_size),
        )
        paths.append(path)
    return paths

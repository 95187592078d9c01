"""Join CC12M images (pixparse/cc12m-wds) with LLaVA-NeXt recaptions
(CaptionEmporium/conceptual-captions-cc12m-llavanext) into new webdataset shards.

The images come as webdataset tars whose samples hold ``jpg``, ``txt`` (the alt-text) and ``json``
(img2dataset metadata, including the source ``url``). The caption table (parquet, or the published
``train.jsonl.gz``) has ``caption_llava`` and ``caption_llava_short`` columns. By default the join matches
the table's ``url`` column against the ``url`` in each sample's ``json`` member, the one identifier both
sides are sure to carry; both sides are configurable (``shard_key``: ``__key__`` or a dotted
``json.<field>``; ``caption_key_column``: any column), e.g. ``__key__`` against a ``key`` column.

Each output shard keeps every original member and adds the captions into the ``json`` member, so a
loader with ``caption_fields: [json.caption_llava, json.caption_llava_short, txt]`` draws among them.
Output shards are written atomically and skipped when they already exist, so an interrupted run resumes.
"""

from __future__ import annotations

import glob
import gzip
import logging
import multiprocessing
import tarfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data.decode import lookup_field, parse_json
from data.index import expand_shards, split_member_name
from data.shards import write_tar_samples
from unimm.atomic import atomic_write
from unimm.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_CAPTION_COLUMNS = ("caption_llava", "caption_llava_short")
DEFAULT_CAPTION_KEY_COLUMN = "url"
DEFAULT_SHARD_KEY = "json.url"
CAPTION_TABLE_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".json", ".json.gz")


@dataclass
class ShardJoinCounts:
    matched: int = 0
    unmatched: int = 0
    dropped: int = 0


@dataclass
class PrepareReport:
    shards_written: int = 0
    shards_skipped: int = 0
    matched: int = 0
    unmatched: int = 0
    dropped: int = 0
    caption_rows: int = 0
    outputs: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"prepare-cc12m: {self.shards_written} shards written, {self.shards_skipped} already done; "
            f"{self.matched} samples matched a caption, {self.unmatched} unmatched"
            + (f" ({self.dropped} dropped)" if self.dropped else "")
            + f"; caption table: {self.caption_rows} rows"
        )


# ----------------------------------------------------------------------------------------------------
# Caption table
# ----------------------------------------------------------------------------------------------------
def caption_table_files(path: str) -> list[Path]:
    """A table file, a directory of them (recursive) or a glob pattern -> sorted files."""
    candidate = Path(path).expanduser()
    if candidate.is_file():
        return [candidate]
    if candidate.is_dir():
        files = sorted(
            p for p in candidate.rglob("*") if p.is_file() and p.name.endswith(CAPTION_TABLE_SUFFIXES)
        )
    elif glob.has_magic(path):
        files = sorted(Path(p) for p in glob.glob(path, recursive=True) if Path(p).is_file())
    else:
        raise UserError(f"caption table '{path}' does not exist")
    if not files:
        raise UserError(f"'{path}' holds no caption table ({', '.join(CAPTION_TABLE_SUFFIXES)} files)")
    return files


def _parquet_rows(path: Path, columns: list[str]) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table_file = pq.ParquetFile(path)
    except Exception as error:
        raise UserError(f"caption table '{path}' cannot be read as parquet ({error})") from None
    available = table_file.schema_arrow.names
    missing = [name for name in columns if name not in available]
    if missing:
        raise UserError(
            f"caption table '{path}' has no column {', '.join(repr(m) for m in missing)}; "
            f"its columns are {', '.join(available)} (see --caption-key-column)"
        )
    # Stream in batches: the full table is ~11M rows and only a few columns are needed.
    for batch in table_file.iter_batches(columns=columns, batch_size=65536):
        yield from batch.to_pylist()


def _json_lines_rows(path: Path) -> Iterator[dict[str, Any]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                row = parse_json(line)
                if not isinstance(row, dict):
                    raise UserError(f"caption table '{path}' line {number} is not a JSON object")
                yield row
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise UserError(f"caption table '{path}' cannot be read ({error})") from None


def load_caption_table(
    path: str,
    key_column: str = DEFAULT_CAPTION_KEY_COLUMN,
    caption_columns: Sequence[str] = DEFAULT_CAPTION_COLUMNS,
) -> dict[str, tuple[str | None, ...]]:
    """key -> captions (in ``caption_columns`` order) for every row of the caption table."""
    columns = [key_column, *caption_columns]
    captions: dict[str, tuple[str | None, ...]] = {}
    for file in caption_table_files(path):
        rows = _parquet_rows(file, columns) if file.suffix == ".parquet" else _json_lines_rows(file)
        for row in rows:
            key = row.get(key_column)
            if key is None:
                if file.suffix != ".parquet" and not captions:
                    raise UserError(
                        f"caption table '{file}' rows have no '{key_column}' field; "
                        f"its fields are {', '.join(row)} (see --caption-key-column)"
                    )
                continue
            captions[str(key).strip()] = tuple(
                value if isinstance(value, str) else None for value in (row.get(c) for c in caption_columns)
            )
    return captions


# ----------------------------------------------------------------------------------------------------
# Joining one shard
# ----------------------------------------------------------------------------------------------------
def read_tar_samples(path: Path) -> Iterator[dict[str, Any]]:
    """Stream a webdataset tar as sample dicts (consecutive members with one key form a sample)."""
    current: dict[str, Any] | None = None
    with tarfile.open(path, mode="r|") as archive:
        for member in archive:
            if not member.isfile():
                continue
            parts = split_member_name(member.name)
            if parts is None:
                continue
            key, extension = parts
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key}
            handle = archive.extractfile(member)
            current[extension] = handle.read() if handle is not None else b""
    if current is not None:
        yield current


def sample_join_key(sample: dict[str, Any], shard_key: str) -> str | None:
    value = lookup_field(sample, shard_key)
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return str(value).strip() if value is not None else None


def join_sample(
    sample: dict[str, Any],
    captions: dict[str, tuple[str | None, ...]],
    shard_key: str,
    caption_columns: Sequence[str],
) -> bool:
    """Add the sample's captions into its ``json`` member in place; return whether it matched."""
    key = sample_join_key(sample, shard_key)
    found = captions.get(key) if key is not None else None
    if found is None:
        return False
    metadata = parse_json(sample.get("json")) if "json" in sample else {}
    if not isinstance(metadata, dict):
        metadata = {}
    for column, caption in zip(caption_columns, found):
        if caption:
            metadata[column] = caption
    sample["json"] = metadata
    return True


# Set in the parent before worker processes fork, so the (large) caption dict is shared, not copied
# through a pipe for every shard.
_CAPTIONS: dict[str, tuple[str | None, ...]] = {}


def join_shard(
    source: Path,
    destination: Path,
    captions: dict[str, tuple[str | None, ...]],
    shard_key: str = DEFAULT_SHARD_KEY,
    caption_columns: Sequence[str] = DEFAULT_CAPTION_COLUMNS,
    drop_unmatched: bool = False,
) -> ShardJoinCounts:
    """Write ``destination`` (atomically): the samples of ``source`` with their captions joined in."""
    counts = ShardJoinCounts()

    def joined() -> Iterator[dict[str, Any]]:
        for sample in read_tar_samples(source):
            if join_sample(sample, captions, shard_key, caption_columns):
                counts.matched += 1
            else:
                counts.unmatched += 1
                if drop_unmatched:
                    counts.dropped += 1
                    continue
            yield sample

    try:
        atomic_write(destination, lambda temporary: write_tar_samples(temporary, joined()))
    except (tarfile.ReadError, EOFError) as error:
        raise UserError(f"image shard '{source}' cannot be read ({error}); check or re-download it") from None
    return counts


def _join_shard_in_worker(arguments: tuple[str, str, str, tuple[str, ...], bool]) -> tuple[int, int, int]:
    source, destination, shard_key, caption_columns, drop_unmatched = arguments
    counts = join_shard(
        Path(source), Path(destination), _CAPTIONS, shard_key, caption_columns, drop_unmatched
    )
    logger.info("joined %s: %d matched, %d unmatched", source, counts.matched, counts.unmatched)
    return counts.matched, counts.unmatched, counts.dropped


# ----------------------------------------------------------------------------------------------------
# The whole job
# ----------------------------------------------------------------------------------------------------
def prepare_cc12m(
    images: Sequence[str],
    captions: str,
    output: str | Path,
    workers: int = 1,
    caption_key_column: str = DEFAULT_CAPTION_KEY_COLUMN,
    shard_key: str = DEFAULT_SHARD_KEY,
    caption_columns: Sequence[str] = DEFAULT_CAPTION_COLUMNS,
    drop_unmatched: bool = False,
) -> PrepareReport:
    """Join every image shard with the caption table into ``output`` (same shard file names)."""
    global _CAPTIONS
    caption_columns = tuple(caption_columns)
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    sources = expand_shards(list(images), "webdataset")
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise UserError(f"output '{output}' exists and is not a directory")
    if len({source.name for source in sources}) != len(sources):
        raise UserError("image shards from different directories share file names; join them separately")
    report = PrepareReport()
    todo = []
    for source in sources:
        destination = output / source.name
        if destination.exists():
            report.shards_skipped += 1
        else:
            todo.append((str(source), str(destination), shard_key, caption_columns, drop_unmatched))
        report.outputs.append(destination)
    if not todo:
        return report
    table = load_caption_table(captions, caption_key_column, caption_columns)
    report.caption_rows = len(table)
    output.mkdir(parents=True, exist_ok=True)
    _CAPTIONS = table
    try:
        if workers > 1 and len(todo) > 1:
            context = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                results = list(pool.map(_join_shard_in_worker, todo))
        else:
            results = [_join_shard_in_worker(arguments) for arguments in todo]
    finally:
        _CAPTIONS = {}
    for matched, unmatched, dropped in results:
        report.shards_written += 1
        report.matched += matched
        report.unmatched += unmatched
        report.dropped += dropped
    return report

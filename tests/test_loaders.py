"""Shard writers, safe decoding, indexed datasets and the resumable loader, on tiny generated shards."""

from __future__ import annotations

import dataclasses
import io
import json
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.config import DataConfig
from data.datasets import EditDataset, TextToImageDataset
from data.decode import CorruptSample, decode_image, pick_caption
from data.index import ShardIndex, epoch_order
from data.loader import ResumableLoader
from data.shards import write_parquet_shards, write_webdataset_shards
from unimm.errors import UserError

RESOLUTION = 16
GOOD_COUNT = 40
FORMATS = ("webdataset", "parquet")


# ----------------------------------------------------------------------------------------------------
# Sample builders
# ----------------------------------------------------------------------------------------------------
def noise_pixels(seed: int, size: tuple[int, int] = (RESOLUTION, RESOLUTION)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)


def encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def png_bytes(pixels: np.ndarray) -> bytes:
    return encode(Image.fromarray(pixels), "PNG")


def png_with_declared_size(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (with a valid CRC) but holds 1x1 pixel data."""
    data = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def expected_tensor(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1.0


def good_sample(index: int) -> dict:
    pixels = noise_pixels(index)
    return {
        "key": f"good{index:04d}",
        "field": "png",
        "image": png_bytes(pixels),
        "pixels": pixels,
        "caption": f"a noisy picture number {index}",
        "llava": f"a detailed description of picture {index}",
    }


def broken_samples() -> list[tuple[dict, str]]:
    """(sample, expected skip reason) for every kind of corruption the loader must survive."""
    truncated_jpeg = encode(Image.fromarray(noise_pixels(1000, (64, 64))), "JPEG", quality=95)
    float_tiff = encode(Image.fromarray(np.ones((16, 16), dtype=np.float32), mode="F"), "TIFF")
    sixteen_bit_png = encode(Image.new("I;16", (16, 16), 300), "PNG")
    cases = [
        ({"field": "jpg", "image": truncated_jpeg[: len(truncated_jpeg) // 2]}, "truncated image"),
        ({"field": "png", "image": b""}, "empty image"),
        ({"field": "png", "image": b"this is not an image at all"}, "undecodable image"),
        ({"field": "tiff", "image": float_tiff}, "unsupported mode"),
        ({"field": "png", "image": sixteen_bit_png}, "unsupported mode"),
        (
            {"field": "png", "image": png_bytes(noise_pixels(1001)), "caption": None, "llava": None},
            "missing caption",
        ),
        ({"field": "png", "image": png_bytes(noise_pixels(1002, (2, 2)))}, "image too small"),
        ({"field": "png", "image": png_with_declared_size(20000, 20000)}, "image too large"),
        ({"field": "png", "image": png_with_declared_size(9000, 9000)}, "image too large"),
        ({"field": "png", "image": png_with_declared_size(10, 1000)}, "extreme aspect ratio"),
    ]
    samples = []
    for number, (sample, reason) in enumerate(cases):
        sample = {"key": f"bad{number:04d}", "caption": f"broken {number}", "llava": None, **sample}
        samples.append((sample, reason))
    return samples


def mixed_samples() -> tuple[list[dict], Counter]:
    """Good samples with the broken ones spread between them; returns the expected skip counts."""
    samples = [good_sample(i) for i in range(GOOD_COUNT)]
    expected = Counter()
    for number, (sample, reason) in enumerate(broken_samples()):
        samples.insert(3 + number * 4, sample)
        expected[reason] += 1
    return samples, expected


def write_dataset(
    tmp_path: Path, format: str, samples: list[dict], per_shard: int = 16, **overrides
) -> DataConfig:
    """Write ``samples`` in ``format`` and return a config reading them."""
    out_dir = tmp_path / format
    if format == "webdataset":
        records = []
        for sample in samples:
            record = {"__key__": sample["key"], sample["field"]: sample["image"]}
            if sample.get("caption") is not None:
                record["txt"] = sample["caption"]
            if sample.get("llava") is not None:
                record["json"] = {"caption_llava": sample["llava"], "url": f"http://example/{sample['key']}"}
            records.append(record)
        write_webdataset_shards(records, out_dir, samples_per_shard=per_shard)
    else:
        rows = [
            {
                "__key__": sample["key"],
                "image": sample["image"],
                "txt": sample.get("caption"),
                "json": json.dumps({"caption_llava": sample["llava"]}) if sample.get("llava") else None,
            }
            for sample in samples
        ]
        write_parquet_shards(rows, out_dir, rows_per_shard=per_shard)
    settings = {
        "format": format,
        "shards": [str(out_dir)],
        "image_fields": ["jpg", "png", "tiff", "image"],
        "caption_fields": ["txt"],
        "resolution": RESOLUTION,
        "batch_size": 8,
        "drop_last": False,
        "shuffle_window": 2,
    }
    settings.update(overrides)
    return DataConfig(**settings)


def all_batches(loader: ResumableLoader) -> list[dict]:
    return list(loader)


def batch_keys(batches: list[dict]) -> list[str]:
    return [key for batch in batches for key in batch["key"]]


def assert_same_batches(first: list[dict], second: list[dict]) -> None:
    assert len(first) == len(second)
    for left, right in zip(first, second):
        assert left["key"] == right["key"]
        assert left["caption"] == right["caption"]
        assert torch.equal(left["image"], right["image"])


# ----------------------------------------------------------------------------------------------------
# Read back
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("format", FORMATS)
def test_every_image_and_caption_reads_back_identically(tmp_path, format):
    samples = [good_sample(i) for i in range(GOOD_COUNT)]
    config = write_dataset(tmp_path, format, samples, caption_fields=["txt", "json.caption_llava"])
    dataset = TextToImageDataset(config)
    assert len(dataset) == GOOD_COUNT
    by_key = {sample["key"]: sample for sample in samples}
    picked = Counter()
    for sample_id in range(len(dataset)):
        item = dataset[sample_id]
        source = by_key[item["key"]]
        assert item["image"].shape == (3, RESOLUTION, RESOLUTION)
        assert item["image"].dtype == torch.float32
        assert torch.equal(item["image"], expected_tensor(source["pixels"]))
        assert item["caption"] in (source["caption"], source["llava"])
        picked[item["caption"] == source["llava"]] += 1
        # The draw is a pure function of (seed, epoch, sample id).
        assert dataset[(0, sample_id)]["caption"] == item["caption"]
    assert picked[True] > 0 and picked[False] > 0


def test_shard_writer_naming_and_webdataset_layout(tmp_path):
    import tarfile

    records = [{"__key__": f"k{i}", "jpg": b"x" * i, "txt": "t", "json": {"a": i}} for i in range(5)]
    paths = write_webdataset_shards(records, tmp_path, prefix="part", samples_per_shard=2)
    assert [p.name for p in paths] == ["part-000000.tar", "part-000001.tar", "part-000002.tar"]
    with tarfile.open(paths[0]) as archive:
        assert archive.getnames() == ["k0.jpg", "k0.txt", "k0.json", "k1.jpg", "k1.txt", "k1.json"]
        assert json.loads(archive.extractfile("k1.json").read()) == {"a": 1}
    assert not list(tmp_path.glob(".*.tmp"))


def test_parquet_image_columns_are_huggingface_image_structs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"image": b"abc", "txt": "x", "tags": ["a", "b"], "score": 0.5, "width": 3} for _ in range(130)]
    (path,) = write_parquet_shards(rows, tmp_path)
    parquet = pq.ParquetFile(path)
    assert parquet.schema_arrow.field("image").type == pa.struct(
        [("bytes", pa.binary()), ("path", pa.string())]
    )
    assert parquet.metadata.num_row_groups == 3  # 64-row groups keep random access cheap


# ----------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------
def test_decode_composites_transparency_on_white():
    transparent = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    image = decode_image(encode(transparent, "PNG"), DataConfig())
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255)
    grey = decode_image(encode(Image.new("L", (16, 16), 7), "PNG"), DataConfig())
    assert grey.getpixel((3, 3)) == (7, 7, 7)


@pytest.mark.parametrize(("sample", "reason"), broken_samples(), ids=lambda value: str(value)[:20])
def test_each_corruption_has_its_reason(sample, reason):
    config = DataConfig(min_image_side=8)
    if reason == "missing caption":
        with pytest.raises(CorruptSample, match=reason):
            pick_caption(
                {"txt": b"   ", "json": b"{not json"}, ["txt", "json.caption"], np.random.default_rng(0)
            )
        return
    with pytest.raises(CorruptSample) as caught:
        decode_image(sample["image"], config)
    assert caught.value.reason == reason


def test_pick_caption_reads_plain_json_and_parsed_fields():
    rng = np.random.default_rng(0)
    record = {"txt": b"alt", "json": b'{"caption_llava": "long", "empty": ""}', "meta": {"short": "s"}}
    assert pick_caption(record, ["json.caption_llava"], rng) == "long"
    assert pick_caption(record, ["meta.short"], rng) == "s"
    assert pick_caption(record, ["json.empty", "json.missing", "txt"], rng) == "alt"
    assert {pick_caption(record, ["txt", "json.caption_llava"], rng) for _ in range(50)} == {"alt", "long"}


# ----------------------------------------------------------------------------------------------------
# Skipping corrupt samples
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("format", FORMATS)
def test_broken_samples_are_skipped_and_counted_exactly(tmp_path, format):
    samples, expected = mixed_samples()
    config = write_dataset(tmp_path, format, samples, batch_size=8)
    loader = ResumableLoader(TextToImageDataset(config), config)
    good_keys = sorted(sample["key"] for sample in samples if sample["key"].startswith("good"))

    for epoch in (1, 2):
        batches = all_batches(loader)
        assert all(len(batch["key"]) == 8 for batch in batches)  # 40 good samples: five full batches
        assert sorted(batch_keys(batches)) == good_keys  # each good key exactly once
        report = loader.skip_report()
        assert report["skipped"] == {reason: count * epoch for reason, count in expected.items()}
        assert report["delivered"] == GOOD_COUNT * epoch
    assert loader.summary().startswith(f"data: {2 * GOOD_COUNT} samples delivered, 20 skipped (")


def test_drop_last_yields_only_full_batches(tmp_path):
    samples, _ = mixed_samples()
    config = write_dataset(tmp_path, "webdataset", samples, batch_size=7, drop_last=True)
    loader = ResumableLoader(TextToImageDataset(config), config)
    batches = all_batches(loader)
    assert [len(batch["key"]) for batch in batches] == [7] * 5
    assert loader.skip_report()["delivered"] == 35
    assert sum(loader.skip_report()["skipped"].values()) == 10
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["position"] == 0


def test_truncated_tar_shard_is_indexed_up_to_the_break(tmp_path):
    samples = [good_sample(i) for i in range(6)]
    config = write_dataset(tmp_path, "webdataset", samples, per_shard=6)
    (shard,) = Path(config.shards[0]).glob("*.tar")
    index = ShardIndex.build(config)
    table = index.shards[0]
    # Cut inside the last sample's image data.
    last_image = table.offsets[-1, table.fields.index("png")]
    shard.write_bytes(shard.read_bytes()[: int(last_image) + 10])
    loader = ResumableLoader(TextToImageDataset(config), config)
    batches = all_batches(loader)
    assert sorted(batch_keys(batches)) == [f"good{i:04d}" for i in range(5)]
    assert loader.skip_report()["skipped"] == {"truncated shard": 1}
    assert ShardIndex.build(config).truncated_shards == [shard]


def test_missing_or_unreadable_shards_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        ShardIndex.build(DataConfig(shards=[str(tmp_path / "nothing.tar")]))
    with pytest.raises(UserError, match="matches no file"):
        ShardIndex.build(DataConfig(shards=[str(tmp_path / "*.tar")]))
    with pytest.raises(UserError, match="no shards"):
        ShardIndex.build(DataConfig(shards=[]))
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"\x01" * 2000)
    with pytest.raises(UserError, match="garbage.tar"):
        ShardIndex.build(DataConfig(shards=[str(garbage)]))
    bad_parquet = tmp_path / "bad.parquet"
    bad_parquet.write_bytes(b"not parquet")
    with pytest.raises(UserError, match="bad.parquet"):
        ShardIndex.build(DataConfig(format="parquet", shards=[str(bad_parquet)]))


# ----------------------------------------------------------------------------------------------------
# Ordering
# ----------------------------------------------------------------------------------------------------
def test_epoch_order_is_a_deterministic_local_permutation():
    blocks = [256, 256, 100, 256, 17, 64, 64]
    total = sum(blocks)
    first = epoch_order(blocks, seed=3, epoch=0, shuffle=True, shuffle_window=2)
    assert np.array_equal(first, epoch_order(blocks, seed=3, epoch=0, shuffle=True, shuffle_window=2))
    assert np.array_equal(np.sort(first), np.arange(total))
    assert not np.array_equal(first, epoch_order(blocks, seed=4, epoch=0, shuffle=True, shuffle_window=2))
    assert not np.array_equal(first, epoch_order(blocks, seed=3, epoch=1, shuffle=True, shuffle_window=2))
    assert np.array_equal(epoch_order(blocks, 3, 0, shuffle=False), np.arange(total))
    # Locality: with a window of one block, each run of a block's size holds ids of a single block.
    starts = np.cumsum([0, *blocks])
    single = epoch_order(blocks, seed=3, epoch=0, shuffle=True, shuffle_window=1)
    block_of = np.searchsorted(starts, single, side="right") - 1
    assert (np.diff(block_of) != 0).sum() == len(blocks) - 1


@pytest.mark.parametrize("format", FORMATS)
def test_loader_order_depends_only_on_the_seed(tmp_path, format):
    samples = [good_sample(i) for i in range(GOOD_COUNT)]
    config = write_dataset(tmp_path, format, samples, per_shard=10, seed=1)
    dataset = TextToImageDataset(config)
    keys = batch_keys(all_batches(ResumableLoader(dataset, config)))
    assert keys == batch_keys(all_batches(ResumableLoader(dataset, config)))
    assert sorted(keys) == sorted(sample["key"] for sample in samples)
    other_config = write_dataset(tmp_path, format, samples, per_shard=10, seed=2)
    assert keys != batch_keys(all_batches(ResumableLoader(TextToImageDataset(other_config), other_config)))
    unshuffled = write_dataset(tmp_path, format, samples, per_shard=10, shuffle=False)
    assert batch_keys(all_batches(ResumableLoader(TextToImageDataset(unshuffled), unshuffled))) == [
        sample["key"] for sample in samples
    ]


# ----------------------------------------------------------------------------------------------------
# Exact resume
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("format", "num_workers"),
    [("webdataset", 0), ("parquet", 0), ("webdataset", 2)],
    ids=["wds", "parquet", "wds-2w"],
)
def test_resume_continues_with_exactly_the_same_batches(tmp_path, format, num_workers):
    samples, _ = mixed_samples()
    config = write_dataset(
        tmp_path,
        format,
        samples,
        batch_size=6,
        drop_last=True,
        num_workers=num_workers,
        caption_fields=["txt", "json.caption_llava"],
    )
    dataset = TextToImageDataset(config)

    uninterrupted = ResumableLoader(dataset, config)
    epoch_zero, epoch_one = all_batches(uninterrupted), all_batches(uninterrupted)

    interrupted = ResumableLoader(dataset, config)
    iterator = iter(interrupted)
    consumed = [next(iterator) for _ in range(3)]
    state = json.loads(json.dumps(interrupted.state_dict()))  # the state is plain JSON-able data
    del iterator
    assert_same_batches(consumed, epoch_zero[:3])

    resumed = ResumableLoader(TextToImageDataset(config), config)
    resumed.load_state_dict(state)
    assert_same_batches(all_batches(resumed), epoch_zero[3:])
    assert_same_batches(all_batches(resumed), epoch_one)
    assert resumed.skip_report() == uninterrupted.skip_report()
    assert resumed.state_dict() == uninterrupted.state_dict()


def test_breaking_out_and_iterating_again_continues_the_epoch(tmp_path):
    samples, _ = mixed_samples()
    config = write_dataset(tmp_path, "parquet", samples, batch_size=5)
    dataset = TextToImageDataset(config)
    reference = all_batches(ResumableLoader(dataset, config))
    loader = ResumableLoader(dataset, config)
    first = []
    for batch in loader:
        first.append(batch)
        if len(first) == 4:
            break
    assert_same_batches(first + all_batches(loader), reference)


def test_resume_requires_the_same_world_size_and_seed(tmp_path):
    config = write_dataset(tmp_path, "webdataset", [good_sample(i) for i in range(8)])
    dataset = TextToImageDataset(config)
    state = ResumableLoader(dataset, config, rank=0, world_size=2).state_dict()
    with pytest.raises(UserError, match="world size 2"):
        ResumableLoader(dataset, config).load_state_dict(state)
    with pytest.raises(UserError, match="seed"):
        ResumableLoader(dataset, config, world_size=2).load_state_dict({**state, "seed": 5})


# ----------------------------------------------------------------------------------------------------
# Distributed ranks
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("format", FORMATS)
def test_ranks_read_disjoint_parts_covering_everything(tmp_path, format):
    samples, expected = mixed_samples()
    config = write_dataset(tmp_path, format, samples, batch_size=4)
    dataset = TextToImageDataset(config)
    ranks = [ResumableLoader(dataset, config, rank=rank, world_size=2) for rank in range(2)]
    keys = [batch_keys(all_batches(loader)) for loader in ranks]
    assert not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == sorted(
        sample["key"] for sample in samples if sample["key"].startswith("good")
    )
    skipped = Counter(ranks[0].skip_report()["skipped"]) + Counter(ranks[1].skip_report()["skipped"])
    assert skipped == expected


# ----------------------------------------------------------------------------------------------------
# Edit data (OmniEdit layout)
# ----------------------------------------------------------------------------------------------------
def omniedit_rows(count: int) -> list[dict]:
    rows = []
    for index in range(count):
        rows.append(
            {
                "omni_edit_id": f"edit-{index:03d}",
                "task": "add" if index % 2 else "swap",
                "src_img": png_bytes(noise_pixels(2000 + index, (24, 16))),
                "edited_img": png_bytes(noise_pixels(3000 + index, (24, 16))),
                "edited_prompt_list": [f"add a hat {index}", f"put a hat on it {index}"]
                if index != 5
                else [],
                "width": 24,
                "height": 16,
                "sc_score_1": 9.0,
                "sc_score_2": 8.0,
                "pq_score": 7.5,
                "o_score": 8.2,
            }
        )
    return rows


def test_edit_dataset_reads_omniedit_parquet(tmp_path):
    rows = omniedit_rows(12)
    write_parquet_shards(rows, tmp_path / "omniedit", rows_per_shard=5)
    config = DataConfig(
        format="parquet",
        kind="edit",
        shards=[str(tmp_path / "omniedit")],
        resolution=RESOLUTION,
        batch_size=4,
        drop_last=False,
    )
    dataset = EditDataset(config)
    assert len(dataset) == 12
    item = dataset[0]
    assert item["key"] == "edit-000" and item["task"] == "swap"
    assert item["instruction"] in rows[0]["edited_prompt_list"]
    assert item["source_image"].shape == item["edited_image"].shape == (3, RESOLUTION, RESOLUTION)
    # 24x16 -> shorter side already 16: only the 24-wide side is center-cropped (columns 4..19).
    assert torch.equal(item["source_image"], expected_tensor(noise_pixels(2000, (24, 16))[:, 4:20]))
    assert dataset[5] == {"corrupt": "missing instruction", "key": "edit-005"}

    loader = ResumableLoader(dataset, config)
    batches = all_batches(loader)
    assert [len(batch["key"]) for batch in batches] == [4, 4, 3]
    assert batches[0]["source_image"].shape == (4, 3, RESOLUTION, RESOLUTION)
    assert loader.skip_report()["skipped"] == {"missing instruction": 1}
    instructions = {text for batch in batches for text in batch["instruction"]}
    assert len(instructions) == 11


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------
@pytest.fixture
def data_cli(monkeypatch):
    """``unimm.cli.main`` with only the data command registered (other commands may be in progress)."""
    import unimm.cli

    monkeypatch.setattr(unimm.cli, "COMMAND_MODULES", ("unimm.cli.data_command",))
    return unimm.cli.main


def test_inspect_bad_path_is_a_one_line_error(data_cli, tmp_path, capsys):
    code = data_cli(["data", "inspect", str(tmp_path / "missing-*.tar")])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("unimm data inspect: error: ") and "missing-*.tar" in captured.err
    assert "Traceback" not in captured.err


def test_inspect_reports_counts_fields_and_skips(data_cli, tmp_path, capsys):
    samples, _ = mixed_samples()
    config = write_dataset(tmp_path, "webdataset", samples)
    config_file = tmp_path / "data.yaml"
    config_file.write_text("image_fields: [jpg, png, tiff]\nresolution: 16\n")
    code = data_cli(["data", "inspect", config.shards[0], "--config", str(config_file), "data.batch_size=3"])
    output = capsys.readouterr().out
    assert code == 0
    assert f"shards: 4 (webdataset), samples: {len(samples)}" in output
    assert "first sample: good0000: " in output and "png (" in output and "txt (" in output
    assert f"data: {GOOD_COUNT} samples delivered, 10 skipped (" in output
    assert data_cli(["data", "inspect", config.shards[0], "format=parquet"]) == 2


def test_tar_index_cache_hits_and_invalidates(tmp_path):
    """The cached index equals a fresh scan, is reused, and is rebuilt when the shard changes."""
    import os

    from data.index import _tar_cache_path, cached_scan_tar_shard, scan_tar_shard
    from data.shards import write_webdataset_shards

    samples = [{"__key__": f"s{i:03d}", "txt": f"caption {i}", "png": bytes([i]) * (10 + i)} for i in range(30)]
    (shard,) = write_webdataset_shards(samples, tmp_path / "shards", samples_per_shard=100)
    cache = tmp_path / "cache"
    first = cached_scan_tar_shard(shard, cache)
    entry = _tar_cache_path(shard, cache)
    assert entry.is_file()
    fresh = scan_tar_shard(shard)
    again = cached_scan_tar_shard(shard, cache)
    for table in (first, again):
        assert table.keys == fresh.keys and table.fields == fresh.fields
        assert np.array_equal(table.offsets, fresh.offsets) and np.array_equal(table.sizes, fresh.sizes)
    # Rewrite the shard with fewer samples: a new size/mtime means a new cache entry, not a stale table.
    (shard,) = write_webdataset_shards(samples[:5], tmp_path / "shards", samples_per_shard=100)
    os.utime(shard, ns=(entry.stat().st_mtime_ns + 10**9, entry.stat().st_mtime_ns + 10**9))
    assert cached_scan_tar_shard(shard, cache).keys == [f"s{i:03d}" for i in range(5)]
    # A corrupt cache entry is ignored and rewritten.
    _tar_cache_path(shard, cache).write_bytes(b"not an npz")
    assert cached_scan_tar_shard(shard, cache).keys == [f"s{i:03d}" for i in range(5)]


@pytest.mark.parametrize("tar_format", ["ustar", "gnu", "pax"])
def test_header_scanner_agrees_with_tarfile(tmp_path, tar_format):
    """The fast header reader finds the same members, offsets and sizes as Python's tarfile, including
    long names (ustar prefix, GNU 'L' records, pax 'path') and non-ASCII names; a non-tar is refused."""
    import tarfile

    from data.index import iterate_tar_members, scan_tar_shard

    formats = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}
    names = ["a/b/sample0.jpg", "a/b/sample0.txt", "dir/" + "d" * 120 + "/sample1.jpg", "x" * 90 + "/" + "y" * 60 + ".txt"]
    if tar_format != "ustar":
        names.append("données/échantillon.json")
        names.append("k" * 150 + ".json")
    path = tmp_path / "shard.tar"
    with tarfile.open(path, "w", format=formats[tar_format]) as archive:
        for index, name in enumerate(names):
            payload = bytes([index]) * (100 + 700 * index)
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
        directory = tarfile.TarInfo("a/emptydir")
        directory.type = tarfile.DIRTYPE
        archive.addfile(directory)
    with tarfile.open(path) as archive:
        expected = [(m.name, m.offset_data, m.size) for m in archive.getmembers() if m.isfile()]
    assert list(iterate_tar_members(path)) == expected
    assert scan_tar_shard(path).truncated is False
    not_a_tar = tmp_path / "notes.tar"
    not_a_tar.write_bytes(b"hello world" * 100)
    with pytest.raises(UserError, match="cannot be read as a tar"):
        scan_tar_shard(not_a_tar)


def test_threaded_index_build_matches_single_thread(tmp_path):
    from data.index import ShardIndex
    from data.shards import write_webdataset_shards

    samples = [{"__key__": f"k{i:04d}", "txt": "t", "png": bytes([i % 256]) * 20} for i in range(90)]
    write_webdataset_shards(samples, tmp_path / "shards", samples_per_shard=10)
    single = ShardIndex.build(DataConfig(shards=[str(tmp_path / "shards")], index_threads=1, index_cache_dir=""))
    threaded = ShardIndex.build(DataConfig(shards=[str(tmp_path / "shards")], index_threads=4, index_cache_dir=""))
    assert [table.path for table in threaded.shards] == [table.path for table in single.shards]
    assert [threaded.read_record(i)["__key__"] for i in range(90)] == [f"k{i:04d}" for i in range(90)]


def test_worker_processes_deliver_the_same_batches_and_skips_as_in_process_reading(tmp_path):
    # Workers send chunks of samples as numpy arrays (data.loader.pack_chunk); order, tensors and the
    # skipped-sample accounting must be exactly those of reading in the main process.
    samples, _ = mixed_samples()
    config = write_dataset(tmp_path, "webdataset", samples, batch_size=8, drop_last=False, caption_fields=["txt", "json.caption_llava"])
    in_process = ResumableLoader(TextToImageDataset(config), config)
    reference = all_batches(in_process)
    with_workers_config = dataclasses.replace(config, num_workers=2)
    with_workers = ResumableLoader(TextToImageDataset(with_workers_config), with_workers_config)
    assert with_workers.worker_chunk_size() == 2  # 8 // (2 * 2): workers still alternate within a batch
    assert_same_batches(all_batches(with_workers), reference)
    assert with_workers.skip_report() == in_process.skip_report() and sum(in_process.skip_report()["skipped"].values()) > 0

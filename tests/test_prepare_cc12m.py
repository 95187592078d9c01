"""Joining fake cc12m-wds shards with a fake LLaVA-NeXt caption table, then loading the result."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.config import DataConfig
from data.datasets import TextToImageDataset
from data.decode import parse_json
from data.loader import ResumableLoader
from data.prepare_cc12m import load_caption_table, prepare_cc12m, read_tar_samples
from data.shards import write_parquet_shards, write_webdataset_shards
from unimm.errors import UserError

SAMPLES_PER_SHARD = 6
SHARDS = 2
UNMATCHED = {"000000004", "000000009"}


def jpeg_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def cc12m_key(index: int) -> str:
    return f"{index:09d}"


def url(index: int) -> str:
    return f"https://images.example.com/photo-{index}.jpg"


def write_fake_cc12m(tmp_path: Path) -> Path:
    """Shards laid out like pixparse/cc12m-wds: jpg, txt (alt-text), json (img2dataset metadata)."""
    samples = [
        {
            "__key__": cc12m_key(i),
            "jpg": jpeg_bytes(i),
            "txt": f"alt text {i}",
            "json": {"url": url(i), "key": cc12m_key(i), "status": "success", "width": 16, "height": 16},
        }
        for i in range(SAMPLES_PER_SHARD * SHARDS)
    ]
    image_dir = tmp_path / "cc12m-wds"
    write_webdataset_shards(samples, image_dir, prefix="cc12m-train", samples_per_shard=SAMPLES_PER_SHARD)
    return image_dir


def caption_rows() -> list[dict]:
    rows = [
        {"url": url(i), "caption_llava": f"llava long caption {i}", "caption_llava_short": f"llava short {i}"}
        for i in range(SAMPLES_PER_SHARD * SHARDS)
        if cc12m_key(i) not in UNMATCHED
    ]
    rows.append(
        {"url": "https://elsewhere.example.com/x.jpg", "caption_llava": "unused", "caption_llava_short": "u"}
    )
    return rows


def write_caption_parquet(tmp_path: Path) -> Path:
    (path,) = write_parquet_shards(caption_rows(), tmp_path / "captions", prefix="train", image_columns=())
    return path


def joined_config(output: Path, caption_fields: list[str]) -> DataConfig:
    return DataConfig(
        shards=[str(output)], caption_fields=caption_fields, resolution=16, batch_size=4, drop_last=False
    )


def test_join_adds_llava_captions_and_keeps_original_members(tmp_path):
    image_dir = write_fake_cc12m(tmp_path)
    report = prepare_cc12m([str(image_dir)], str(write_caption_parquet(tmp_path)), tmp_path / "joined")
    assert (report.shards_written, report.shards_skipped) == (SHARDS, 0)
    assert (report.matched, report.unmatched) == (SAMPLES_PER_SHARD * SHARDS - 2, 2)
    assert "10 samples matched a caption, 2 unmatched" in report.summary()

    originals = {s["__key__"]: s for p in sorted(image_dir.glob("*.tar")) for s in read_tar_samples(p)}
    outputs = sorted((tmp_path / "joined").glob("*.tar"))
    assert [p.name for p in outputs] == ["cc12m-train-000000.tar", "cc12m-train-000001.tar"]
    joined = [s for p in outputs for s in read_tar_samples(p)]
    assert [s["__key__"] for s in joined] == sorted(originals)
    for sample in joined:
        original = originals[sample["__key__"]]
        assert sample["jpg"] == original["jpg"] and sample["txt"] == original["txt"]
        metadata = parse_json(sample["json"])
        assert metadata["url"] == parse_json(original["json"])["url"]
        index = int(sample["__key__"])
        if sample["__key__"] in UNMATCHED:
            assert "caption_llava" not in metadata
        else:
            assert metadata["caption_llava"] == f"llava long caption {index}"
            assert metadata["caption_llava_short"] == f"llava short {index}"


def test_loader_draws_captions_from_the_llava_fields(tmp_path):
    output = tmp_path / "joined"
    prepare_cc12m([str(write_fake_cc12m(tmp_path))], str(write_caption_parquet(tmp_path)), output)

    # Only the long caption: matched samples get exactly it, unmatched ones have no caption.
    config = joined_config(output, ["json.caption_llava"])
    loader = ResumableLoader(TextToImageDataset(config), config)
    delivered = {k: c for batch in loader for k, c in zip(batch["key"], batch["caption"])}
    assert delivered == {
        cc12m_key(i): f"llava long caption {i}" for i in range(12) if cc12m_key(i) not in UNMATCHED
    }
    assert loader.skip_report()["skipped"] == {"missing caption": 2}

    # The training setting: all three candidates, one drawn per sample; unmatched fall back to alt-text.
    config = joined_config(output, ["json.caption_llava", "json.caption_llava_short", "txt"])
    dataset = TextToImageDataset(config)
    kinds = set()
    for epoch in range(3):
        for sample_id in range(len(dataset)):
            item = dataset[(epoch, sample_id)]
            index = int(item["key"])
            options = {
                f"llava long caption {index}": "long",
                f"llava short {index}": "short",
                f"alt text {index}": "alt",
            }
            assert item["caption"] in options
            if item["key"] in UNMATCHED:
                assert options[item["caption"]] == "alt"
            kinds.add(options[item["caption"]])
    assert kinds == {"long", "short", "alt"}


def test_rerun_skips_existing_outputs_and_redoes_missing_ones(tmp_path):
    image_dir = write_fake_cc12m(tmp_path)
    captions = str(write_caption_parquet(tmp_path))
    output = tmp_path / "joined"
    prepare_cc12m([str(image_dir / "*.tar")], captions, output)
    first, second = sorted(output.glob("*.tar"))
    first_bytes, second_stat = first.read_bytes(), second.stat()

    again = prepare_cc12m([str(image_dir / "*.tar")], captions, output)
    assert (again.shards_written, again.shards_skipped, again.matched) == (0, SHARDS, 0)
    assert second.stat().st_mtime_ns == second_stat.st_mtime_ns

    first.unlink()
    redo = prepare_cc12m([str(image_dir / "*.tar")], captions, output)
    assert (redo.shards_written, redo.shards_skipped) == (1, 1)
    assert (redo.matched, redo.unmatched) == (5, 1)
    assert first.read_bytes() == first_bytes
    assert not list(output.glob(".*.tmp"))


def test_parallel_workers_write_the_same_shards(tmp_path):
    image_dir = write_fake_cc12m(tmp_path)
    captions = str(write_caption_parquet(tmp_path))
    serial = prepare_cc12m([str(image_dir)], captions, tmp_path / "serial", workers=1)
    parallel = prepare_cc12m([str(image_dir)], captions, tmp_path / "parallel", workers=2)
    assert (serial.matched, serial.unmatched) == (parallel.matched, parallel.unmatched)
    for left in sorted((tmp_path / "serial").glob("*.tar")):
        assert left.read_bytes() == (tmp_path / "parallel" / left.name).read_bytes()


def test_join_on_shard_key_with_a_jsonl_gz_table(tmp_path):
    image_dir = write_fake_cc12m(tmp_path)
    table = tmp_path / "train.jsonl.gz"
    with gzip.open(table, "wt", encoding="utf-8") as handle:
        for i in range(0, 12, 2):
            handle.write(
                json.dumps({"key": cc12m_key(i), "caption_llava": f"by key {i}", "caption_llava_short": None})
            )
            handle.write("\n")
    report = prepare_cc12m(
        [str(image_dir)], str(table), tmp_path / "joined", caption_key_column="key", shard_key="__key__"
    )
    assert (report.matched, report.unmatched) == (6, 6)
    joined = {
        s["__key__"]: parse_json(s["json"])
        for p in sorted((tmp_path / "joined").glob("*.tar"))
        for s in read_tar_samples(p)
    }
    assert joined[cc12m_key(2)]["caption_llava"] == "by key 2"
    assert "caption_llava_short" not in joined[cc12m_key(2)]
    assert "caption_llava" not in joined[cc12m_key(3)]


def test_bad_inputs_are_user_errors(tmp_path):
    image_dir = write_fake_cc12m(tmp_path)
    captions = str(write_caption_parquet(tmp_path))
    with pytest.raises(UserError, match="does not exist"):
        prepare_cc12m([str(tmp_path / "nowhere")], captions, tmp_path / "out")
    with pytest.raises(UserError, match="does not exist"):
        prepare_cc12m([str(image_dir)], str(tmp_path / "missing.parquet"), tmp_path / "out")
    with pytest.raises(UserError, match="no column 'sample_id'"):
        load_caption_table(captions, key_column="sample_id")
    broken = tmp_path / "broken" / "cc12m-train-000000.tar"
    broken.parent.mkdir()
    broken.write_bytes(b"\x07" * 4096)
    with pytest.raises(UserError, match="cc12m-train-000000.tar"):
        prepare_cc12m([str(broken)], captions, tmp_path / "out")


def test_truncated_input_shard_fails_without_leaving_an_output(tmp_path):
    image_dir = write_fake_cc12m(tmp_path)
    shard = sorted(image_dir.glob("*.tar"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    output = tmp_path / "joined"
    with pytest.raises(UserError, match=shard.name):
        prepare_cc12m([str(image_dir)], str(write_caption_parquet(tmp_path)), output)
    assert [p.name for p in output.iterdir()] == ["cc12m-train-000000.tar"]
    with tarfile.open(output / "cc12m-train-000000.tar") as archive:
        assert len(archive.getnames()) == 3 * SAMPLES_PER_SHARD


def test_cli_prepare_and_bad_path(monkeypatch, tmp_path, capsys):
    import unimm.cli

    monkeypatch.setattr(unimm.cli, "COMMAND_MODULES", ("unimm.cli.data_command",))
    image_dir = write_fake_cc12m(tmp_path)
    captions = str(write_caption_parquet(tmp_path))
    arguments = [
        "data",
        "prepare-cc12m",
        "--images",
        str(image_dir),
        "--captions",
        captions,
        "-o",
        str(tmp_path / "o"),
    ]
    assert unimm.cli.main(arguments) == 0
    assert "2 shards written" in capsys.readouterr().out

    code = unimm.cli.main(
        [
            "data",
            "prepare-cc12m",
            "--images",
            str(image_dir),
            "--captions",
            "/no/such/table",
            "-o",
            str(tmp_path / "o2"),
        ]
    )
    error = capsys.readouterr().err
    assert code == 2
    assert error.count("\n") == 1 and error.startswith("unimm data prepare-cc12m: error: ")
    assert "/no/such/table" in error

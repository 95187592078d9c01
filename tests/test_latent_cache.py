"""Latent caching: written latents equal the tokenizer's, captions survive, the resumable loader reads the
cache and resumes exactly, an interrupted write continues, corrupt source samples are skipped and counted."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from data.config import DataConfig
from data.datasets import EditDataset, TextToImageDataset, sample_rng
from data.latent_cache import LatentCacheDataset, is_latent_cache, write_latent_cache
from data.loader import ResumableLoader
from data.shards import write_parquet_shards, write_webdataset_shards
from tests.tokenizer_fixtures import tiny_config
from tokenizer.model import SemanticAutoencoder
from unimm.errors import UserError

SIZE = 32  # the tiny tokenizer's image_size


def png(seed: int, size: tuple[int, int] = (SIZE, SIZE)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tokenizer_dir(encoders, shapes, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    torch.manual_seed(0)
    model = SemanticAutoencoder.build(tiny_config("mini-psvae", encoders, shapes, directory / "run").model).eval()
    model.save_pretrained(directory / "saved")
    return directory / "saved"


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return SemanticAutoencoder.from_pretrained(tokenizer_dir)


# Source sample -> expected skip reason (None: good).
def t2i_records() -> tuple[list[dict], dict[str, str]]:
    records, bad = [], {}
    for i in range(22):
        record = {"__key__": f"s{i:03d}", "png": png(i), "txt": f"short caption {i}"}
        if i % 3 == 0:
            record["json"] = {"caption_llava": f"a long description of picture {i}", "other": 1}
        records.append(record)
    records[4]["png"] = b""  # empty image
    bad["s004"] = "empty image"
    records[9]["png"] = b"not an image"
    bad["s009"] = "undecodable image"
    del records[13]["txt"]  # no json either (13 % 3 != 0): missing caption
    bad["s013"] = "missing caption"
    del records[15]["txt"]  # json caption only: still good
    return records, bad


@pytest.fixture
def t2i_config(tmp_path) -> DataConfig:
    records, _ = t2i_records()
    write_webdataset_shards(records, tmp_path / "src", samples_per_shard=10)
    return DataConfig(
        shards=[str(tmp_path / "src")], resolution=SIZE, caption_fields=["txt", "json.caption_llava"],
        batch_size=4, drop_last=False, shuffle_window=2, seed=3,
    )


def expected_candidates(record: dict) -> list[str]:
    captions = [record["txt"]] if "txt" in record else []
    if "json" in record:
        captions.append(record["json"]["caption_llava"])
    return captions


# ----------------------------------------------------------------------------------------------------
def test_cached_latents_equal_encode_and_every_caption_is_kept(tokenizer, t2i_config, tmp_path):
    out = tmp_path / "cache"
    manifest = write_latent_cache(tokenizer, t2i_config, out, shard_size=8, batch_size=5, progress=False)
    records, bad = t2i_records()
    good = [record for record in records if record["__key__"] not in bad]

    assert is_latent_cache(out) and not is_latent_cache(tmp_path / "src")
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["kind"] == "text_to_image" and manifest["dtype"] == "float32"
    assert manifest["num_samples"] == len(good) == 19
    assert manifest["latent_shape"] == list(tokenizer.latent_shape)
    assert manifest["skipped"] == {"empty image": 1, "undecodable image": 1, "missing caption": 1}
    assert [entry["count"] for entry in manifest["shards"]] == [7, 6, 6]  # source 0-7, 8-15, 16-21
    assert [entry["name"] for entry in manifest["shards"]] == ["shard-00000", "shard-00001", "shard-00002"]
    assert len(manifest["source"]["shards"]) == 3 and manifest["tokenizer"] is None
    assert (out / "shard-00001.safetensors").is_file() and (out / "shard-00001.json").is_file()
    assert not list(out.glob(".*.tmp")) and not list(out.glob("*.pkl"))

    cache = LatentCacheDataset(out, seed=3)
    source = TextToImageDataset(t2i_config)
    keys = [record["__key__"] for record in records]
    assert len(cache) == len(good)
    images, cached = [], []
    for sample_id, record in enumerate(good):
        item = cache[sample_id]
        assert item["key"] == record["__key__"]
        assert cache.candidates(sample_id) == expected_candidates(record)
        assert item["caption"] in expected_candidates(record)
        assert item["latent"].dtype == torch.float32 and item["latent"].shape == tokenizer.latent_shape
        images.append(source[keys.index(record["__key__"])]["image"])
        cached.append(item["latent"])
    with torch.no_grad():
        reference = tokenizer.encode(torch.stack(images))  # raw, not normalised
    torch.testing.assert_close(torch.stack(cached), reference, atol=1e-5, rtol=1e-4)


def test_caption_choice_is_seeded_per_epoch_and_sample(tokenizer, t2i_config, tmp_path):
    write_latent_cache(tokenizer, t2i_config, tmp_path / "cache", shard_size=8, progress=False)
    first, second = LatentCacheDataset(tmp_path / "cache", seed=3), LatentCacheDataset(tmp_path / "cache", seed=3)
    two = [i for i in range(len(first)) if len(first.candidates(i)) == 2]
    assert len(two) >= 4
    for epoch in range(6):
        for sample_id in two:
            caption = first[(epoch, sample_id)]["caption"]
            assert caption == second[(epoch, sample_id)]["caption"]
            candidates = first.candidates(sample_id)
            assert caption == candidates[int(sample_rng(3, epoch, sample_id).integers(len(candidates)))]
    # The draw changes with the epoch, so across epochs both candidates of a sample are used.
    assert all(len({first[(epoch, i)]["caption"] for epoch in range(12)}) == 2 for i in two)
    assert first[5]["caption"] == first[(0, 5)]["caption"]


def test_resumable_loader_over_the_cache_resumes_exactly(tokenizer, t2i_config, tmp_path):
    write_latent_cache(tokenizer, t2i_config, tmp_path / "cache", shard_size=8, progress=False)
    cache = LatentCacheDataset(tmp_path / "cache", seed=t2i_config.seed)
    full = list(ResumableLoader(cache, t2i_config, infinite=False))
    assert [len(batch["key"]) for batch in full] == [4, 4, 4, 4, 3]
    assert full[0]["latent"].shape == (4, *tokenizer.latent_shape) and len(full[0]["caption"]) == 4
    assert sorted(key for batch in full for key in batch["key"]) == sorted(cache[i]["key"] for i in range(len(cache)))
    assert [key for batch in full for key in batch["key"]] != [cache[i]["key"] for i in range(len(cache))]  # shuffled

    interrupted = ResumableLoader(cache, t2i_config)
    iterator = iter(interrupted)
    head = [next(iterator) for _ in range(2)]
    state = json.loads(json.dumps(interrupted.state_dict()))  # plain data only
    resumed = ResumableLoader(LatentCacheDataset(tmp_path / "cache", seed=t2i_config.seed), t2i_config)
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert len(head) + len(tail) == len(full)
    for left, right in zip(full, head + tail):
        assert left["key"] == right["key"] and left["caption"] == right["caption"]
        assert torch.equal(left["latent"], right["latent"])
    assert resumed.skip_report()["delivered"] == 19


def test_rerun_skips_finished_shards_and_continues_an_interrupted_write(tokenizer, t2i_config, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    reference = write_latent_cache(tokenizer, t2i_config, tmp_path / "reference", shard_size=8, batch_size=4, progress=False)

    calls = []
    original = tokenizer.encode

    def failing_encode(images):
        calls.append(len(images))
        if len(calls) == 3:  # shard 0 takes two calls (4 + 3); fail inside shard 1
            raise KeyboardInterrupt
        return original(images)

    monkeypatch.setattr(tokenizer, "encode", failing_encode)
    with pytest.raises(KeyboardInterrupt):
        write_latent_cache(tokenizer, t2i_config, out, shard_size=8, batch_size=4, progress=False)
    partial = json.loads((out / "manifest.json").read_text())
    assert not partial["complete"] and [entry["name"] for entry in partial["shards"]] == ["shard-00000"]
    assert not list(out.glob(".*.tmp"))
    with pytest.raises(UserError, match="incomplete.*cache-latents"):
        LatentCacheDataset(out)

    first_shard = (out / "shard-00000.safetensors").stat().st_mtime_ns
    calls.clear()
    monkeypatch.setattr(tokenizer, "encode", lambda images: (calls.append(len(images)), original(images))[1])
    manifest = write_latent_cache(tokenizer, t2i_config, out, shard_size=8, batch_size=4, progress=False)
    assert sum(calls) == 12  # only shards 1 and 2 (6 + 6 good samples) were encoded again
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == first_shard
    assert manifest["complete"] and manifest["shards"] == reference["shards"] and manifest["skipped"] == reference["skipped"]

    calls.clear()
    again = write_latent_cache(tokenizer, t2i_config, out, shard_size=8, batch_size=4, progress=False)
    assert calls == [] and again == manifest  # idempotent
    (out / "shard-00001.json").unlink()  # a listed shard whose files are gone is written again
    write_latent_cache(tokenizer, t2i_config, out, shard_size=8, batch_size=4, progress=False)
    assert sum(calls) == 6
    cache, expected = LatentCacheDataset(out), LatentCacheDataset(tmp_path / "reference")
    for i in range(len(expected)):
        assert cache[i]["key"] == expected[i]["key"] and torch.allclose(cache[i]["latent"], expected[i]["latent"], atol=1e-5)

    with pytest.raises(UserError, match="different dtype"):
        write_latent_cache(tokenizer, t2i_config, out, shard_size=8, dtype="float16", progress=False)


def test_half_precision_cache_reads_back_as_float32(tokenizer, t2i_config, tmp_path):
    write_latent_cache(tokenizer, t2i_config, tmp_path / "full", shard_size=64, progress=False)
    manifest = write_latent_cache(tokenizer, t2i_config, tmp_path / "half", shard_size=64, dtype="bfloat16", progress=False)
    assert manifest["dtype"] == "bfloat16" and len(manifest["shards"]) == 1
    full, half = LatentCacheDataset(tmp_path / "full"), LatentCacheDataset(tmp_path / "half")
    assert half[0]["latent"].dtype == torch.float32
    torch.testing.assert_close(half[0]["latent"], full[0]["latent"].bfloat16().float())


def test_edit_cache_keeps_both_latents_every_instruction_and_the_task(tokenizer, tmp_path):
    rows = [
        {
            "omni_edit_id": f"edit-{i:03d}",
            "task": "add" if i % 2 else "swap",
            "src_img": png(100 + i, (40, SIZE)),
            "edited_img": png(200 + i),
            "edited_prompt_list": [f"add a hat {i}", f"put a hat on it {i}"] if i != 3 else [],
        }
        for i in range(7)
    ]
    write_parquet_shards(rows, tmp_path / "edit", rows_per_shard=4)
    config = DataConfig(format="parquet", kind="edit", shards=[str(tmp_path / "edit")], resolution=SIZE, batch_size=2, drop_last=False)
    manifest = write_latent_cache(tokenizer, config, tmp_path / "cache", shard_size=4, batch_size=2, progress=False)
    assert manifest["kind"] == "edit" and manifest["num_samples"] == 6 and manifest["skipped"] == {"missing instruction": 1}

    cache, source = LatentCacheDataset(tmp_path / "cache"), EditDataset(config)
    item = cache[(2, 4)]  # source row 5
    assert set(item) == {"source_latent", "edited_latent", "instruction", "task", "key"}
    assert item["key"] == "edit-005" and item["task"] == "add" and item["instruction"] in rows[5]["edited_prompt_list"]
    assert cache.candidates(4) == rows[5]["edited_prompt_list"]
    with torch.no_grad():
        expected = tokenizer.encode(torch.stack([source[5]["source_image"], source[5]["edited_image"]]))
    torch.testing.assert_close(torch.stack([item["source_latent"], item["edited_latent"]]), expected, atol=1e-5, rtol=1e-4)
    batches = list(ResumableLoader(cache, config))
    assert [len(batch["key"]) for batch in batches] == [2, 2, 2]
    assert batches[0]["edited_latent"].shape == (2, *tokenizer.latent_shape)


def test_missing_or_broken_manifest_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not a latent cache.*cache-latents"):
        LatentCacheDataset(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="unreadable.*cache-latents"):
        LatentCacheDataset(tmp_path)
    (tmp_path / "manifest.json").write_text('{"shards": []}')
    with pytest.raises(UserError, match="not a unimm latent cache"):
        LatentCacheDataset(tmp_path)


# ----------------------------------------------------------------------------------------------------
@pytest.fixture
def cache_cli(monkeypatch):
    """``unimm.cli.main`` with only this command registered (other commands may be in progress)."""
    import unimm.cli

    monkeypatch.setattr(unimm.cli, "COMMAND_MODULES", ("unimm.cli.cache_command",))
    return unimm.cli.main


def test_cli_caches_the_shapes_dataset(cache_cli, tokenizer_dir, shapes, tmp_path, capsys):
    out = tmp_path / "cache"
    code = cache_cli([
        "cache-latents", "--tokenizer", str(tokenizer_dir), "--data", str(shapes / "t2i" / "train"), "-o", str(out),
        "--shard-size", "32", "--batch-size", "16", "--dtype", "float16", "--device", "cpu",
        "caption_fields=[txt,json.caption_llava]",
    ])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "cache: 48 samples in 2 shards (latent " in captured.out and "0 skipped" in captured.out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resolution"] == 32 and manifest["dtype"] == "float16"
    assert manifest["tokenizer"] == str(tokenizer_dir.resolve())
    cache = LatentCacheDataset(out)
    assert len(cache) == 48 and len(cache.candidates(0)) == 2

    code = cache_cli(["cache-latents", "--tokenizer", str(tmp_path / "nothing"), "--data", str(shapes), "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 2 and captured.err.count("\n") == 1
    assert captured.err.startswith("unimm cache-latents: error: ") and "Traceback" not in captured.err

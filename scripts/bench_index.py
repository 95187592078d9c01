"""Benchmark: building the shard index by scanning tar headers vs from the per-shard cache.

Writes synthetic webdataset shards (small members, so the scan cost is dominated by headers, as with
real shards whose image bytes are skipped by seeking), then times ShardIndex.build three ways in one run
and prints the ratios against the uncached header scan; Python's tarfile listing is timed as a reference.

    python scripts/bench_index.py --shards 32 --samples-per-shard 2000
"""

from __future__ import annotations

import argparse
import tarfile
import tempfile
import time
from pathlib import Path

from data.config import DataConfig
from data.index import ShardIndex
from data.shards import write_webdataset_shards


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=32)
    parser.add_argument("--samples-per-shard", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workspace:
        root = Path(workspace)
        samples = (
            {"__key__": f"{i:09d}", "jpg": b"\xff" * 64, "txt": "a caption", "json": {"url": f"u{i}"}}
            for i in range(args.shards * args.samples_per_shard)
        )
        write_webdataset_shards(samples, root / "shards", samples_per_shard=args.samples_per_shard)
        base = DataConfig(shards=[str(root / "shards")])
        no_cache = DataConfig(**{**base.__dict__, "index_cache_dir": ""})
        cold = timed(lambda: ShardIndex.build(no_cache))
        with_cache = DataConfig(**{**base.__dict__, "index_cache_dir": str(root / "cache")})
        first = timed(lambda: ShardIndex.build(with_cache))
        cached = timed(lambda: ShardIndex.build(with_cache))
        reference = timed(lambda: [len(tarfile.open(path).getmembers()) for path in sorted((root / "shards").glob("*.tar"))])
    total = args.shards * args.samples_per_shard
    print(f"{args.shards} shards x {args.samples_per_shard} samples = {total} samples")
    print(f"Python tarfile listing (reference) : {reference:7.3f} s  ({reference / cold:5.2f}x the baseline)")
    print(f"header scan, no cache (baseline)   : {cold:7.3f} s")
    print(f"header scan + writing the cache    : {first:7.3f} s  ({cold / first:5.2f}x)")
    print(f"cached build                       : {cached:7.3f} s  ({cold / cached:5.2f}x faster)")


if __name__ == "__main__":
    main()

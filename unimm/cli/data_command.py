"""``unimm data``: prepare and check training data.

``unimm data prepare-cc12m --images DIR_OR_GLOB --captions PATH -o OUT``
    join pixparse/cc12m-wds shards with the CaptionEmporium LLaVA-NeXt captions (resumable).
``unimm data inspect [SHARDS...] [--config data.yaml] [key=value ...]``
    count shards and samples, show the first sample's fields, read everything once and report skips.
"""

from __future__ import annotations

import argparse

from unimm.cli.arguments import IntermixedArgumentParser


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data",
        help="prepare and check training data",
        description="Prepare and check training data shards.",
    )
    actions = parser.add_subparsers(
        dest="action", metavar="ACTION", title="actions", parser_class=IntermixedArgumentParser
    )
    actions.required = True

    prepare = actions.add_parser(
        "prepare-cc12m",
        help="join cc12m-wds image shards with LLaVA-NeXt recaptions",
        description=(
            "Join pixparse/cc12m-wds webdataset shards with the CaptionEmporium/conceptual-captions-"
            "cc12m-llavanext caption table. Each output shard keeps its members and gains the captions "
            "in its json member (train with caption_fields=[json.caption_llava,json.caption_llava_short,txt]). "
            "Existing output shards are skipped, so an interrupted run can simply be restarted."
        ),
    )
    prepare.add_argument(
        "--images",
        required=True,
        nargs="+",
        metavar="DIR_OR_GLOB",
        help="cc12m-wds .tar shards, directories or globs",
    )
    prepare.add_argument(
        "--captions",
        required=True,
        metavar="PATH",
        help="caption table: parquet/jsonl(.gz) file, directory or glob",
    )
    prepare.add_argument(
        "-o", "--output", required=True, metavar="OUT", help="directory for the joined shards"
    )
    prepare.add_argument(
        "--workers", type=int, default=1, metavar="N", help="shards joined in parallel (default 1)"
    )
    prepare.add_argument(
        "--caption-key-column",
        default="url",
        metavar="COLUMN",
        help="join key column of the caption table (default url)",
    )
    prepare.add_argument(
        "--shard-key",
        default="json.url",
        metavar="FIELD",
        help="join key in the image shards: __key__ or a dotted json field (default json.url)",
    )
    prepare.add_argument(
        "--caption-columns",
        nargs="+",
        default=["caption_llava", "caption_llava_short"],
        metavar="COLUMN",
        help="caption columns copied into the json member (default caption_llava caption_llava_short)",
    )
    prepare.add_argument(
        "--drop-unmatched",
        action="store_true",
        help="leave out samples without a caption instead of keeping them",
    )
    prepare.set_defaults(handler=run_prepare_cc12m)

    inspect = actions.add_parser(
        "inspect",
        help="count, show and read a dataset once, reporting skipped samples",
        description=(
            "Index the shards, print the number of shards and samples and the first sample's fields, then "
            "read the whole dataset once through the training loader and print the skip summary. "
            "Positional arguments containing '=' are data config overrides (e.g. format=parquet); the "
            "others are shard files, directories or globs (replacing data.shards)."
        ),
    )
    inspect.add_argument("items", nargs="*", metavar="SHARDS_OR_KEY=VALUE")
    inspect.add_argument(
        "--config", action="append", default=[], metavar="YAML", help="data config delta file(s)"
    )
    inspect.set_defaults(handler=run_inspect)


def run_prepare_cc12m(args: argparse.Namespace) -> int:
    from data.prepare_cc12m import prepare_cc12m

    report = prepare_cc12m(
        images=args.images,
        captions=args.captions,
        output=args.output,
        workers=args.workers,
        caption_key_column=args.caption_key_column,
        shard_key=args.shard_key,
        caption_columns=args.caption_columns,
        drop_unmatched=args.drop_unmatched,
    )
    print(report.summary())
    return 0


def _inspect_config(args: argparse.Namespace):
    from data.config import DataConfig
    from unimm.config import build_config

    overrides = [item for item in args.items if "=" in item]
    shards = [item for item in args.items if "=" not in item]
    # Accept keys written as in a full run config ("data.format=parquet") as well as bare ones.
    overrides = [item[len("data.") :] if item.startswith("data.") else item for item in overrides]
    config = build_config(DataConfig, args.config, overrides)
    if shards:
        config.shards = shards
    return config


def _describe_field(value) -> str:
    if isinstance(value, (bytes, bytearray)):
        return f"{len(value)} bytes"
    if isinstance(value, str):
        return f"text, {len(value)} chars"
    if value is None:
        return "null"
    return type(value).__name__


def run_inspect(args: argparse.Namespace) -> int:
    import dataclasses

    from data.datasets import build_dataset
    from data.decode import CorruptSample
    from data.index import ShardIndex
    from data.loader import ResumableLoader

    config = _inspect_config(args)
    index = ShardIndex.build(config)
    print(f"shards: {len(index.shards)} ({config.format}), samples: {index.num_samples}")
    for path in index.truncated_shards:
        print(f"truncated shard: {path}")
    if index.num_samples:
        try:
            record = index.read_record(0)
            fields = ", ".join(
                f"{name} ({_describe_field(value)})" for name, value in record.items() if name != "__key__"
            )
            print(f"first sample: {record['__key__']}: {fields}")
        except CorruptSample as corrupt:
            print(f"first sample: unreadable ({corrupt.reason})")
    # Read everything once, in storage order, keeping the last partial batch.
    reading = dataclasses.replace(config, shuffle=False, drop_last=False)
    loader = ResumableLoader(build_dataset(reading, index), reading)
    for _ in loader:
        pass
    print(loader.summary())
    return 0

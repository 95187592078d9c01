"""``unimm cache-latents``: encode a dataset once with a frozen tokenizer, for generator training.

``unimm cache-latents --tokenizer DIR --data SHARDS[,SHARDS] -o OUT [--kind text_to_image|edit]
[--format webdataset|parquet] [--resolution R] [--shard-size N] [--batch-size N]
[--dtype float32|float16|bfloat16] [--config data.yaml] [key=value ...]``
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "cache-latents",
        help="pre-encode a dataset with a frozen tokenizer into latent shards",
        description=(
            "Read every good sample of the data shards in storage order (corrupt samples are skipped and "
            "counted), encode it with the tokenizer and write the raw latents as safetensors shards with "
            "JSON sidecars (every caption / instruction candidate kept) and a manifest.json. Started again "
            "with the same arguments, it continues after the last finished shard. Positional KEY=VALUE "
            "arguments are data config overrides, e.g. caption_fields=[txt,json.caption_llava]."
        ),
    )
    parser.add_argument("--tokenizer", required=True, metavar="DIR", help="a tokenizer save_pretrained directory")
    parser.add_argument(
        "--data",
        required=True,
        action="append",
        metavar="SHARDS",
        help="shard files, directories or globs, comma-separated (repeatable)",
    )
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="directory for the latent cache")
    parser.add_argument("--kind", choices=("text_to_image", "edit"), help="data kind (default: data.kind, text_to_image)")
    parser.add_argument("--format", choices=("webdataset", "parquet"), help="shard format (default: data.format, webdataset)")
    parser.add_argument(
        "--resolution", type=int, metavar="R", help="image resolution (default: the tokenizer's image_size)"
    )
    parser.add_argument("--shard-size", type=int, default=4096, metavar="N", help="samples per cache shard (default 4096)")
    parser.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per encode call (default 64)")
    parser.add_argument(
        "--dtype", choices=("float32", "float16", "bfloat16"), default="float32", help="stored latent dtype (default float32)"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--workers", type=int, metavar="N", help="decoding worker processes (default: data.num_workers)")
    parser.add_argument("--config", action="append", default=[], metavar="YAML", help="data config delta file(s)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted data config overrides")
    parser.set_defaults(handler=run_cache_latents)


def _data_config(args: argparse.Namespace, image_size: int):
    from data.config import DataConfig
    from unimm.config import build_config
    from unimm.errors import UserError

    stray = [item for item in args.overrides if "=" not in item]
    if stray:
        raise UserError(f"'{stray[0]}' is not a KEY=VALUE override; pass shards with --data")
    # Accept keys written as in a full run config ("data.caption_fields=...") as well as bare ones.
    overrides = [item[len("data.") :] if item.startswith("data.") else item for item in args.overrides]
    config = build_config(DataConfig, args.config, overrides)
    shards = [part.strip() for item in args.data for part in item.split(",") if part.strip()]
    if not shards:
        raise UserError("--data names no shards; pass shard files, directories or globs")
    config.shards = shards
    if args.kind:
        config.kind = args.kind
    if args.format:
        config.format = args.format
    if args.workers is not None:
        if args.workers < 0:
            raise UserError(f"--workers must be 0 or more, got {args.workers}")
        config.num_workers = args.workers
    resolution = args.resolution if args.resolution is not None else image_size
    if resolution < 1:
        raise UserError(f"--resolution must be positive, got {resolution}")
    config.resolution = resolution
    return config


def run_cache_latents(args: argparse.Namespace) -> int:
    import torch

    from data.latent_cache import write_latent_cache
    from data.loader import format_skip_summary
    from tokenizer.model import SemanticAutoencoder
    from unimm.errors import UserError

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device '{args.device}' is not a torch device; pass cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but no CUDA device is available; pass --device cpu")
    tokenizer = SemanticAutoencoder.from_pretrained(args.tokenizer)
    config = _data_config(args, tokenizer.config.image_size)
    manifest = write_latent_cache(
        tokenizer,
        config,
        args.output,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=device,
        progress=True,
        tokenizer_path=args.tokenizer,
    )
    shape = "x".join(str(size) for size in manifest["latent_shape"] or [])
    print(
        f"cache: {manifest['num_samples']} samples in {len(manifest['shards'])} shards "
        f"(latent {shape}, {manifest['dtype']}) -> {args.output}"
    )
    print(format_skip_summary(manifest["num_samples"], manifest["skipped"]))
    sys.stdout.flush()
    return 0

"""``unimm eval``: benchmarks and metrics. Tokenizers: ``recon`` (PSNR, SSIM, LPIPS, rFID and the noise-robustness
curve) and ``linprobe`` (linear-probe accuracy of a tokenizer's latent or an encoder's features), here.
Generators: ``shapes``, ``geneval``, ``dpg``, ``gedit``, ``editreward``, each in its module of EVAL_ACTION_MODULES."""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from pathlib import Path
from typing import Any

from unimm.cli.arguments import IntermixedArgumentParser
from unimm.errors import UserError

PREPROCESSING = "shorter side resized (bicubic, antialiased) to the resolution, center crop, pixels in [-1, 1]"


# Benchmark harnesses, each in its own module with `register_actions(actions)`.
EVAL_ACTION_MODULES = (
    "unimm.cli.eval_shapes_command",
    "unimm.cli.eval_geneval_command",
    "unimm.cli.eval_vlm_command",
)


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="benchmarks: GenEval, DPG-Bench, GEdit-Bench, EditReward, the Shapes suite; tokenizer reconstruction and linear probes")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", title="actions", parser_class=IntermixedArgumentParser)
    actions.required = True
    for module in EVAL_ACTION_MODULES:
        importlib.import_module(module).register_actions(actions)

    recon = actions.add_parser("recon", help="reconstruction metrics and the noise-robustness curve of a saved tokenizer")
    recon.add_argument("--tokenizer", required=True, help="a SemanticAutoencoder save_pretrained directory")
    recon.add_argument("--data", required=True, nargs="+", help="a folder of images, or webdataset/parquet shards (files, directories, globs)")
    recon.add_argument("--resolution", type=int, help="evaluation resolution (default: the tokenizer's image_size)")
    recon.add_argument("--batch-size", type=int, default=32)
    recon.add_argument("--max-images", type=int, help="stop after this many images (default: all)")
    recon.add_argument("--noise-sigmas", default="0", help="comma list of latent noise stds, e.g. 0,0.1,0.2 (default 0)")
    recon.add_argument("--seed", type=int, default=0, help="seed of the latent noise")
    fid = recon.add_mutually_exclusive_group()
    fid.add_argument("--inception-weights", help="Inception-v3 .pth (pytorch-fid's pt_inception-2015-12-05 or torchvision's); default: $UNIMM_INCEPTION_WEIGHTS or the torch hub cache")
    fid.add_argument("--no-fid", action="store_true", help="skip rFID")
    lpips = recon.add_mutually_exclusive_group()
    lpips.add_argument("--lpips-weights", help="ImageNet VGG16 weights for LPIPS; default: the PerceptualLoss search path")
    lpips.add_argument("--no-lpips", action="store_true", help="skip LPIPS")
    recon.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    recon.add_argument("--num-workers", type=int, default=0, help="image decoding worker processes")
    recon.add_argument("--out", help="write the results as JSON here")
    recon.set_defaults(handler=run_recon)


    probe = actions.add_parser("linprobe", help="linear-probe accuracy of tokenizer latents or encoder features")
    source = probe.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokenizer", help="a SemanticAutoencoder save_pretrained directory (probes its latent)")
    source.add_argument("--encoder", help="a representation encoder: local save_pretrained directory or hub id (probes its patch features)")
    probe.add_argument("--train", required=True, nargs="+", help="training images: folder or shards")
    probe.add_argument("--val", required=True, nargs="+", help="validation images: folder or shards")
    probe.add_argument("--pool", default="flatten,gap", help="comma list of flatten, gap (default both)")
    probe.add_argument("--targets", default="auto", help="count,color,shape (Shapes scene graphs), cls (a class field), or auto")
    probe.add_argument("--label-field", default="cls", help="field holding the class for --targets cls (dotted names read JSON members)")
    probe.add_argument("--resolution", type=int, help="input resolution (default: the tokenizer's or encoder's image size)")
    probe.add_argument("--batch-size", type=int, default=32)
    probe.add_argument("--max-train", type=int, help="use at most this many training images")
    probe.add_argument("--max-val", type=int, help="use at most this many validation images")
    probe.add_argument("--epochs", type=int, default=50, help="L-BFGS iterations per fit (default 50)")
    probe.add_argument("--seed", type=int, default=0, help="seed of the held-out split that picks the weight decay")
    probe.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    probe.add_argument("--num-workers", type=int, default=0, help="image decoding worker processes")
    probe.add_argument("--out", help="write the results as JSON here")
    probe.set_defaults(handler=run_linprobe)


# ----------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------
def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{error.__class__.__name__}: {text[:300]}" if text else error.__class__.__name__


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device '{name}' is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for a GPU but CUDA is not available; use --device cpu")
    return device


def _split_list(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in items if item not in allowed]
    if not items or unknown:
        raise UserError(f"{flag} takes a comma list of {', '.join(allowed)}; got '{text}'")
    return list(dict.fromkeys(items))


def _parse_sigmas(text: str) -> list[float]:
    try:
        sigmas = [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise UserError(f"--noise-sigmas takes a comma list of numbers, e.g. 0,0.1,0.2; got '{text}'") from None
    if not sigmas or any(not math.isfinite(sigma) or sigma < 0 for sigma in sigmas):
        raise UserError(f"--noise-sigmas must be finite numbers >= 0, e.g. 0,0.1,0.2; got '{text}'")
    return sigmas


def _check_positive(value: int | None, flag: str) -> None:
    if value is not None and value < 1:
        raise UserError(f"{flag} must be at least 1, got {value}")


def _load_tokenizer(directory: str):
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise UserError(f"tokenizer directory '{directory}' does not exist; pass a SemanticAutoencoder save_pretrained directory")
    try:
        from tokenizer.model import SemanticAutoencoder
    except ImportError as error:
        raise UserError(f"the tokenizer model is not available in this installation ({_one_line(error)})") from None
    try:
        model = SemanticAutoencoder.from_pretrained(path)
    except UserError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise UserError(f"cannot load the tokenizer from '{directory}' ({_one_line(error)})") from None
    return model.eval().requires_grad_(False)


def _load_encoder(name: str):
    from tokenizer.encoders import RepresentationEncoder

    path = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or path.exists()
    if looks_local and not path.is_dir():
        raise UserError(f"encoder directory '{name}' does not exist; pass a save_pretrained directory or a hub id")
    try:
        encoder = RepresentationEncoder.from_pretrained(str(path) if looks_local else name)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        where = "directory" if looks_local else "hub id (not reachable offline?)"
        raise UserError(f"cannot load the representation encoder from {where} '{name}' ({_one_line(error)})") from None
    return encoder.eval().requires_grad_(False)


def _write_json(path: str, payload: dict) -> None:
    from unimm.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)


def _format(value: Any, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _report_skips(name: str, report: dict) -> None:
    if report["skipped_total"]:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(report["skipped"].items()))
        print(f"{name}: {report['delivered']} images used, {report['skipped_total']} skipped ({reasons})", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------
# recon
# ----------------------------------------------------------------------------------------------------
def run_recon(args: argparse.Namespace) -> int:
    sigmas = _parse_sigmas(args.noise_sigmas)
    for value, flag in ((args.batch_size, "--batch-size"), (args.max_images, "--max-images"), (args.resolution, "--resolution")):
        _check_positive(value, flag)
    from eval.image_sources import ImageSource, resolve_paths

    resolve_paths(args.data)  # a bad data path fails before any model is loaded
    if not Path(args.tokenizer).expanduser().is_dir():
        raise UserError(f"tokenizer directory '{args.tokenizer}' does not exist; pass a SemanticAutoencoder save_pretrained directory")
    device = _device(args.device)

    import torch

    from eval.fid import InceptionFeatures
    from eval.reconstruction import RECONSTRUCTION_CONVENTIONS, evaluate_reconstruction

    inception = None if args.no_fid else InceptionFeatures.from_file(args.inception_weights).to(device)
    perceptual = None
    if not args.no_lpips:
        try:
            from tokenizer.losses.perceptual import PerceptualLoss
        except ImportError as error:
            raise UserError(f"LPIPS is not available in this installation ({_one_line(error)}); pass --no-lpips") from None
        try:
            perceptual = PerceptualLoss(backbone_weights=args.lpips_weights).to(device)
        except UserError as error:
            raise UserError(f"{error}; on the command line: --lpips-weights FILE, or --no-lpips") from None
    model = _load_tokenizer(args.tokenizer).to(device)
    resolution = args.resolution or int(model.config.image_size)
    source = ImageSource(args.data, resolution, batch_size=args.batch_size, max_images=args.max_images, num_workers=args.num_workers)
    try:
        with torch.no_grad():
            result = evaluate_reconstruction(
                source.images(), model.encode, model.decode, perceptual=perceptual, fid_feature_extractor=inception,
                noise_sigmas=sigmas, generator_seed=args.seed, device=device,
            )
    except ValueError as error:  # e.g. a decoder that reconstructs another size than --resolution
        raise UserError(f"{error}; evaluate at the tokenizer's own resolution ({model.config.image_size}, the default)") from None
    report = source.report()
    _report_skips("data", report)
    if result["num_images"] == 0:
        raise UserError(f"no image could be read from {' '.join(args.data)} ({report['skipped_total']} skipped)")

    payload = {
        "command": "unimm eval recon",
        "tokenizer": str(args.tokenizer),
        "data": list(args.data),
        "protocol": {
            "resolution": resolution,
            "tokenizer_image_size": int(model.config.image_size),
            "preprocessing": PREPROCESSING,
            "num_images": result["num_images"],
            "max_images": args.max_images,
            "noise_sigmas": sigmas,
            "noise_seed": args.seed,
            "feature_network": inception.feature_network if inception is not None else None,
            "tf_fid_weights": inception.tf_fid_weights if inception is not None else None,
            "fid": inception.protocol() if inception is not None else None,
            "lpips": {"network": "lpips-vgg16", "backbone_weights": str(perceptual.weights_path) if getattr(perceptual, "weights_path", None) else None}
            if perceptual is not None else None,
            "conventions": RECONSTRUCTION_CONVENTIONS,
            "device": str(device),
        },
        "data_report": report,
        **result,
    }
    print(f"{result['num_images']} images at {resolution}px, latent {result['latent_shape']} (RMS {_format(result['latent_rms'], 4)}); "
          f"rFID features: {payload['protocol']['feature_network'] or 'off'}"
          + (" (not the TF-FID weights: not comparable with published rFID)" if inception is not None and not inception.tf_fid_weights else ""))
    print("| sigma | PSNR (dB) | SSIM | LPIPS | rFID |")
    print("|---|---|---|---|---|")
    for row in result["curve"]:
        print(f"| {row['sigma']:g} | {_format(row['psnr'], 3)} | {_format(row['ssim'], 4)} | {_format(row['lpips'], 4)} | {_format(row['rfid'], 3)} |")
    if args.out:
        _write_json(args.out, payload)
    return 0


# ----------------------------------------------------------------------------------------------------
# linprobe
# ----------------------------------------------------------------------------------------------------
SHAPES_TARGETS = ("count", "color", "shape")


def _collect(source, feature_fn, pools, device) -> tuple[dict, list[dict], list[str]]:
    """One pass: pooled features and every sample's metadata and key, in the same order."""
    from eval.linear_probe import extract_pooled_features

    metas: list[dict] = []
    keys: list[str] = []

    def images():
        for batch in source:
            metas.extend(batch["meta"])
            keys.extend(batch["key"])
            yield batch["image"]

    return extract_pooled_features(images(), feature_fn, pools, device=device), metas, keys


def _shapes_labels(metas: list[dict], keys: list[str], split: str) -> dict[str, list[int]]:
    from eval.image_sources import scene_from_metadata
    from eval.linear_probe import shapes_probe_targets

    labels: dict[str, list[int]] = {target: [] for target in SHAPES_TARGETS}
    for meta, key in zip(metas, keys):
        scene = scene_from_metadata(meta)
        if scene is None:
            raise UserError(f"{split} sample '{key}' has no Shapes scene graph (json.scene or scene); use --targets cls")
        for target, value in shapes_probe_targets(scene).items():
            labels[target].append(value)
    return labels


def run_linprobe(args: argparse.Namespace) -> int:
    pools = _split_list(args.pool, ("flatten", "gap"), "--pool")
    targets_text = args.targets.strip()
    if targets_text == "auto":
        targets = ["auto"]
    else:
        targets = _split_list(targets_text, (*SHAPES_TARGETS, "cls"), "--targets")
        if "cls" in targets and len(targets) > 1:
            raise UserError("--targets cls cannot be combined with the Shapes targets count, color, shape")
    for value, flag in ((args.batch_size, "--batch-size"), (args.max_train, "--max-train"), (args.max_val, "--max-val"),
                        (args.resolution, "--resolution"), (args.epochs, "--epochs")):
        _check_positive(value, flag)
    from eval.image_sources import ImageSource, resolve_paths, scene_from_metadata

    resolve_paths(args.train)
    resolve_paths(args.val)
    device = _device(args.device)

    import torch

    from eval.linear_probe import (
        HOLDOUT_FRACTION,
        WEIGHT_DECAY_GRID,
        class_value,
        encode_class_labels,
        fit_linear_probe,
        shapes_target_classes,
    )

    if args.tokenizer:
        model = _load_tokenizer(args.tokenizer).to(device)
        feature_fn, image_size = model.encode, int(model.config.image_size)
        model_record = {"tokenizer": str(args.tokenizer), "features": "tokenizer latent: encode() (posterior mean), (C, h, w)"}
    else:
        model = _load_encoder(args.encoder).to(device)
        feature_fn, image_size = model, int(model.image_size)
        model_record = {"encoder": str(args.encoder), "encoder_kind": model.kind, "features": "encoder patch features (D, h, w), CLS/registers dropped"}
    resolution = args.resolution or image_size

    sources = {
        "train": ImageSource(args.train, resolution, batch_size=args.batch_size, max_images=args.max_train, num_workers=args.num_workers),
        "val": ImageSource(args.val, resolution, batch_size=args.batch_size, max_images=args.max_val, num_workers=args.num_workers),
    }
    collected = {}
    with torch.no_grad():
        for split, source in sources.items():
            collected[split] = _collect(source, feature_fn, pools, device)
            _report_skips(split, source.report())
            if len(collected[split][1]) < 2:
                raise UserError(f"the {split} set gave {len(collected[split][1])} readable images; a probe needs at least 2")
    (train_features, train_metas, train_keys), (val_features, val_metas, val_keys) = collected["train"], collected["val"]

    if targets == ["auto"]:
        targets = list(SHAPES_TARGETS) if scene_from_metadata(train_metas[0]) is not None else ["cls"]
    label_sets: dict[str, tuple[list[int], list[int], int]] = {}
    if targets == ["cls"]:
        train_values = [class_value(meta, args.label_field) for meta in train_metas]
        val_values = [class_value(meta, args.label_field) for meta in val_metas]
        for values, keys, split in ((train_values, train_keys, "train"), (val_values, val_keys, "val")):
            missing = [key for key, value in zip(keys, values) if value is None]
            if missing:
                raise UserError(f"{len(missing)} {split} samples have no class in field '{args.label_field}' (first: '{missing[0]}'); pass --label-field")
        train_labels, val_labels, num_classes, _ = encode_class_labels(train_values, val_values)
        label_sets["cls"] = (train_labels, val_labels, num_classes)
    else:
        classes = shapes_target_classes()
        train_shapes = _shapes_labels(train_metas, train_keys, "train")
        val_shapes = _shapes_labels(val_metas, val_keys, "val")
        for target in targets:
            label_sets[target] = (train_shapes[target], val_shapes[target], classes[target])

    rows = []
    for target, (train_labels, val_labels, num_classes) in label_sets.items():
        counts = torch.bincount(torch.tensor(train_labels), minlength=num_classes)
        majority = int(counts.argmax())
        majority_accuracy = sum(label == majority for label in val_labels) / len(val_labels)
        for pool in pools:
            result = fit_linear_probe(
                train_features[pool], train_labels, val_features[pool], val_labels, num_classes,
                epochs=args.epochs, seed=args.seed, device=device,
            )
            rows.append({"target": target, "pool": pool, **result, "majority_val_accuracy": majority_accuracy})

    payload = {
        "command": "unimm eval linprobe",
        **model_record,
        "train": list(args.train),
        "val": list(args.val),
        "protocol": {
            "resolution": resolution,
            "preprocessing": PREPROCESSING,
            "num_train": len(train_keys),
            "num_val": len(val_keys),
            "pools": pools,
            "targets": list(label_sets),
            "label_field": args.label_field if "cls" in label_sets else None,
            "probe": "softmax regression on train-standardised features, full-batch L-BFGS, weight decay chosen on a held-out split of train",
            "weight_decay_grid": list(WEIGHT_DECAY_GRID),
            "holdout_fraction": HOLDOUT_FRACTION,
            "epochs": args.epochs,
            "seed": args.seed,
            "shapes_targets": "count = objects - 1; color/shape of the object with the largest rendered area (ties: top-most, then left-most)"
            if "cls" not in label_sets else None,
            "device": str(device),
        },
        "data_report": {split: source.report() for split, source in sources.items()},
        "results": rows,
    }
    print(f"{len(train_keys)} train / {len(val_keys)} val images at {resolution}px")
    print("| target | pool | classes | dim | train acc | val acc | majority | weight decay |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['target']} | {row['pool']} | {row['num_classes']} | {row['feature_dim']} | {row['train_accuracy']:.4f} | "
              f"{row['val_accuracy']:.4f} | {row['majority_val_accuracy']:.4f} | {row['weight_decay']:g} |")
    if args.out:
        _write_json(args.out, payload)
    return 0

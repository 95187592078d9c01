"""Safe decoding of one sample's raw fields: images that are checked before they are trusted, captions
looked up in plain or JSON fields.

Web-scale shards always hold some broken samples. Everything wrong with a single sample is reported as
a ``CorruptSample`` with a short, fixed reason string, so the loader can skip it and count skips by
reason; nothing here prints or logs.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from data.config import DataConfig

# Modes that convert to RGB without losing meaning. High-bit-depth and float modes ('I', 'I;16', 'F')
# have no agreed mapping to 8-bit RGB, so they are rejected rather than silently mis-scaled.
SUPPORTED_MODES = frozenset({"RGB", "RGBA", "L", "LA", "P", "CMYK", "YCbCr", "RGBX", "1"})

# Fixed reason strings: skip counts are keyed by them, tests and summaries compare them.
REASON_EMPTY = "empty image"
REASON_UNDECODABLE = "undecodable image"
REASON_TRUNCATED = "truncated image"
REASON_MODE = "unsupported mode"
REASON_TOO_SMALL = "image too small"
REASON_TOO_LARGE = "image too large"
REASON_ASPECT = "extreme aspect ratio"
REASON_MISSING_IMAGE = "missing image"
REASON_MISSING_CAPTION = "missing caption"
REASON_MISSING_INSTRUCTION = "missing instruction"
REASON_TRUNCATED_SHARD = "truncated shard"


class CorruptSample(Exception):
    """One sample cannot be used; ``reason`` is a short fixed phrase used to count skips."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def check_image_size(width: int, height: int, config: DataConfig) -> None:
    """Reject absurd sizes from the header alone, before any pixel is decoded."""
    if min(width, height) < config.min_image_side:
        raise CorruptSample(REASON_TOO_SMALL)
    if width * height > config.max_image_pixels:
        raise CorruptSample(REASON_TOO_LARGE)
    if max(width, height) > config.max_aspect_ratio * min(width, height):
        raise CorruptSample(REASON_ASPECT)


def decode_image(data: bytes | None, config: DataConfig) -> Image.Image:
    """Decode encoded image bytes to a fully loaded RGB image, or raise ``CorruptSample``."""
    if not data:
        raise CorruptSample(REASON_EMPTY)
    with warnings.catch_warnings():
        # Our own pixel limit applies; Pillow's bomb warning would only add noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            raise CorruptSample(REASON_TOO_LARGE) from None
        except Exception:
            raise CorruptSample(REASON_UNDECODABLE) from None
        check_image_size(image.width, image.height, config)
        if image.mode not in SUPPORTED_MODES:
            raise CorruptSample(REASON_MODE)
        try:
            # Lazy decoding would hide a truncated file until later; force it now. Truncated images
            # are never accepted (ImageFile.LOAD_TRUNCATED_IMAGES stays off).
            image.load()
        except Exception:
            raise CorruptSample(REASON_TRUNCATED) from None
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited on white (the usual background of product shots)."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


# ----------------------------------------------------------------------------------------------------
# Field lookup and text candidates
# ----------------------------------------------------------------------------------------------------
def parse_json(value: Any) -> Any:
    """A JSON member or column as Python data; ``None`` when it is not valid JSON."""
    if isinstance(value, (dict, list)):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return None
    return None


def lookup_field(record: dict[str, Any], name: str) -> Any:
    """``record[name]``, or for a dotted name such as ``json.caption_llava`` the key path inside the
    JSON member/column named by the longest present prefix. ``None`` when absent or unreadable."""
    if name in record:
        return record[name]
    parts = name.split(".")
    for split in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:split])
        if head not in record:
            continue
        node = parse_json(record[head])
        for part in parts[split:]:
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node
    return None


def text_candidates(value: Any) -> list[str]:
    """Non-empty strings held by a field: a string, UTF-8 bytes, or a list of those."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return []
    if isinstance(value, str):
        return [value.strip()] if value.strip() else []
    if isinstance(value, (list, tuple)):
        return [
            text for item in value for text in text_candidates(item) if not isinstance(item, (list, tuple))
        ]
    return []


def pick_text(record: dict[str, Any], fields: Sequence[str], rng: np.random.Generator, reason: str) -> str:
    """All candidates from ``fields`` pooled, one drawn with ``rng``; ``CorruptSample(reason)`` if none."""
    candidates = [text for name in fields for text in text_candidates(lookup_field(record, name))]
    if not candidates:
        raise CorruptSample(reason)
    return candidates[int(rng.integers(len(candidates)))]


def pick_caption(record: dict[str, Any], caption_fields: Sequence[str], rng: np.random.Generator) -> str:
    """One caption drawn from every non-empty candidate field; raises ``CorruptSample("missing caption")``."""
    return pick_text(record, caption_fields, rng, REASON_MISSING_CAPTION)

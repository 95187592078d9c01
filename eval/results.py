"""What every benchmark result file records, and the Markdown summary printed after a run.

A result file is JSON: the scores, plus `protocol` (judge id, prompt-file SHA-256, resolution, steps, cfg,
seeds, flags) so two numbers can be compared only when their protocols match.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_results(path: str | Path, scores: Mapping[str, Any], protocol: Mapping[str, Any], details: Any = None) -> Path:
    """Write {"scores", "protocol", "details"} atomically as JSON."""
    from unimm.atomic import atomic_write_text

    payload = {"scores": dict(scores), "protocol": dict(protocol)}
    if details is not None:
        payload["details"] = details
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(payload, indent=1, default=str) + "\n")
    return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; floats are printed with 4 significant decimals."""

    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)

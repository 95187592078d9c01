"""Training logs: TensorBoard scalars and images, a ``metrics.jsonl`` copy, and a tqdm progress bar.

Only the main process (rank 0) writes anything; on other ranks every method is a no-op, so trainers
can call the logger unconditionally. The JSONL file (one ``{"step": ..., "tag": value, ...}`` line per
``log_scalars`` call) is easy to read back in tests and scripts without TensorBoard.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from unimm.training.distributed import is_main_process


def _number(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        value = value.detach().float().mean().item()
    return float(value)


class TrainingLogger:
    """Log scalars/images to ``log_dir`` (TensorBoard event files + ``metrics.jsonl``) on rank 0.

    ``total_steps``/``initial_step`` size the progress bar (``initial_step`` > 0 after a resume).
    """

    def __init__(
        self,
        log_dir: str | os.PathLike | None,
        *,
        enabled: bool | None = None,
        total_steps: int | None = None,
        initial_step: int = 0,
        description: str = "train",
        progress: bool = True,
        tensorboard: bool = True,
    ):
        self.enabled = is_main_process() if enabled is None else bool(enabled)
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.writer = None
        self.metrics_file = None
        self.bar = None
        if not self.enabled:
            return
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(self.log_dir))
            self.metrics_file = open(self.log_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, desc=description, dynamic_ncols=True)

    # -- scalars ---------------------------------------------------------------------------------------
    def log_scalars(self, scalars: Mapping[str, Any], step: int) -> None:
        if not self.enabled:
            return
        values = {tag: _number(value) for tag, value in scalars.items()}
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
        if self.metrics_file is not None:
            record = {"step": int(step)}
            record.update({tag: (value if math.isfinite(value) else str(value)) for tag, value in values.items()})
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()

    def log_scalar(self, tag: str, value: Any, step: int) -> None:
        self.log_scalars({tag: value}, step)

    # -- images / text ---------------------------------------------------------------------------------
    def log_images(
        self, tag: str, images: torch.Tensor, step: int, value_range: tuple[float, float] = (-1.0, 1.0), nrow: int = 8
    ) -> None:
        """Log an image grid: a CHW grid, or an NCHW batch (tiled with ``torchvision.utils.make_grid``).

        Float images are mapped from ``value_range`` (default [−1, 1], our convention) to [0, 1]; uint8
        images are taken as they are.
        """
        if not self.enabled or self.writer is None:
            return
        images = images.detach().cpu()
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        else:
            low, high = value_range
            images = ((images.float() - low) / (high - low)).clamp(0.0, 1.0)
        if images.ndim == 4:
            from torchvision.utils import make_grid

            images = make_grid(images, nrow=nrow, padding=2)
        if images.ndim != 3:
            raise ValueError(f"log_images expects a CHW grid or an NCHW batch, got shape {tuple(images.shape)}")
        self.writer.add_image(tag, images, step, dataformats="CHW")

    def log_text(self, tag: str, text: str, step: int) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_text(tag, text, step)

    # -- progress bar ----------------------------------------------------------------------------------
    def progress(self, steps: int = 1, **postfix: Any) -> None:
        """Advance the progress bar by ``steps`` and show ``postfix`` (e.g. ``loss=0.12``)."""
        if self.bar is None:
            return
        if postfix:
            self.bar.set_postfix(
                {k: (f"{_number(v):.4g}" if isinstance(v, (int, float, torch.Tensor)) else v) for k, v in postfix.items()},
                refresh=False,
            )
        self.bar.update(steps)

    def write(self, message: str) -> None:
        """Print a line without breaking the progress bar (main process only)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    # -- lifetime --------------------------------------------------------------------------------------
    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()
        if self.metrics_file is not None:
            self.metrics_file.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.metrics_file is not None:
            self.metrics_file.close()
            self.metrics_file = None

    def __enter__(self) -> TrainingLogger:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def save_image_grid(images: torch.Tensor, path: Path, columns: int) -> None:
    """images (N, 3, H, W) in [-1, 1] -> one PNG grid, written atomically."""
    from torchvision.utils import save_image

    from unimm.atomic import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda temporary: save_image((images + 1) / 2, str(temporary), nrow=columns, format="png"))

"""Shape checks shared by the losses.

PyTorch's element-wise losses broadcast silently (with only a warning), so a (B, N, D) prediction
against a (B, 1, D) target would train on the wrong objective without failing. Every loss that
compares two tensors element-wise calls ``require_same_shape`` first.
"""

from __future__ import annotations

from torch import Tensor


def require_same_shape(loss_name: str, predicted: Tensor, target: Tensor) -> None:
    """Raise ``ValueError`` unless ``predicted`` and ``target`` have exactly the same shape."""
    if predicted.shape != target.shape:
        raise ValueError(
            f"{loss_name}: prediction shape {tuple(predicted.shape)} differs from "
            f"target shape {tuple(target.shape)}"
        )

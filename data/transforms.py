"""Image transforms shared by every dataset: the ImageNet / PS-VAE resize-then-center-crop protocol and
the conversion to the project's [-1, 1] pixel convention."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Resize the shorter side to ``resolution`` (bicubic, antialiased), then crop the center square."""
    width, height = image.size
    if (width, height) == (resolution, resolution):
        return image
    scale = resolution / min(width, height)
    # Rounding can fall one pixel short of the crop size on the longer side; never go below it.
    new_width = max(resolution, round(width * scale))
    new_height = max(resolution, round(height * scale))
    if (new_width, new_height) != (width, height):
        # Pillow's resize filters widen their support when shrinking, i.e. they antialias.
        image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    left = (new_width - resolution) // 2
    top = (new_height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def to_tensor_minus1_1(image: Image.Image) -> torch.Tensor:
    """An RGB image as a float32 tensor of shape (3, H, W) with values in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32)
    return tensor / 127.5 - 1.0

"""The d2l 14.2 transforms, sized and normalised for the backbone's pretrained weights.

The image becomes a uint8 tensor first: torchvision resizes uint8 tensors about 3x faster than PIL
does PIL images (BENCHMARKS.md, data pipeline), with the same crop parameters and antialiasing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2


def _normalized(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def train_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """RandomResizedCrop + horizontal flip (d2l's training augmentation)."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(image_size, antialias=True),
            v2.RandomHorizontalFlip(),
            *_normalized(mean, std),
        ]
    )


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Resize to a square 256/224 of the crop, then CenterCrop (d2l: Resize([256, 256]), CenterCrop(224))."""
    resize = round(image_size * 256 / 224)
    return v2.Compose(
        [v2.ToImage(), v2.Resize([resize, resize], antialias=True), v2.CenterCrop(image_size), *_normalized(mean, std)]
    )

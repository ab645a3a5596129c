"""The d2l 14.2 transforms, sized, interpolated and normalised as the backbone's pretrained weights expect.

The image becomes a uint8 tensor first: torchvision resizes uint8 tensors about 3x faster than PIL
does PIL images (BENCHMARKS.md, data pipeline), with the same crop parameters and antialiasing.
"""

from __future__ import annotations

import torch
from torchvision.transforms import InterpolationMode, v2

from finetune.models.backbones import InputConfig


def _pipeline(config: InputConfig, *resize_and_crop: v2.Transform) -> v2.Compose:
    """uint8 tensor -> resize and crop -> float, normalised with the weights' mean and std."""
    normalize = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(config.mean), list(config.std))]
    return v2.Compose([v2.ToImage(), *resize_and_crop, *normalize])


def train_transform(config: InputConfig) -> v2.Compose:
    """RandomResizedCrop + horizontal flip (d2l's training augmentation)."""
    interpolation = InterpolationMode(config.interpolation)
    crop = v2.RandomResizedCrop(config.image_size, interpolation=interpolation, antialias=True)
    return _pipeline(config, crop, v2.RandomHorizontalFlip())


def eval_transform(config: InputConfig) -> v2.Compose:
    """The short side resized to `config.resize`, then the centre crop (what the weights were evaluated with:
    256 -> 224 for ResNet-18, 232 -> 224 for torchvision's ResNet-50 and MobileNetV2 V2 weights)."""
    resize = v2.Resize(config.resize, interpolation=InterpolationMode(config.interpolation), antialias=True)
    return _pipeline(config, resize, v2.CenterCrop(config.image_size))

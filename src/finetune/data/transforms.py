"""The transforms, sized, interpolated and normalised as the backbone's pretrained weights expect: the eval
transform, the training augmentation presets (`data.augment`), random erasing, and MixUp/CutMix on batches.

The image becomes a uint8 tensor first: torchvision resizes uint8 tensors about 3x faster than PIL
does PIL images (BENCHMARKS.md, data pipeline), with the same crop parameters and antialiasing. Every
random choice draws from torch's default generator, which `finetune.data.sampling` seeds per sample
(and per batch for MixUp/CutMix).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms import InterpolationMode, v2

from finetune.models.backbones import InputConfig

# data.augment: the policy applied after d2l's RandomResizedCrop + flip (None: that alone); `none` = the eval transform
POLICIES: dict[str, Callable[..., v2.Transform] | None] = {
    "d2l": None,
    "trivialaugment": v2.TrivialAugmentWide,
    "randaugment": v2.RandAugment,
}
AUGMENTATIONS = (*POLICIES, "none")
# What the boolean data.augment of older configs and checkpoints meant
LEGACY_AUGMENT = {True: "d2l", False: "none"}


def augmentation_name(augment: str | bool) -> str:
    """The preset's name; `true`/`false` (older configs and checkpoints) mean `d2l`/`none`."""
    return LEGACY_AUGMENT[augment] if isinstance(augment, bool) else augment


def _pipeline(config: InputConfig, *resize_and_crop: v2.Transform, erasing: float = 0.0) -> v2.Compose:
    """uint8 tensor -> resize and crop (and augment) -> float, normalised with the weights' mean and std,
    then random erasing with probability `erasing` (on the normalised image, as torchvision's references)."""
    normalize = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(config.mean), list(config.std))]
    erase = [v2.RandomErasing(p=erasing)] if erasing > 0 else []
    return v2.Compose([v2.ToImage(), *resize_and_crop, *normalize, *erase])


def _eval_resize_and_crop(config: InputConfig) -> list[v2.Transform]:
    resize = v2.Resize(config.resize, interpolation=InterpolationMode(config.interpolation), antialias=True)
    return [resize, v2.CenterCrop(config.image_size)]


def train_transform(config: InputConfig, augment: str | bool = "d2l", random_erasing: float = 0.0) -> v2.Compose:
    """d2l's RandomResizedCrop + horizontal flip, then the preset's policy (TrivialAugmentWide, RandAugment);
    with `none` the eval transform. `random_erasing` > 0 erases a random rectangle with that probability."""
    name = augmentation_name(augment)
    if name == "none":
        return _pipeline(config, *_eval_resize_and_crop(config), erasing=random_erasing)
    interpolation = InterpolationMode(config.interpolation)
    crop = v2.RandomResizedCrop(config.image_size, interpolation=interpolation, antialias=True)
    policy = POLICIES[name]
    # bilinear as torchvision's references: on tensors the policies' warps take only nearest or bilinear
    policies = [policy(interpolation=InterpolationMode.BILINEAR)] if policy else []
    return _pipeline(config, crop, v2.RandomHorizontalFlip(), *policies, erasing=random_erasing)


def eval_transform(config: InputConfig) -> v2.Compose:
    """The short side resized to `config.resize`, then the centre crop (what the weights were evaluated with:
    256 -> 224 for ResNet-18, 232 -> 224 for torchvision's ResNet-50 and MobileNetV2 V2 weights)."""
    return _pipeline(config, *_eval_resize_and_crop(config))


def batch_transform(mixup: float, cutmix: float, num_classes: int) -> v2.Transform | None:
    """MixUp and/or CutMix (their Beta alphas; 0 = off; both on: one of them per batch, at random) on
    `(images, labels)` batches, which become `(images, soft labels (N, num_classes))`; None when both are off."""
    mixes = [
        mix(alpha=alpha, num_classes=num_classes)
        for mix, alpha in ((v2.MixUp, mixup), (v2.CutMix, cutmix))
        if alpha > 0
    ]
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)

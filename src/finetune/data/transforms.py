"""The transforms, sized, interpolated and normalised as the backbone's pretrained weights expect: the eval
transform, the training augmentation presets (`data.augment`), random erasing, and MixUp/CutMix on batches.

The image becomes a uint8 tensor first: torchvision resizes uint8 tensors about 3x faster than PIL
does PIL images (BENCHMARKS.md, data pipeline), with the same crop parameters and antialiasing. Every
random choice draws from torch's default generator, which `finetune.data.sampling` seeds per sample
(and per batch for MixUp/CutMix). On a GPU the last two steps, to float and normalised, run on whole batches
there (`NormalizeBatch`): the loader's workers hand over uint8 images.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

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


def _pipeline(
    config: InputConfig, *resize_and_crop: v2.Transform, erasing: float = 0.0, normalize: bool = True
) -> v2.Compose:
    """uint8 tensor -> resize and crop (and augment) -> float, normalised with the weights' mean and std,
    then random erasing with probability `erasing` (on the normalised image, as torchvision's references).
    `normalize=False` stops at the uint8 image, for `NormalizeBatch` to finish whole batches."""
    if not normalize and erasing > 0:
        raise ValueError("random erasing works on normalised images: it cannot follow a normalisation of the batch")
    normalized = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(config.mean), list(config.std))]
    erase = [v2.RandomErasing(p=erasing)] if erasing > 0 else []
    return v2.Compose([v2.ToImage(), *resize_and_crop, *(normalized if normalize else []), *erase])


def _eval_resize_and_crop(config: InputConfig) -> list[v2.Transform]:
    resize = v2.Resize(config.resize, interpolation=InterpolationMode(config.interpolation), antialias=True)
    return [resize, v2.CenterCrop(config.image_size)]


def _random_crop(config: InputConfig) -> v2.RandomResizedCrop:
    """d2l's crop: torchvision's default area (8 % to all of the image) and aspect-ratio (3/4 to 4/3) ranges."""
    interpolation = InterpolationMode(config.interpolation)
    return v2.RandomResizedCrop(config.image_size, interpolation=interpolation, antialias=True)


def resized_from(side: int) -> int:
    """The short side to decode an image to (`read_rgb`'s `at_least`) before an antialiased resize to `side`:
    twice it, so that the resize still does the last halving at least: a 12 MP JPEG resized to 256 px is decoded
    at 1/4 size, and its eval image stays within 0.21 uint8 levels of the whole decode's on average (BENCHMARKS.md)."""
    return 2 * side


def decode_side(config: InputConfig, augment: str | bool = "none") -> int:
    """The short side an image is decoded to at least (`read_rgb`'s `at_least`) for the transform: the eval
    resize's `resized_from`, or for `train_transform`'s random crop the size over the side of its smallest crop
    (the smallest area at the narrowest aspect ratio: 0.245 of the short side, so 915 px for 224), so that no crop
    is ever enlarged; the crops are as often and as wide, each shrunk from fewer pixels."""
    if augmentation_name(augment) == "none":
        return resized_from(config.resize)
    crop = _random_crop(config)
    narrowest = min(crop.ratio[0], 1 / crop.ratio[1])
    return math.ceil(config.image_size / math.sqrt(crop.scale[0] * narrowest))


def train_transform(
    config: InputConfig, augment: str | bool = "d2l", random_erasing: float = 0.0, normalize: bool = True
) -> v2.Compose:
    """d2l's RandomResizedCrop + horizontal flip, then the preset's policy (TrivialAugmentWide, RandAugment);
    with `none` the eval transform. `random_erasing` > 0 erases a random rectangle with that probability.
    `normalize=False`: uint8 images, normalised on the training device (`NormalizeBatch`)."""
    name = augmentation_name(augment)
    if name == "none":
        return _pipeline(config, *_eval_resize_and_crop(config), erasing=random_erasing, normalize=normalize)
    crop = _random_crop(config)
    policy = POLICIES[name]
    # bilinear as torchvision's references: on tensors the policies' warps take only nearest or bilinear
    policies = [policy(interpolation=InterpolationMode.BILINEAR)] if policy else []
    return _pipeline(config, crop, v2.RandomHorizontalFlip(), *policies, erasing=random_erasing, normalize=normalize)


def eval_transform(config: InputConfig) -> v2.Compose:
    """The short side resized to `config.resize`, then the centre crop (what the weights were evaluated with:
    256 -> 224 for ResNet-18, 232 -> 224 for torchvision's ResNet-50 and MobileNetV2 V2 weights)."""
    return _pipeline(config, *_eval_resize_and_crop(config))


class NormalizeBatch:
    """Batches of uint8 images (N, 3, H, W), on whatever device they are, to the floats the per-image transform's
    last steps make: its arithmetic (x * (1/255) - mean) / std, so the same bits, with a quarter of the bytes
    to move from the loader's workers to the device and the device's arithmetic."""

    def __init__(self, config: InputConfig):
        self.mean = torch.tensor(config.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(config.std).view(1, 3, 1, 1)

    def images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images, or floats already scaled to [0, 1] (normalised in place)."""
        floats = TF.to_dtype(images, torch.float32, scale=True)
        if self.mean.device != floats.device:  # moved once, not a copy to the device every batch
            self.mean, self.std = self.mean.to(floats.device), self.std.to(floats.device)
        return floats.sub_(self.mean).div_(self.std)

    def __call__(self, batch: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        return self.images(images), labels


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

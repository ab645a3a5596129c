"""The decoded image store (`data.store=true`): every image of a split decoded once, kept as uint8 pixels.

Fine-tuning sets are small, yet each epoch decodes and resizes every JPEG again. The store decodes each image
once (upright, RGB, as `read_rgb`), resizes its short side to `side` px with the eval transform's interpolation
and antialiasing (the whole image: the training crop still reaches every part of it) and writes the pixels of
all of them, one after the other, into one file, memory-mapped when read, with an index of where each image
starts and its size. The names hash the files, their sizes and mtimes and the requested size, so an edited,
added or removed image gives a new store and a stale one is never read. With `side` = the eval transform's
resize (the default), the eval transform of a stored image gives exactly the pixels it gives of the file.

On a GPU the d2l augmentation (RandomResizedCrop + flip) runs on whole batches: each sample's crop box and flip
are drawn in the loader's workers under its own seed (`finetune.data.sampling`), so batches stay the same with
any number of workers, devices or a mid-epoch resume; the images of a batch are padded to its largest, and the
device crops and resizes every box in one `roi_align` (bilinear, averaging `ceil(box / output)` points per
output pixel, which antialiases as resize does), flips and normalises.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate
from torchvision.ops import roi_align
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from finetune.data.images import ImageFolder, files_key, forked_map, one_at_a_time, per_core, read_rgb
from finetune.data.transforms import NormalizeBatch, resized_from
from finetune.errors import ConfigError
from finetune.models.backbones import InputConfig

log = logging.getLogger(__name__)

FORMAT = "finetune-store-v3"  # part of every key: a changed layout (or decoding: v3) never reads an old file


def store_key(paths: Sequence[Path], size: int | None, config: InputConfig) -> str:
    """Every file's path, byte size and mtime in order, and what the stored pixels depend on: the requested side
    (None: the default rule, capped at the eval resize) and the interpolation."""
    return files_key(paths, FORMAT, size or f"at most {config.resize}", config.interpolation)


def _short_side(path: Path) -> int:
    with Image.open(path) as image:  # reads the header only
        return min(image.size)


def default_side(paths: Sequence[Path], resize: int) -> int:
    """The eval transform's resize, capped at the largest short side of the images (from their headers alone):
    upsampling before storing adds no information, only bytes (CIFAR-10 is stored at 32, not 256 px)."""
    return min(resize, max(forked_map(_short_side, paths, *per_core(len(paths)))))


def _resized(path: Path, side: int, interpolation: InterpolationMode) -> np.ndarray:
    """One image as the eval transform starts: (3, h, w) uint8, its short side resized to `side` (antialiased)."""
    image = TF.pil_to_tensor(read_rgb(path, at_least=resized_from(side)))
    return TF.resize(image, [side], interpolation=interpolation, antialias=True).numpy()


class _Part(NamedTuple):
    """Some consecutive images of a store, decoded by one process into a file of their own."""

    paths: Sequence[Path]
    side: int
    interpolation: InterpolationMode
    file: Path


def _decode_part(part: _Part) -> list[tuple[int, int]]:
    """Writes the part's images' pixels into `part.file`, one after the other; their heights and widths."""
    shapes = []
    with open(part.file, "wb") as out:
        for path in part.paths:
            image = _resized(path, part.side, part.interpolation)
            out.write(image.tobytes())
            shapes.append(image.shape[1:])
    return shapes


def build_store(paths: Sequence[Path], side: int, config: InputConfig, index_file: Path) -> None:
    """Decodes every image into `<key>.u8` (the pixels, image after image) and `index_file` (`<key>.npy`: each
    image's start, height and width), each written under a temporary name and renamed when whole, the index last,
    so that a reader (another DDP rank, a parallel run) never sees half a store. The images are decoded in a
    process per core (`forked_map`), each part into a file of its own, appended in order."""
    pixels_file = index_file.with_suffix(".u8")
    try:
        index_file.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # e.g. a checkpoint's store_dir, from the machine it was trained on
        folder = index_file.parent
        raise ConfigError(
            f"data.store_dir={folder} cannot be written ({err}): set data.store_dir= or data.store=false"
        ) from err
    free = shutil.disk_usage(index_file.parent).free
    needed = len(paths) * 3 * side * side  # at least: the square of each short side
    if needed > free:
        raise ConfigError(
            f"data.store=true: {len(paths)} images at {side} px need more than {needed / 2**30:.1f} GiB, but "
            f"{index_file.parent} has {free / 2**30:.1f} GiB free: set data.store_dir, a smaller data.store_size, "
            "or data.store=false"
        )
    start = time.perf_counter()
    log.info("Decoding %d images into the store %s (short side %d px)", len(paths), pixels_file, side)
    mode = InterpolationMode(config.interpolation)
    index = np.zeros((len(paths), 3), dtype=np.int64)  # start, height, width
    suffix = f".{os.getpid()}.part"
    processes, size = per_core(len(paths))
    parts = [
        _Part(paths[first : first + size], side, mode, pixels_file.with_suffix(f".u8.{first}{suffix}"))
        for first in range(0, len(paths), size)
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # where the parts are decoded here: one image at a time, as in each process
    try:
        with open(pixels_file.with_suffix(f".u8{suffix}"), "wb") as out:
            tenth, number, offset = max(1, len(paths) // 10), 0, 0
            for part, shapes in zip(parts, forked_map(_decode_part, parts, processes), strict=True):
                with open(part.file, "rb") as pixels:
                    shutil.copyfileobj(pixels, out)
                part.file.unlink()
                for height, width in shapes:
                    index[number] = offset, height, width
                    offset += 3 * height * width
                    number += 1
                    if number % tenth == 0:
                        log.info("  %d of %d images in %.1f s", number, len(paths), time.perf_counter() - start)
        pixels_file.with_suffix(f".u8{suffix}").replace(pixels_file)
    finally:
        torch.set_num_threads(threads)
        for file in (pixels_file.with_suffix(f".u8{suffix}"), *(part.file for part in parts)):
            file.unlink(missing_ok=True)  # a failed build leaves nothing behind (a whole one is renamed)
    with open(index_file.with_suffix(f".npy{suffix}"), "wb") as out:  # a handle: np.save would add .npy
        np.save(out, index, allow_pickle=False)
    index_file.with_suffix(f".npy{suffix}").replace(index_file)
    seconds = time.perf_counter() - start
    log.info("Stored %d images (%.2f GiB) in %.1f s", len(paths), offset / 2**30, seconds)


class StoredImages(Dataset):
    """An `ImageFolder`'s images from its store: `(uint8 tensor (3, h, w), label)`, short side `side`, with the
    folder's `samples`, `targets` and `classes` (what labels, the feature cache's key and the reports read)."""

    def __init__(self, folder: ImageFolder, file: Path):
        self.samples, self.targets, self.classes = folder.samples, folder.targets, folder.classes
        self.file = file  # the index; the pixels are beside it, `.u8`
        self.index = np.load(file)
        self.side = int(self.index[:, 1:].min())
        self._pixels: np.ndarray | None = None  # mapped in each process that reads (a worker's own map)

    @classmethod
    def of(cls, folder: ImageFolder, size: int | None, config: InputConfig, store_dir: Path) -> StoredImages:
        """The folder's store for images that `config` transforms, built first if it does not exist yet."""
        paths = [path for path, _ in folder.samples]
        file = store_dir / f"{store_key(paths, size, config)}.npy"
        with one_at_a_time(file):  # DDP ranks and parallel runs build it once
            if not file.is_file():
                build_store(paths, size or default_side(paths, config.resize), config, file)
            else:
                log.info("Images of %s read from the store %s", folder.root, file.with_suffix(".u8"))
        return cls(folder, file)

    @property
    def pixels(self) -> np.ndarray:
        if self._pixels is None:
            self._pixels = np.memmap(self.file.with_suffix(".u8"), dtype=np.uint8, mode="r")
        return self._pixels

    def __getstate__(self) -> dict[str, object]:  # a worker process maps the file itself, no copy of the pixels
        return {**self.__dict__, "_pixels": None}

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int | torch.Tensor]:
        start, height, width = (int(value) for value in self.index[index])
        image = np.array(self.pixels[start : start + 3 * height * width]).reshape(3, height, width)
        return torch.from_numpy(image), self.samples[index][1]  # a class index, or a multi-label image's vector


class CropSample(NamedTuple):
    """A stored image with the crop box (x1, y1, x2, y2, in stored pixels) and flip it is to get on the device;
    `collate_crops` batches them, `DeviceAugment` finishes the batch."""

    image: torch.Tensor
    box: torch.Tensor
    flip: torch.Tensor
    label: int | torch.Tensor


def eval_box(height: int, width: int, config: InputConfig) -> torch.Tensor:
    """The eval transform's centre crop (`image_size` at `round((resized - image_size) / 2)` of the image with its
    short side resized to `resize`) in the stored image's pixels: at the store's own size, whole pixels, which
    `roi_align` copies."""
    scale = min(height, width) / config.resize  # stored pixels per resized pixel
    top, left = (round((length / scale - config.image_size) / 2) * scale for length in (height, width))
    crop = config.image_size * scale
    return torch.tensor([left, top, left + crop, top + crop], dtype=torch.float32)


class StoredCrops(Dataset):
    """The training view of some stored images for `DeviceAugment`: each sample's d2l crop box and flip are drawn
    from torch's default generator (seeded per sample by `Seeded`); with `random=False` the eval crop, unflipped."""

    def __init__(self, stored: StoredImages, indices: Sequence[int], config: InputConfig, random: bool = True):
        self.stored, self.indices, self.random, self.config = stored, list(indices), random, config
        self.crop = v2.RandomResizedCrop(config.image_size)  # d2l's: its default area and aspect-ratio ranges

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> CropSample:
        image, label = self.stored[self.indices[index]]
        if not self.random:
            return CropSample(image, eval_box(*image.shape[1:], self.config), torch.tensor(False), label)
        params = self.crop.make_params([image])  # top, left, height, width
        top, left, height, width = params["top"], params["left"], params["height"], params["width"]
        flip = torch.rand(()) < 0.5
        return CropSample(
            image, torch.tensor([left, top, left + width, top + height], dtype=torch.float32), flip, label
        )


def collate_crops(samples: list[CropSample]) -> CropSample:
    """A batch of `CropSample`s, the images padded at their bottom and right to the largest of the batch (the
    boxes stay inside each image, so `roi_align` never reads the padding)."""
    height = max(sample.image.shape[1] for sample in samples)
    width = max(sample.image.shape[2] for sample in samples)
    images = torch.zeros((len(samples), 3, height, width), dtype=torch.uint8)
    for row, sample in zip(images, samples, strict=True):
        row[:, : sample.image.shape[1], : sample.image.shape[2]] = sample.image
    boxes = torch.stack([sample.box for sample in samples])
    flips = torch.stack([torch.as_tensor(sample.flip) for sample in samples])
    return CropSample(images, boxes, flips, default_collate([sample.label for sample in samples]))


class DeviceAugment:
    """A batch of `CropSample`s, on whatever device it is, to `(normalised float images, labels)`: every box
    cropped and resized to `image_size` in one `roi_align`, flipped where drawn, normalised."""

    def __init__(self, config: InputConfig):
        self.size = config.image_size
        self.normalize = NormalizeBatch(config)

    def __call__(self, batch: CropSample) -> tuple[torch.Tensor, torch.Tensor]:
        images = batch.image.float()
        rows = torch.arange(len(images), device=images.device, dtype=images.dtype).unsqueeze(1)
        boxes = torch.cat([rows, batch.box.to(images.dtype)], dim=1)
        crops = roi_align(images, boxes, output_size=self.size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        crops = torch.where(batch.flip.view(-1, 1, 1, 1), crops.flip(-1), crops)
        return self.normalize.images(crops.mul_(1 / 255)), batch.label


def normalization_blocker(random_erasing: float, mixes: bool) -> str | None:
    """What keeps the normalisation from moving to the training device's batches (`data.augment_on=device`): a
    step after it that needs normalised images in the workers; None when nothing does."""
    blockers = [
        f"data.random_erasing={random_erasing}" if random_erasing > 0 else None,
        "data.mixup/data.cutmix" if mixes else None,
    ]
    if blocker := next((b for b in blockers if b), None):
        return (
            "data.augment_on=device normalises the training batches on the device (with data.store=true, d2l's "
            f"crop and flip too), but {blocker} needs normalised images in the loader's workers: set data.augment_on=auto"
        )
    return None

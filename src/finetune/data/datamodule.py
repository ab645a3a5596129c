"""The image-folder DataModule every dataset of the project builds on."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2.functional import to_pil_image

from finetune.data.images import ImageFolder, find_classes, usable_cores
from finetune.data.sampling import BalancedSampler, ResumableLoader, Seeded, SeededCollate, SeededSampler
from finetune.data.store import (
    DeviceAugment,
    StoredCrops,
    StoredImages,
    collate_crops,
    normalization_blocker,
)
from finetune.data.transforms import (
    NormalizeBatch,
    augmentation_name,
    batch_transform,
    decode_side,
    eval_transform,
    train_transform,
)
from finetune.errors import ConfigError, MissingFileError
from finetune.models.backbones import InputConfig

log = logging.getLogger(__name__)

# Largest / smallest class of the training split above which setup warns
IMBALANCE_WARNING = 3.0


# A sample's label: its class index, or a multi-label image's classes (`finetune.data.multilabel`), any number
Label = int | tuple[int, ...]


def read_labels(dataset: Dataset, indices: Iterable[int]) -> list[Label]:
    """The labels of some samples, read from the dataset's `targets` (ImageFolder, torchvision, the multi-label
    CSVs) without decoding."""
    targets = getattr(dataset, "targets", None)
    if targets is None:
        return [dataset[index][1] for index in indices]
    return [label if isinstance(label := targets[index], tuple) else int(label) for index in indices]


def classes_of(label: Label) -> tuple[int, ...]:
    """The classes a sample belongs to: one, or a multi-label image's (none to all)."""
    return label if isinstance(label, tuple) else (label,)


def count_classes(labels: Iterable[Label], num_classes: int) -> list[int]:
    """How many of the samples belong to each class (a multi-label image counts for each of its classes)."""
    counts = [0] * num_classes
    for label in labels:
        for index in classes_of(label):
            counts[index] += 1
    return counts


def stratified_folds(labels: Sequence[Label], folds: int, seed: int) -> list[list[int]]:
    """The sample indices of each of `folds` folds, for cross-validation: each class's samples, shuffled by `seed`,
    are dealt round-robin, one class after the other, so every fold keeps each class's share (its count differs
    by at most 1 between folds), the folds' sizes differ by at most 1, and the same seed gives the same folds.
    Multi-label images are stratified by their set of classes (each set a stratum: the label powerset)."""
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    generator = torch.Generator().manual_seed(seed)
    dealt: list[list[int]] = [[] for _ in range(folds)]
    position = 0
    for label in sorted(by_class):
        members = by_class[label]
        for order in torch.randperm(len(members), generator=generator).tolist():
            dealt[position % folds].append(members[order])
            position += 1
    return [sorted(fold) for fold in dealt]


def few_shot(labels: Sequence[Label], shots: int, seed: int) -> list[int]:
    """The positions of `shots` samples of each class (all of a class with fewer), by a seeded order of the
    samples that does not depend on `shots`: the 5 of one seed are among its 10 (nested subsets).

    A multi-label image is taken while one of its classes has fewer than `shots`, and counts for each of them:
    every class gets at least `shots` images (all it has, if fewer), a class that shares images with others may
    get more, and images without a label are left out. The subsets stay nested."""
    state = int(np.random.SeedSequence([seed, 5]).generate_state(1, np.uint64)[0])
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(state)).tolist()
    taken: dict[int, int] = {}
    chosen = []
    for position in order:
        classes = classes_of(labels[position])
        if any(taken.get(label, 0) < shots for label in classes):
            for label in classes:
                taken[label] = taken.get(label, 0) + 1
            chosen.append(position)
    return sorted(chosen)


class Transformed(Dataset):
    """A view of some samples of a dataset of PIL images, with its own transform."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], transform):
        self.dataset, self.indices, self.transform = dataset, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        image, label = self.dataset[self.indices[index]]
        return self.transform(image), label

    def image(self, index: int) -> Image.Image:
        """Sample `index` untransformed, as figures show it (`finetune.analysis.plot_top_errors`)."""
        image = self.dataset[self.indices[index]][0]
        return to_pil_image(image) if isinstance(image, torch.Tensor) else image  # a stored image

    @property
    def labels(self) -> list[Label]:
        """Every sample's label (`read_labels`)."""
        return read_labels(self.dataset, self.indices)


def decoded_at_least(split: Dataset, side: int) -> Dataset:
    """Image files read at the smallest JPEG scale whose short side is still `side` (`ImageFolder.decoded_at_least`);
    a store or decoded arrays as they are."""
    return split.decoded_at_least(side) if isinstance(split, ImageFolder) else split


def default_num_workers() -> int:
    return min(8, usable_cores())


class ImageFolderDataModule(L.LightningDataModule):
    """`root/train/<class>/**/*` and `root/test/<class>/**/*` (or `val/`) with the d2l transforms.

    Validation is `val_fraction` of train (seeded) or, with `val_fraction: 0`, the test split
    (as d2l does); with `folds` (cross-validation), fold `fold` of train's `stratified_folds` instead, never the
    test split. `shots`: K training images per class (`few_shot`), drawn after the validation split.
    `min_steps_per_epoch`: an epoch of fewer optimizer steps (each `trainer.accumulate_grad_batches` batches)
    passes over the data again (a step budget that does not shrink with the data). `input_config` is what the
    backbone's weights expect; `image_size`, `mean` and `std` override it when set. Unreadable images stop
    `setup` with their names, or with `skip_bad_images` are left out and logged; `checked_dir` keeps what that
    check found, so that later runs over the same files decode none of them (None: every run decodes them).
    Training data: `augment` (a preset of `finetune.data.transforms`), `random_erasing` (a probability),
    `mixup`/`cutmix` (Beta alphas, batch-level), `sampler` (`shuffle` or `balanced`).
    `store`: the images decoded once into `store_dir` (`finetune.data.store`, `store_size` px). `augment_on`: where
    the training batches are normalised, and with the store d2l's crop and flip too: on the training device (`auto`
    = when it is a GPU, `device`) or per image in the loader's workers (`workers`).
    """

    def __init__(
        self,
        input_config: InputConfig,
        root: str | os.PathLike | None = None,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        image_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        num_workers: int | str = "auto",
        pin_memory: bool | str = "auto",
        persistent_workers: bool = True,
        drop_last: bool = False,
        skip_bad_images: bool = False,
        checked_dir: str | os.PathLike | None = None,
        augment: str | bool = "d2l",
        random_erasing: float = 0.0,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        sampler: str = "shuffle",
        store: bool = False,
        store_size: int | None = None,
        store_dir: str | os.PathLike = "data/store",
        augment_on: str = "auto",
        folds: int | None = None,
        fold: int = 0,
        shots: int | None = None,
        min_steps_per_epoch: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        self.root = Path(root).expanduser() if root is not None else None
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.folds, self.fold = folds, fold
        self.shots, self.min_steps_per_epoch = shots, min_steps_per_epoch
        self.input_config = input_config.overridden(image_size=image_size, mean=mean, std=std)
        self.num_workers = default_num_workers() if num_workers == "auto" else int(num_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory == "auto" else bool(pin_memory)
        self.persistent_workers = persistent_workers and self.num_workers > 0
        self.drop_last = drop_last
        self.skip_bad_images = skip_bad_images
        self.checked_dir = Path(checked_dir).expanduser() if checked_dir is not None else None
        self.augment = augmentation_name(augment)
        self.random_erasing, self.mixup, self.cutmix = random_erasing, mixup, cutmix
        self.sampler = sampler
        self.store, self.store_size, self.store_dir = store, store_size, Path(store_dir).expanduser()
        self.augment_on = augment_on
        self._device_step: DeviceAugment | NormalizeBatch | None = None  # decided when the training loader is built
        self._told: set[str] = set()  # what building the training loader logged (it is built twice: `_tell_once`)
        self.seed = seed
        self.datasets: dict[str, Dataset] = {}
        self.labels: dict[str, list[Label]] = {}  # every split's labels, read once at setup
        self.validates_on_test = False  # set up with no validation images: the test split validates (as d2l)

    # What subclasses change: where the data is, how a split is read, what the imbalance warning suggests.
    balancing = "data.sampler=balanced or loss.class_weights=balanced"

    @property
    def classes(self) -> list[str]:
        return find_classes(self._require_root() / "train")

    def read_split(self, split: str) -> Dataset:
        """An untransformed dataset of (PIL image, label) for `train` or `test`."""
        root = self._require_root()
        folder = root / split
        if split == "test" and not folder.is_dir() and (root / "val").is_dir():
            folder = root / "val"
        return ImageFolder(folder, self.classes, self.skip_bad_images, self.checked_dir)

    def _require_root(self) -> Path:
        if self.root is None or not self.root.is_dir():
            raise MissingFileError(f"data.root: no such folder: {self.root} (expected train/ and test/ inside)")
        return self.root

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def augmented(self) -> bool:
        """Whether a training image's transform is random (the feature cache then stores several views)."""
        return self.augment != "none" or self.random_erasing > 0

    @property
    def train_transform(self):
        """The `augment` preset (d2l's crop and flip by default; `none`: the eval transform), random erasing."""
        return train_transform(self.input_config, self.augment, self.random_erasing)

    @property
    def eval_transform(self):
        return eval_transform(self.input_config)

    def stored(self, split: Dataset) -> Dataset:
        """The split's images from the decoded store (`data.store=true`), built on first use; splits that are not
        image files (torchvision's CIFAR-10 arrays) are already decoded and stay as they are."""
        if not self.store:
            return split
        if not isinstance(split, ImageFolder):
            log.info("data.store=true: %s holds no image files to decode, it is read as it is", type(split).__name__)
            return split
        return StoredImages.of(split, self.store_size, self.input_config, self.store_dir)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        train, test = (self.stored(self.read_split(split)) for split in ("train", "test"))
        training, validation = self.split_train(train)
        self.validates_on_test = not validation
        augmented, evaluated = (decode_side(self.input_config, augment) for augment in (self.augment, "none"))
        tested = Transformed(decoded_at_least(test, evaluated), range(len(test)), self.eval_transform)
        self.datasets = {
            "train": Transformed(decoded_at_least(train, augmented), training, self.train_transform),
            "val": Transformed(decoded_at_least(train, evaluated), validation, self.eval_transform)
            if validation
            else tested,
            "test": tested,
        }
        self._log_class_counts()
        if self.drop_last and len(self.datasets["train"]) < self.batch_size:
            raise ConfigError(
                f"data.batch_size={self.batch_size} is larger than the {len(self.datasets['train'])} training "
                "images and data.drop_last=true: no batch would be left"
            )

    def split_train(self, train: Dataset) -> tuple[list[int], list[int]]:
        """The indices of `train` that train and those that validate: fold `fold` of `folds` stratified folds
        validates, or else a seeded `val_fraction` of the images (none: the test split validates). With `shots`,
        K images per class of the training part train (`few_shot`); the validation part does not change."""
        if self.folds:
            folds = stratified_folds(read_labels(train, range(len(train))), self.folds, self.seed)
            if not folds[-1]:
                raise ConfigError(f"data.folds={self.folds} is more than the {len(train)} training images")
            training = sorted(i for k, members in enumerate(folds) if k != self.fold for i in members)
            return self._few_shot(train, training), folds[self.fold]
        indices = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed)).tolist()
        num_val = round(len(train) * self.val_fraction)
        if num_val == len(train):
            raise ConfigError(f"data.val_fraction={self.val_fraction} leaves none of the {len(train)} training images")
        return self._few_shot(train, indices[num_val:]), indices[:num_val]

    def _few_shot(self, train: Dataset, training: list[int]) -> list[int]:
        """`shots` images per class of `training` (all of them without `shots`), logged when a class has fewer."""
        if self.shots is None:
            return training
        labels = read_labels(train, training)
        chosen = few_shot(labels, self.shots, self.seed)
        counts = count_classes(labels, self.num_classes)
        short = [f"{self.classes[c]} {n}" for c, n in enumerate(counts) if n < self.shots]
        if short:
            log.warning("data.shots=%d: these classes have fewer training images, all are used: %s", self.shots, short)
        return sorted(training[position] for position in chosen)

    def class_counts(self, split: str = "train") -> list[int]:
        """Images per class of a split, in label order (for class-balanced loss weights). Sets the data up first
        if needed, downloading or generating its files first (`prepare_data`)."""
        if not self.datasets:
            self.prepare_data()
        self.setup()
        return count_classes(self.labels[split], self.num_classes)

    def _log_class_counts(self) -> None:
        """One line per split with each class's image count; a warning if the training split is strongly imbalanced."""
        self.labels = {split: dataset.labels for split, dataset in self.datasets.items()}
        names = self.classes
        for split in self.datasets:
            counts = self.class_counts(split)
            listed = ", ".join(f"{name} {count}" for name, count in zip(names, counts, strict=True))
            log.info("Images per class (%s, %d): %s", split, len(self.labels[split]), listed)
        counts = self.class_counts()
        largest, smallest = max(counts), min(counts)
        if self.sampler != "balanced" and largest > IMBALANCE_WARNING * smallest:
            ratio = f"{largest / smallest:.1f}x" if smallest else "no images of some classes"
            log.warning(
                "The training split is imbalanced: %s has %d images, %s %d (%s). Consider %s",
                names[counts.index(largest)],
                largest,
                names[counts.index(smallest)],
                smallest,
                ratio,
                self.balancing,
            )

    def _loader(self, split: str) -> DataLoader:
        return DataLoader(self.datasets[split], batch_size=self.batch_size, **self._worker_args())

    def _worker_args(self) -> dict[str, object]:
        return {
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.persistent_workers,
        }

    def _choose_device_step(self) -> DeviceAugment | NormalizeBatch | None:
        """What finishes the training batches on the device (`augment_on`), or None: the loader's workers transform
        each image whole. Stored images with d2l's crop and flip alone (or the eval crop) are cropped, flipped and
        normalised there (`DeviceAugment`); other images arrive as the workers' uint8 crops, normalised there
        (`NormalizeBatch`). Random erasing and MixUp/CutMix need normalised images in the workers."""
        train = self.datasets.get("train")
        if self.augment_on == "workers" or not isinstance(train, Transformed):  # cached features: no images
            return None
        blocker = normalization_blocker(self.random_erasing, bool(self.mixup or self.cutmix))
        if self.augment_on == "device" and blocker:
            raise ConfigError(blocker)
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        if blocker or not (on_gpu or self.augment_on == "device"):
            return None
        if isinstance(train.dataset, StoredImages) and self.augment in ("d2l", "none"):
            return DeviceAugment(self.input_config)
        return NormalizeBatch(self.input_config)

    def on_after_batch_transfer(self, batch: object, dataloader_idx: int) -> object:
        """Training batches that the workers left as uint8 pixels (stored crops, or uint8 images) are finished
        here, on the device (`_choose_device_step`)."""
        unfinished = isinstance(batch, list | tuple) and getattr(batch[0], "dtype", None) == torch.uint8
        return self._device_step(batch) if unfinished else batch

    def _tell_once(self, message: str) -> None:
        """Logs what the training loader is made of once: a per-step schedule counts its batches
        (`estimated_stepping_batches`), which builds it, and the fit loop builds it again (FineTuneModule)."""
        if message not in self._told:
            self._told.add(message)
            log.info(message)

    def train_dataloader(self) -> DataLoader:
        """Shuffled (or class-balanced), augmented and mixed by (seed, epoch, sample) and resumable mid-epoch
        (see `finetune.data.sampling`)."""
        mix = batch_transform(self.mixup, self.cutmix, self.num_classes)
        train = self.datasets["train"]
        self._device_step = self._choose_device_step()
        if isinstance(self._device_step, DeviceAugment):
            train = StoredCrops(train.dataset, train.indices, self.input_config, random=self.augment != "none")
            self._tell_once(
                "Training images are cropped, flipped and normalised as whole batches on the training device"
            )
        elif self._device_step is not None:
            uint8 = train_transform(self.input_config, self.augment, normalize=False)
            train = Transformed(train.dataset, train.indices, uint8)
            self._tell_once(
                "Training images are normalised as whole batches on the training device (uint8 from the workers)"
            )
        dataset = Seeded(train, with_seed=mix is not None)
        ranks = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        # the budget is in optimizer steps: with gradient accumulation each step takes that many batches
        batches_per_step = self.trainer.accumulate_grad_batches if self.trainer else 1
        min_draws = self.min_steps_per_epoch * batches_per_step * self.batch_size * ranks[0]
        sampler = (
            BalancedSampler(dataset, self.labels["train"], *ranks, seed=self.seed, min_draws=min_draws)
            if self.sampler == "balanced"
            else SeededSampler(dataset, *ranks, seed=self.seed, min_draws=min_draws)
        )
        if min_draws > len(dataset):
            step = f"{batches_per_step} batches of {self.batch_size}" if batches_per_step > 1 else f"{self.batch_size}"
            step += f" images on each of {ranks[0]} processes" if ranks[0] > 1 else " images"
            self._tell_once(
                f"{len(dataset)} training images: each epoch draws {sampler.total_size} "
                f"(data.min_steps_per_epoch={self.min_steps_per_epoch} steps of {step})"
            )
        return ResumableLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=self.drop_last,
            collate_fn=SeededCollate(mix) if mix else collate_crops if isinstance(train, StoredCrops) else None,
            **self._worker_args(),
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def train_eval_dataloader(self) -> DataLoader:
        """The training images in order with the eval transform (no augmentation, no mixing): one deterministic
        pass over the training data, for what a method computes of it before training (`LossTerm.prepare`). Its
        own random generator: the pass draws nothing from the global one, which training goes on with."""
        train = self.datasets["train"]
        dataset = Transformed(train.dataset, train.indices, self.eval_transform)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=torch.Generator(),
        )

"""The image-folder DataModule every dataset of the project builds on."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from finetune.data.images import ImageFolder, find_classes
from finetune.data.sampling import ResumableLoader, Seeded, SeededSampler
from finetune.data.transforms import eval_transform, train_transform
from finetune.errors import ConfigError, MissingFileError
from finetune.models.backbones import InputConfig


class Transformed(Dataset):
    """A view of some samples of a dataset of PIL images, with its own transform."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], transform):
        self.dataset, self.indices, self.transform = dataset, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        image, label = self.dataset[self.indices[index]]
        return self.transform(image), label


def default_num_workers() -> int:
    return min(8, len(os.sched_getaffinity(0)))


class ImageFolderDataModule(L.LightningDataModule):
    """`root/train/<class>/*` and `root/test/<class>/*` (or `val/`) with the d2l transforms.

    Validation is `val_fraction` of train (seeded) or, with `val_fraction: 0`, the test split
    (as d2l does). `input_config` is what the backbone's weights expect; `image_size`, `mean` and `std`
    override it when set. Unreadable images stop `setup` with their names, or with `skip_bad_images` are
    left out and logged.
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
        augment: bool = True,
        seed: int = 0,
    ):
        super().__init__()
        self.root = Path(root).expanduser() if root is not None else None
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.input_config = input_config.overridden(image_size=image_size, mean=mean, std=std)
        self.num_workers = default_num_workers() if num_workers == "auto" else int(num_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory == "auto" else bool(pin_memory)
        self.persistent_workers = persistent_workers and self.num_workers > 0
        self.drop_last = drop_last
        self.skip_bad_images = skip_bad_images
        self.augment = augment
        self.seed = seed
        self.datasets: dict[str, Dataset] = {}

    # What subclasses change: where the data is and how a split is read.
    @property
    def classes(self) -> list[str]:
        return find_classes(self._require_root() / "train")

    def read_split(self, split: str) -> Dataset:
        """An untransformed dataset of (PIL image, label) for `train` or `test`."""
        root = self._require_root()
        folder = root / split
        if split == "test" and not folder.is_dir() and (root / "val").is_dir():
            folder = root / "val"
        return ImageFolder(folder, classes=self.classes, skip_bad_images=self.skip_bad_images)

    def _require_root(self) -> Path:
        if self.root is None or not self.root.is_dir():
            raise MissingFileError(f"data.root: no such folder: {self.root} (expected train/ and test/ inside)")
        return self.root

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def train_transform(self):
        """d2l's augmentation, or with `augment=false` the deterministic eval transform."""
        return train_transform(self.input_config) if self.augment else self.eval_transform

    @property
    def eval_transform(self):
        return eval_transform(self.input_config)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        train, test = self.read_split("train"), self.read_split("test")
        indices = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed)).tolist()
        num_val = round(len(train) * self.val_fraction)
        if num_val == len(train):
            raise ConfigError(f"data.val_fraction={self.val_fraction} leaves none of the {len(train)} training images")
        self.datasets = {
            "train": Transformed(train, indices[num_val:], self.train_transform),
            "val": Transformed(train, indices[:num_val], self.eval_transform)
            if num_val
            else Transformed(test, range(len(test)), self.eval_transform),
            "test": Transformed(test, range(len(test)), self.eval_transform),
        }
        if self.drop_last and len(self.datasets["train"]) < self.batch_size:
            raise ConfigError(
                f"data.batch_size={self.batch_size} is larger than the {len(self.datasets['train'])} training "
                "images and data.drop_last=true: no batch would be left"
            )

    def class_counts(self) -> list[int]:
        """The number of training images of each class, in label order (read from the split, before the fit)."""
        self.prepare_data()
        self.setup("fit")
        train = self.datasets["train"]
        labels = torch.tensor([train.dataset.targets[i] for i in train.indices], dtype=torch.long)
        return torch.bincount(labels, minlength=self.num_classes).tolist()

    def _loader(self, split: str) -> DataLoader:
        return DataLoader(self.datasets[split], batch_size=self.batch_size, **self._worker_args())

    def _worker_args(self) -> dict[str, object]:
        return {
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.persistent_workers,
        }

    def train_dataloader(self) -> DataLoader:
        """Shuffled and augmented by (seed, epoch, sample) and resumable mid-epoch (see `finetune.data.sampling`)."""
        dataset = Seeded(self.datasets["train"])
        ranks = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        sampler = SeededSampler(dataset, *ranks, seed=self.seed)
        return ResumableLoader(
            dataset, batch_size=self.batch_size, sampler=sampler, drop_last=self.drop_last, **self._worker_args()
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

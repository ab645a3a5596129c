"""Multi-label data: `DIR/train.csv` and `DIR/test.csv` list the images and their labels (`data=multilabel`).

Each CSV has the columns `path,labels`: the image's path relative to DIR (or absolute) and its labels separated by
`|` (`dog|grass`; empty: an image with no label). The classes are the sorted labels of train.csv. A sample is
`(image, multi-hot float vector)`; everything else (the validation split, cross-validation, few-shot subsets,
seeded and resumable batches, DDP shards, the decoded store, bad images) is `ImageFolderDataModule`'s.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch

from finetune.data.datamodule import ImageFolderDataModule
from finetune.data.images import ImageFolder, _listing, unreadable
from finetune.errors import DataError, MissingFileError

COLUMNS = ("path", "labels")
SEPARATOR = "|"


def read_label_csv(path: Path) -> list[tuple[Path, list[str]]]:
    """The rows of a `path,labels` CSV: each image's path (relative ones from the CSV's folder) and its labels."""
    if not path.is_file():
        raise MissingFileError(
            f"data.root: no {path.name} in {path.parent} (data=multilabel reads train.csv and test.csv there, "
            f"columns {','.join(COLUMNS)}; labels separated by '{SEPARATOR}')"
        )
    with path.open(newline="", encoding="utf-8-sig") as file:  # a BOM from a spreadsheet's export is no column
        reader = csv.DictReader(file)
        columns = [name.strip() for name in reader.fieldnames or []]
        if sorted(columns) != sorted(COLUMNS):
            unknown, missing = sorted(set(columns) - set(COLUMNS)), sorted(set(COLUMNS) - set(columns))
            raise DataError(
                f"{path} has the columns {columns} (unknown: {unknown}, missing: {missing}): expected exactly "
                f"{','.join(COLUMNS)}"
            )
        reader.fieldnames = columns
        rows = []
        for line, row in enumerate(reader, start=2):
            if not (row["path"] or "").strip():
                raise DataError(f"{path}, line {line}: no path")
            labels = [label.strip() for label in (row["labels"] or "").split(SEPARATOR)]
            rows.append((path.parent / row["path"].strip(), sorted({label for label in labels if label})))
    return rows


class LabelledImages(ImageFolder):
    """The images a CSV lists (`read_label_csv`) as `(PIL image, multi-hot float vector over classes)`: an image
    folder whose samples come from a file, so the decoded store and the reports read it as one. `targets` holds
    each image's class indices (`finetune.data.datamodule.read_labels`). A listed file that is not there stops
    here with its name, or with `skip_bad_images` is left out with the unreadable ones."""

    def __init__(
        self, csv_path: Path, classes: list[str], skip_bad_images: bool = False, checked_dir: Path | None = None
    ):
        rows = read_label_csv(csv_path)
        self.root, self.classes = csv_path.parent, list(classes)
        unknown = sorted({label for _, labels in rows for label in labels} - set(classes))
        if unknown:
            raise DataError(f"{csv_path} has labels that train.csv has not: {unknown} (the classes are {classes})")
        missing = {path: "no such file" for path, _ in rows if not path.is_file()}
        if missing and not skip_bad_images:
            header = f"{len(missing)} images listed in {csv_path} are not there (data.skip_bad_images=true skips them):"
            raise MissingFileError(_listing(header, missing, limit=20))
        listed = [path for path, _ in rows]
        self.skipped = unreadable(listed, self.root, skip_bad_images, checked_dir)  # missing ones too
        index = {name: position for position, name in enumerate(classes)}
        kept = [(path, tuple(index[label] for label in labels)) for path, labels in rows if path not in self.skipped]
        if not kept:
            raise DataError(f"{csv_path} lists no readable images")
        self.targets = [label_set for _, label_set in kept]
        self.samples = [(path, multi_hot(label_set, len(classes))) for path, label_set in kept]


def multi_hot(classes: tuple[int, ...], num_classes: int) -> torch.Tensor:
    """A float vector with 1 at each of `classes`: the target of `BCEWithLogits` and the multi-label metrics."""
    target = torch.zeros(num_classes)
    target[list(classes)] = 1.0
    return target


class MultiLabelDataModule(ImageFolderDataModule):
    """`root/train.csv` and `root/test.csv` (see the module's docstring); every other setting is an image folder's.

    MixUp/CutMix and the class-balanced sampler are for single-label data (`finetune.validation` refuses them);
    `loss.class_weights=balanced` weighs each class's positives by its negatives over its positives (`pos_weight`,
    `finetune.models.losses.BCEWithLogits`).
    """

    balancing = "loss.class_weights=balanced (pos_weight: a class's negatives / positives)"

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._classes: list[str] | None = None

    def _csv(self, split: str) -> Path:
        return self._require_root() / f"{split}.csv"

    def _require_root(self) -> Path:
        if self.root is None or not self.root.is_dir():
            raise MissingFileError(f"data.root: no such folder: {self.root} (expected train.csv and test.csv inside)")
        return self.root

    @property
    def classes(self) -> list[str]:
        """The sorted labels of train.csv, read once."""
        if self._classes is None:
            found = sorted({label for _, labels in read_label_csv(self._csv("train")) for label in labels})
            if not found:
                raise DataError(f"{self._csv('train')} has no labels (labels separated by '{SEPARATOR}')")
            self._classes = found
        return self._classes

    def read_split(self, split: str) -> LabelledImages:
        return LabelledImages(self._csv(split), self.classes, self.skip_bad_images, self.checked_dir)

"""LightningDataModules: image folders, d2l's hotdog, CIFAR-10, generated shapes and multi-label CSVs."""

from finetune.data.cifar10 import CIFAR10DataModule
from finetune.data.datamodule import ImageFolderDataModule
from finetune.data.hotdog import HotdogDataModule
from finetune.data.multilabel import MultiLabelDataModule
from finetune.data.synthetic import SyntheticDataModule

__all__ = [
    "CIFAR10DataModule",
    "HotdogDataModule",
    "ImageFolderDataModule",
    "MultiLabelDataModule",
    "SyntheticDataModule",
]

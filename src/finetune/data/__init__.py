"""LightningDataModules: image folders, d2l's hotdog, CIFAR-10 and generated shapes."""

from finetune.data.cifar10 import CIFAR10DataModule
from finetune.data.datamodule import ImageFolderDataModule
from finetune.data.hotdog import HotdogDataModule
from finetune.data.synthetic import SyntheticDataModule

__all__ = ["CIFAR10DataModule", "HotdogDataModule", "ImageFolderDataModule", "SyntheticDataModule"]

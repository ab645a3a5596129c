"""CIFAR-10: torchvision's download, or an image-folder export (`root/train`, `root/test`)."""

from __future__ import annotations

from torch.utils.data import Dataset

from finetune.data.datamodule import ImageFolderDataModule
from finetune.errors import DownloadError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class CIFAR10DataModule(ImageFolderDataModule):
    """torchvision's CIFAR10 files in `root` (downloaded when missing), unless `root` holds class folders."""

    @property
    def is_image_folder(self) -> bool:
        return (self.root / "train").is_dir()

    @property
    def classes(self) -> list[str]:
        return super().classes if self.is_image_folder else CIFAR10_CLASSES

    def prepare_data(self) -> None:
        if not self.is_image_folder:
            self._torchvision_split("train", download=True)

    def read_split(self, split: str) -> Dataset:
        return super().read_split(split) if self.is_image_folder else self._torchvision_split(split)

    def _torchvision_split(self, split: str, download: bool = False) -> Dataset:
        from torchvision.datasets import CIFAR10

        try:
            return CIFAR10(self.root, train=split == "train", download=download)
        except (OSError, RuntimeError) as err:
            raise DownloadError(
                f"CIFAR-10 is not in {self.root} and could not be downloaded ({err}). Without network, put "
                "torchvision's cifar-10-batches-py/ there, or pass data.root=<folder with train/ and test/ class folders>."
            ) from err

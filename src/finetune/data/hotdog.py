"""d2l's hotdog dataset (2,000 train / 800 test images, 2 classes)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from finetune.data.datamodule import ImageFolderDataModule
from finetune.data.download import download_verified, extract_zip
from finetune.errors import MissingFileError

HOTDOG_URL = "http://d2l-data.s3-accelerate.amazonaws.com/hotdog.zip"
HOTDOG_SHA1 = "fba480ffa8aa7e0febbb511d181409f899b9baa5"


class HotdogDataModule(ImageFolderDataModule):
    """Downloads and extracts hotdog.zip into `data_dir` unless `root` points at a copy."""

    def __init__(self, data_dir: str | os.PathLike = "data", root: str | os.PathLike | None = None, **kwargs: Any):
        self.data_dir = Path(data_dir).expanduser()
        super().__init__(root=root or self.data_dir / "hotdog", **kwargs)

    @property
    def classes(self) -> list[str]:
        return ["hotdog", "not-hotdog"] if not self.root.is_dir() else super().classes

    def prepare_data(self) -> None:
        if self.root.is_dir():
            return
        if self.root != self.data_dir / "hotdog":
            raise MissingFileError(f"data.root: no such folder: {self.root} (expected train/ and test/ inside)")
        hint = (
            f"Without network, fetch {HOTDOG_URL} elsewhere and put hotdog.zip into {self.data_dir}, "
            "or pass data.root=<folder with train/ and test/>."
        )
        archive = download_verified(HOTDOG_URL, self.data_dir / "hotdog.zip", HOTDOG_SHA1, hint)
        extract_zip(archive, self.data_dir, "hotdog")

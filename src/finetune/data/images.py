"""Image folders read with errors that name the file or folder at fault."""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


class ImageReadError(RuntimeError):
    """An image file that cannot be decoded; the message names the file."""


def read_rgb(path: str | Path) -> Image.Image:
    """Decodes any PIL-readable image to 3-channel RGB (palette, greyscale, alpha, CMYK)."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except Exception as err:
        raise ImageReadError(f"Cannot read image {path}: {type(err).__name__}: {err}") from err


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def find_classes(split_dir: Path) -> list[str]:
    """Class names = visible sub-folders of a split folder, sorted."""
    if not split_dir.is_dir():
        raise FileNotFoundError(f"Missing folder {split_dir} (expected one sub-folder per class)")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and _visible(p))
    if not classes:
        raise FileNotFoundError(f"No class folders in {split_dir}")
    return classes


class ImageFolder(Dataset):
    """`root/<class>/<image>` files as (PIL image, class index); hidden and non-image files are ignored."""

    def __init__(self, root: str | Path, classes: list[str] | None = None):
        self.root = Path(root)
        found = find_classes(self.root)
        if classes is not None and found != classes:
            raise ValueError(
                f"{self.root} has classes {found}, but the training split has {classes}: "
                "every split needs the same class folders"
            )
        self.classes = found
        self.samples: list[tuple[Path, int]] = []
        for index, name in enumerate(found):
            files = sorted(
                p
                for p in (self.root / name).iterdir()
                if p.is_file() and _visible(p) and p.suffix.lower() in IMAGE_EXTENSIONS
            )
            if not files:
                raise FileNotFoundError(
                    f"Class folder {self.root / name} holds no images ({', '.join(IMAGE_EXTENSIONS)})"
                )
            self.samples += [(p, index) for p in files]
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        return read_rgb(path), label

"""A small generated image-folder dataset (coloured shapes), so the pipeline runs with no network."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from finetune.data.datamodule import ImageFolderDataModule

SHAPES = ("circle", "square", "triangle", "cross")


def _far_from(background: tuple[int, ...], rng: random.Random) -> tuple[int, ...]:
    """A colour for the shapes, always far from the background."""
    return tuple((c + rng.randrange(96, 160)) % 256 for c in background)


def _shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, radius: float, colour: tuple[int, ...]) -> None:
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
    else:
        width = radius / 3
        draw.rectangle((cx - radius, cy - width, cx + radius, cy + width), fill=colour)
        draw.rectangle((cx - width, cy - radius, cx + width, cy + radius), fill=colour)


def _draw(shape: str, size: int, rng: random.Random) -> Image.Image:
    background = tuple(rng.randrange(256) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    radius = rng.uniform(0.2, 0.4) * size
    cx, cy = (rng.uniform(radius, size - radius) for _ in range(2))
    colour = _far_from(background, rng)
    _shape(ImageDraw.Draw(image), shape, cx, cy, radius, colour)
    return image


def _draw_several(shapes: list[str], size: int, rng: random.Random) -> Image.Image:
    """The shapes on one background, each in its own quarter of the image (so none hides another)."""
    background = tuple(rng.randrange(256) for _ in range(3))
    colour = _far_from(background, rng)
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    half = size / 2
    for shape, quarter in zip(shapes, rng.sample(range(4), len(shapes)), strict=True):
        radius = rng.uniform(0.3, 0.45) * half
        cx, cy = (offset * half + rng.uniform(radius, half - radius) for offset in (quarter % 2, quarter // 2))
        _shape(draw, shape, cx, cy, radius, colour)
    return image


def generate_multilabel_shapes(
    root: Path, train: int, test: int, size: int = 64, seed: int = 0, shapes: tuple[str, ...] = SHAPES
) -> Path:
    """Writes `root/images/{train,test}_NNNN.png`, each with two or three different `shapes`, and
    `root/{train,test}.csv` listing them (`path,labels`, the shapes separated by `|`): data for `data=multilabel`."""
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("test", test)):
        rows = []
        for index in range(count):
            drawn = sorted(rng.sample(shapes, rng.choice((2, 3))))
            name = f"images/{split}_{index:04d}.png"
            _draw_several(drawn, size, rng).save(root / name)
            rows.append(f"{name},{'|'.join(drawn)}")
        (root / f"{split}.csv").write_text("\n".join(["path,labels", *rows]) + "\n")
    return root


def generate_shapes(
    root: Path, num_classes: int, train_per_class: int, test_per_class: int, size: int, seed: int
) -> None:
    """Writes `root/{train,test}/<shape>/NNNN.png`; the folder appears only when complete."""
    if not 2 <= num_classes <= len(SHAPES):
        raise ValueError(f"data.num_classes must be in [2, {len(SHAPES)}] for synthetic shapes, got {num_classes}")
    rng = random.Random(seed)
    staging = root.with_name(root.name + ".partial")
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for shape in SHAPES[:num_classes]:
            folder = staging / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                _draw(shape, size, rng).save(folder / f"{index:04d}.png")
    staging.rename(root)


class SyntheticDataModule(ImageFolderDataModule):
    """Coloured circles, squares, triangles and crosses on random backgrounds, generated once under `data_dir`."""

    def __init__(
        self,
        data_dir: str | os.PathLike = "data",
        num_classes: int = 3,
        train_per_class: int = 60,
        test_per_class: int = 20,
        source_size: int = 64,
        **kwargs: Any,
    ):
        self.spec = (num_classes, train_per_class, test_per_class, source_size, kwargs.get("seed", 0))
        name = "shapes-{}c-{}-{}-{}px-seed{}".format(*self.spec)
        super().__init__(root=Path(data_dir).expanduser() / "synthetic" / name, **kwargs)

    @property
    def classes(self) -> list[str]:
        return list(SHAPES[: self.spec[0]])

    def prepare_data(self) -> None:
        if not self.root.is_dir():
            generate_shapes(self.root, *self.spec)

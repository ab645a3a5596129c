"""Streaming inference over image files: a file, a folder (recursive) or a glob, to a CSV of top-k predictions
(multi-label: the labels above their thresholds and every class's probability).

Files are found lazily and read batch by batch, so a folder of any size costs memory for one batch of
images (and, for a glob, its list of paths). A file that cannot be read (truncated, empty, not an image)
becomes a CSV row with the reason instead of stopping the run.
"""

from __future__ import annotations

import csv
import glob
import itertools
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from finetune.analysis import check_tta, tta_logits
from finetune.builders import rebuild
from finetune.checkpoint import checkpoint_file
from finetune.config import CONFIG_DIR
from finetune.data.images import ImageReadError, image_files, is_image_file, read_rgb
from finetune.data.transforms import decode_side, eval_transform
from finetune.errors import ConfigError, MissingFileError, exit_on_user_error

Transform = Callable[[Image.Image], torch.Tensor]
Item = tuple[str, torch.Tensor | None, str]  # path, image (None if unreadable), error ("" if none)


class ImagePaths:
    """The image files named by `source`: one file (whatever its name), a folder (searched recursively for
    `IMAGE_EXTENSIONS`, in `image_files`' order) or a glob pattern (`photos/**/*.jpg`; matches are filtered the same
    way and sorted by path).

    Lazy and re-iterable (each `iter()` starts anew), and picklable, so DataLoader workers can share it.
    """

    def __init__(self, source: str | os.PathLike):
        self.source = str(source)
        path = Path(self.source).expanduser()
        if not path.exists() and not any(char in self.source for char in "*?["):
            raise MissingFileError(f"input: no such file or folder: {self.source}")

    def __iter__(self) -> Iterator[Path]:
        path = Path(self.source).expanduser()
        if path.is_file():
            yield path
        elif path.is_dir():
            yield from image_files(path)
        else:  # glob.iglob yields in directory order, so sorting needs the list of matching paths
            matches = sorted(glob.iglob(os.path.expanduser(self.source), recursive=True))
            yield from (p for p in map(Path, matches) if p.is_file() and is_image_file(p))


def load_image(path: str | os.PathLike, transform: Transform, at_least: int | None = None) -> Item:
    """(path, transform(image), "") or, for a file that cannot be decoded, (path, None, reason); `at_least`: the
    short side the transform needs (`decode_side`), as the test split is read."""
    try:
        image = read_rgb(path, at_least)
    except ImageReadError as err:
        cause = err.__cause__ or err
        return str(path), None, f"{type(cause).__name__}: {cause}"
    return str(path), transform(image), ""


class ImageFiles(IterableDataset):
    """`load_image` of each path, in order; with DataLoader workers, worker w of n takes paths w, w+n, ..."""

    def __init__(self, paths: Iterable[str | os.PathLike], transform: Transform, at_least: int | None = None):
        self.paths, self.transform, self.at_least = paths, transform, at_least

    def __iter__(self) -> Iterator[Item]:
        worker = get_worker_info()
        paths = (
            iter(self.paths) if worker is None else itertools.islice(self.paths, worker.id, None, worker.num_workers)
        )
        return (load_image(path, self.transform, self.at_least) for path in paths)


def collate(items: list[Item]) -> tuple[list[str], list[str], torch.Tensor | None]:
    """The batch's paths, their errors ("" for readable files) and the stack of its readable images (or None)."""
    images = [image for _, image, _ in items if image is not None]
    return [path for path, _, _ in items], [error for _, _, error in items], torch.stack(images) if images else None


@dataclass(frozen=True)
class PredictionSummary:
    images: int  # files seen, readable or not
    errors: int  # files that could not be read
    per_class: dict[str, int]  # readable images by top-1 class (multi-label: with the class), every class listed


class TopK:
    """Single-label rows: the `top_k` classes and their probabilities, softmax(logits / temperature), the most likely
    first (`top_k` is capped at the number of classes); an image counts for its top-1 class."""

    def __init__(self, meta: Mapping[str, Any], top_k: int):
        self.classes, self.temperature = list(meta["classes"]), float(meta["temperature"])
        self.top_k = min(top_k, len(self.classes))
        self.header = list(
            itertools.chain.from_iterable((f"top{i}_class", f"top{i}_prob") for i in range(1, self.top_k + 1))
        )

    def rows(self, logits: torch.Tensor) -> Iterator[tuple[list[str], list[str]]]:
        """Each image's cells and the classes it counts for."""
        values, indices = (logits / self.temperature).softmax(dim=1).topk(self.top_k, dim=1)
        for row_values, row_indices in zip(values.tolist(), indices.tolist(), strict=True):
            names = [self.classes[i] for i in row_indices]
            cells = itertools.chain.from_iterable((n, f"{p:.6f}") for n, p in zip(names, row_values, strict=True))
            yield list(cells), names[:1]


class AboveThreshold:
    """Multi-label rows (`meta["multilabel"]`): the classes whose sigmoid(logits / temperature) is at least their
    threshold (`meta["thresholds"]`), joined by `|` (empty: none), then every class's probability (`prob_<class>`);
    an image counts for each of its classes."""

    def __init__(self, meta: Mapping[str, Any]):
        self.classes, self.temperature = list(meta["classes"]), float(meta["temperature"])
        self.thresholds = torch.tensor(meta["thresholds"])
        self.header = ["labels", *(f"prob_{name}" for name in self.classes)]

    def rows(self, logits: torch.Tensor) -> Iterator[tuple[list[str], list[str]]]:
        probs = (logits / self.temperature).sigmoid().cpu()
        for row in probs:
            labels = [name for name, above in zip(self.classes, row >= self.thresholds, strict=True) if above]
            yield ["|".join(labels), *(f"{p:.6f}" for p in row.tolist())], labels


def default_device() -> torch.device:
    """cuda when there is a GPU, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def predict(
    model: nn.Module,
    meta: Mapping[str, Any],
    paths: Iterable[str | os.PathLike],
    transform: Transform,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    top_k: int = 5,
    output_csv: str | os.PathLike = "predictions.csv",
    num_workers: int = 0,
    tta: str = "none",
    progress: bool = True,
    at_least: int | None = None,
) -> PredictionSummary:
    """Classifies every path in batches on `device` (default: cuda if available), writing one CSV row per file as
    its batch finishes: path, the prediction's cells (`TopK`, or for a multi-label model `AboveThreshold`), error.
    Each file is decoded to at least `at_least` px on its short side (`load_image`). Moves `model` to `device` and
    puts it in eval mode."""
    if meta.get("multilabel") and tta != "none":
        raise ConfigError(f"predict.tta={tta} averages softmax predictions: for single-label models only")
    rows = AboveThreshold(meta) if meta.get("multilabel") else TopK(meta, top_k)
    device = torch.device(device) if device is not None else default_device()
    model.eval().to(device)
    loader = DataLoader(
        ImageFiles(paths, transform, at_least),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
    )
    counts: Counter[str] = Counter()
    seen = errors = 0
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with (
        open(output_csv, "w", newline="") as file,
        Progress(*columns, console=Console(stderr=True), disable=not progress) as bar,
        torch.inference_mode(),
    ):
        writer = csv.writer(file)
        writer.writerow(["path", *rows.header, "error"])
        task = bar.add_task("predicting", total=None)
        for batch_paths, batch_errors, images in loader:
            predicted: Iterator[tuple[list[str], list[str]]] = iter(())
            if images is not None:
                predicted = rows.rows(tta_logits(model, images.to(device, non_blocking=True), tta))
            for path, error in zip(batch_paths, batch_errors, strict=True):
                if error:
                    writer.writerow([path, *[""] * len(rows.header), error])
                    errors += 1
                    continue
                cells, counted = next(predicted)
                counts.update(counted)
                writer.writerow([path, *cells, ""])
            seen += len(batch_paths)
            file.flush()  # rows of finished batches survive an interrupted run
            bar.update(task, completed=seen)
    return PredictionSummary(seen, errors, {name: counts[name] for name in rows.classes})


def predict_files(cfg: DictConfig) -> PredictionSummary:
    """`predict.py`: the checkpoint's model (with its stored temperature) on every file of `input`, to the CSV
    `predict.output`; prints the count per predicted class."""
    options = cfg.predict
    tta = check_tta(options.tta, "predict.tta")
    paths = ImagePaths(cfg.input)
    _, model = rebuild(checkpoint_file(cfg.ckpt_path), [])
    output = Path(options.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    summary = predict(
        model,
        model.meta,
        paths,
        eval_transform(model.input_config),
        batch_size=options.batch_size,
        device=options.device,
        top_k=options.top_k,
        output_csv=output,
        num_workers=options.num_workers,
        tta=tta,
        at_least=decode_side(model.input_config),
    )
    counts = ", ".join(f"{name} {count}" for name, count in summary.per_class.items())
    print(f"Predicted {summary.images - summary.errors} of {summary.images} files: {counts}")
    if summary.errors:
        print(f"{summary.errors} files could not be read: their reason is in the error column")
    print(f"Predictions: {output}")
    return summary


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(predict_files, cfg)

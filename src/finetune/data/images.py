"""Image folders read with errors that name the file or folder at fault."""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import numpy as np
import PIL
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from finetune.errors import DataError, MissingFileError

log = logging.getLogger(__name__)
T, R = TypeVar("T"), TypeVar("R")

CHECK_FORMAT = "finetune-check-v1"  # part of every check record's key
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
WHITE = (255, 255, 255, 255)
# `_open` refuses such images with its own message, which names the file.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageReadError(DataError):
    """An image file that cannot be decoded; the message names the file."""


def _open(path: str | Path) -> Image.Image:
    """Opens an image, refusing sizes above PIL's decompression-bomb limit (PIL only warns up to twice it)."""
    image = Image.open(path)
    limit = Image.MAX_IMAGE_PIXELS  # None: the check switched off, as PIL allows
    if limit is not None and image.width * image.height > limit:
        image.close()
        raise Image.DecompressionBombError(
            f"{image.width}x{image.height} px is more than PIL.Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS}"
        )
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any mode: 16-bit greyscale is scaled (convert('RGB') would clip it at 255), transparent
    pixels are composited on white (as a viewer shows them), palette, greyscale and CMYK are converted."""
    if image.mode.startswith("I"):  # I;16 (16-bit PNG/TIFF) and I hold 0..65535
        pixels = np.clip(np.asarray(image, dtype=np.float32) / 257, 0, 255)
        image = Image.fromarray(np.round(pixels).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        image = Image.alpha_composite(Image.new("RGBA", image.size, WHITE), image.convert("RGBA"))
    return image.convert("RGB")


def _reduction(size: tuple[int, int], at_least: int) -> int:
    """The largest JPEG DCT scaling 1/k (k = 8, 4, 2) that keeps the short side at `at_least` or more and divides
    both sides: the smaller image then covers exactly the whole one (no partial block, which would shift a resize
    of it by a fraction of a pixel: 2410x4032 at 1/4 is 603x1008); 1 for none."""
    width, height = size
    return next((k for k in (8, 4, 2) if width % k == height % k == 0 and min(size) // k >= at_least), 1)


def _decode(path: str | Path, reduced: bool = False, at_least: int | None = None) -> Image.Image:
    """The image upright: phones and cameras store photos as the sensor saw them, with an EXIF orientation
    that viewers apply; the scan (`reduced`) applies it too, so it fails wherever the full read would."""
    with _open(path) as image:
        if reduced:  # JPEG only: decoded at 1/8 size, which still reads every byte
            image.draft(None, (1, 1))
        elif at_least and (k := _reduction(image.size, at_least)) > 1:  # JPEG only (others: a no-op)
            image.draft(None, (image.width // k, image.height // k))
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        return to_rgb(image)


def read_rgb(path: str | Path, at_least: int | None = None) -> Image.Image:
    """Decodes any PIL-readable image to 3-channel 8-bit RGB (see `to_rgb`), turned upright by its EXIF orientation.

    `at_least`: the short side the transform that follows needs (`finetune.data.transforms.decode_side`); a JPEG
    is decoded at the smallest DCT scale that keeps it (libjpeg scales in the frequency domain, before the pixels
    exist, `_reduction`): a 12 MP photo read for the eval transform at 224 px is decoded at 1/4 size, and the
    loader delivers it 2.2x faster (BENCHMARKS.md)."""
    try:
        return _decode(path, at_least=at_least)
    except Exception as err:
        raise ImageReadError(f"Cannot read image {path}: {type(err).__name__}: {err}") from err


def _problem(path: Path) -> str | None:
    try:
        _decode(path, reduced=True)
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


def _one_thread() -> None:
    torch.set_num_threads(1)  # a forked process's torch ops: serial, no OpenMP pool of the parent's


def forked_map(function: Callable[[T], R], items: Sequence[T], processes: int, chunksize: int = 1) -> Iterator[R]:
    """`function` of each item, in order, in `processes` forked processes (each item, or each `chunksize` of them,
    sent to whichever is free), or here where that is under 2 or forking is unsafe (not Linux: macOS) or not
    allowed (in a daemon process). Not threads: decoding a small image holds the interpreter's lock most of the
    time, and threads wait for one another (CIFAR-10's 50,000 images: 5x slower than 2 processes; BENCHMARKS.md).
    A process that dies (killed for memory) is an error here (BrokenProcessPool), not a wait for ever."""
    if processes < 2 or sys.platform != "linux" or multiprocessing.current_process().daemon:
        yield from map(function, items)
        return
    fork = multiprocessing.get_context("fork")
    pool = ProcessPoolExecutor(processes, mp_context=fork, initializer=_one_thread)
    try:
        yield from pool.map(function, items, chunksize=chunksize)
    finally:
        pool.shutdown(cancel_futures=True)  # on an error, the items not started yet are not decoded


def usable_cores() -> int:
    """The cores this process may run on: Linux's affinity mask (a SLURM job's or a container's share), elsewhere
    (macOS) every core."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def per_core(count: int) -> tuple[int, int]:
    """Processes and chunk size for `count` small jobs: one process per core, at most one per 32 jobs; about 4
    chunks per process, at most 256 jobs each."""
    processes = min(usable_cores(), count // 32)
    return processes, max(1, min(256, count // (4 * max(processes, 1))))


def find_bad_images(paths: list[Path]) -> dict[Path, str]:
    """`{file: reason}` for every file that `read_rgb` would fail on (empty, truncated, not an image, too large).

    Each file is decoded (JPEGs at 1/8 size) in a process per core (`forked_map`).
    """
    problems = forked_map(_problem, paths, *per_core(len(paths)))
    return {path: problem for path, problem in zip(paths, problems, strict=True) if problem}


def _listing(header: str, bad: dict[Path, str], limit: int | None = None) -> str:
    lines = [f"  {path}: {problem}" for path, problem in list(bad.items())[:limit]]
    more = len(bad) - len(lines)
    return "\n".join([header, *lines, *([f"  ... and {more} more"] if more else [])])


def files_key(paths: Sequence[Path], *settings: object) -> str:
    """A hash of `settings` and of every file's path, byte size and mtime, in order: the key of what is computed
    from the files once (the decoded store, the image check), which an edited, added or removed file changes."""
    digest = hashlib.sha256("|".join(map(str, settings)).encode())
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError:  # a listed file that is not there (data=multilabel) is part of the key too
            digest.update(f"{path}|missing\n".encode())
        else:
            digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


@contextmanager
def one_at_a_time(file: Path) -> Iterator[None]:
    """A lock on `<file>.lock` (its folder made) while computing what `file` keeps: processes that start at once
    (DDP ranks, a parallel sweep's jobs, on their first run) compute it one at a time, so that the first computes
    it and the others find it. The lock's file is removed when let go (the system lets go of a killed process's
    lock); only after a failure may a process that waited and one that came later both compute. Where there is no
    lock to be had (a folder that cannot be written, a file system without locks) each computes its own."""
    path = file.with_name(file.name + ".lock")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)  # read only: another user's lock file too
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("Waiting for %s: another process (a DDP rank, a parallel run) is making it", file)
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:  # a file system without locks (some network ones): each computes its own
            pass
        yield
    finally:
        path.unlink(missing_ok=True)  # those waiting hold on to it; a later one makes a new one
        os.close(lock)  # lets go of the lock


def checked_once(paths: list[Path], records: Path | None) -> dict[Path, str]:
    """`find_bad_images`, decoded once for a set of files: what it found is kept in `records/<key>.json` (the key
    hashes the files' paths, sizes and mtimes, PIL's version and its size limit), so that a later run over the same
    unchanged files reads a stat of each instead of decoding them; `records=None` decodes them every time."""
    if records is None:
        return find_bad_images(paths)
    record = records / f"{files_key(paths, CHECK_FORMAT, PIL.__version__, Image.MAX_IMAGE_PIXELS)}.json"
    with one_at_a_time(record):
        try:
            return {Path(path): problem for path, problem in json.loads(record.read_text()).items()}
        except (OSError, ValueError):  # not checked yet (or a record cut short): decode them
            pass
        bad = find_bad_images(paths)
        partial = record.with_suffix(f".{os.getpid()}.part")  # renamed when whole: a reader never sees half
        try:
            partial.write_text(json.dumps({str(path): problem for path, problem in bad.items()}))
            partial.replace(record)
        except OSError as err:  # e.g. a checkpoint's data.checked_dir, from the machine it was trained on
            log.warning(
                "The image check is not recorded in %s (%s): set data.checked_dir to a writable folder", records, err
            )
        return bad


def unreadable(
    paths: list[Path], where: Path, skip_bad_images: bool, checked_dir: Path | None = None
) -> dict[Path, str]:
    """The bad files among `paths` (`checked_once`): an ImageReadError that lists them, or with `skip_bad_images` a
    warning (the caller leaves them out)."""
    bad = checked_once(paths, checked_dir)
    if bad and not skip_bad_images:
        header = f"{len(bad)} images in {where} cannot be read (data.skip_bad_images=true skips them):"
        raise ImageReadError(_listing(header, bad, limit=20))
    if bad:
        log.warning(_listing(f"Skipping {len(bad)} unreadable images in {where}:", bad))
    return bad


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def is_image_file(path: Path) -> bool:
    """A visible file named as an image (`IMAGE_EXTENSIONS`); `Thumbs.db`, `._photo.jpg`, `labels.csv` are not."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and _visible(path)


def image_files(folder: Path) -> Iterator[Path]:
    """The image files under `folder` and its sub-folders, those torchvision's ImageFolder finds for a class: a
    folder's own before its sub-folders', each sorted by name; hidden files and folders (`.ipynb_checkpoints`) are
    skipped. Only one folder's listing is held at a time (per level of depth)."""
    entries = sorted((e for e in os.scandir(folder) if not e.name.startswith(".")), key=lambda e: e.name)
    yield from (Path(e.path) for e in entries if e.is_file() and is_image_file(Path(e.path)))
    for entry in entries:
        if entry.is_dir():
            yield from image_files(Path(entry.path))


def find_classes(split_dir: Path) -> list[str]:
    """Class names = visible sub-folders of a split folder, sorted; a classifier needs two or more."""
    if not split_dir.is_dir():
        raise MissingFileError(f"Missing folder {split_dir} (expected one sub-folder per class)")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and _visible(p))
    if len(classes) < 2:
        found = f"only one class folder ({classes[0]})" if classes else "no class folders"
        raise DataError(f"{split_dir} has {found}: a classifier needs at least 2 ({split_dir}/<class>/<image>)")
    return classes


class ImageFolder(Dataset):
    """`root/<class>/**/<image>` files (`image_files`) as (PIL image, class index); hidden and non-image files are
    ignored.

    Every image is decoded once here, so a bad file stops the run before training with its name, or
    with `skip_bad_images` is left out and listed in the log (`skipped`); with `checked_dir`, only the first time
    for the same files (`checked_once`).
    """

    at_least: int | None = None  # the short side `read_rgb` decodes to at least (`decoded_at_least`); None: full size

    def __init__(
        self,
        root: str | Path,
        classes: list[str] | None = None,
        skip_bad_images: bool = False,
        checked_dir: Path | None = None,
    ):
        self.root = Path(root)
        found = find_classes(self.root)
        if classes is not None and found != classes:
            raise DataError(
                f"{self.root} has classes {found}, but the training split has {classes} "
                f"(missing: {sorted(set(classes) - set(found))}, extra: {sorted(set(found) - set(classes))}): "
                "every split needs the same class folders"
            )
        self.classes = found
        files = {name: list(image_files(self.root / name)) for name in found}
        every = [path for of_class in files.values() for path in of_class]
        self.skipped = unreadable(every, self.root, skip_bad_images, checked_dir)
        self.samples: list[tuple[Path, int]] = []
        for index, name in enumerate(found):
            good = [p for p in files[name] if p not in self.skipped]
            if not good:
                readable = "readable " if files[name] else ""
                raise DataError(
                    f"Class folder {self.root / name} holds no {readable}images ({', '.join(IMAGE_EXTENSIONS)})"
                )
            self.samples += [(p, index) for p in good]
        self.targets = [label for _, label in self.samples]

    def decoded_at_least(self, side: int) -> ImageFolder:
        """The same images (the same lists, not copied), read with `read_rgb(path, at_least=side)`."""
        view = copy.copy(self)
        view.at_least = side
        return view

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        return read_rgb(path, self.at_least), label

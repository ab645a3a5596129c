"""How long the decoded image store takes to build (`finetune.data.store`: the first `data.store=true` run pays it).

    python -m benchmarks.store_build --folders ../shared/datasets/seefood512/train
    python -m benchmarks.store_build --folders /tmp/cifar10/train --rounds 3     # after tar -xzf cifar10-jpg.tar.gz
    python -m benchmarks.store_build --folders /tmp/cifar10/train --runs 2       # 2 first runs at once

Each folder's images (an `ImageFolder`'s files, checked before the clock starts) are decoded into a new store in a
temporary folder, `--rounds` times (median): the header pass that picks the side (`default_side`; `--side` skips
it) and `build_store`, as `StoredImages.of` runs them, for ImageNet's usual eval transform (a 256 px resize, bilinear).
With `--runs N`, N processes ask `StoredImages.of` for the same new store at once, as DDP ranks or a parallel sweep's
jobs do on their first run: the time until each has it.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks._common import at_once, benchmark_parser, machine, median, table
from finetune.data.images import ImageFolder
from finetune.data.store import StoredImages, build_store, default_side
from finetune.models import InputConfig

CONFIG = InputConfig()  # 224 px crops of a 256 px resize, bilinear


def build_seconds(paths: list[Path], side: int | None) -> tuple[float, int]:
    """Seconds to pick the side (unless given) and build the store of `paths`; the side."""
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        side = side or default_side(paths, CONFIG.resize)
        build_store(paths, side, CONFIG, Path(folder) / "store.npy")
        return time.perf_counter() - start, side


def concurrent_seconds(folder: ImageFolder, runs: int, side: int | None) -> tuple[float, int]:
    """Seconds until `runs` processes that ask for the folder's new store at once all have it; its side."""
    with tempfile.TemporaryDirectory() as store_dir:
        start = time.perf_counter()
        at_once(StoredImages.of, folder, side, CONFIG, Path(store_dir), runs=runs)
        seconds = time.perf_counter() - start
        return seconds, StoredImages.of(folder, side, CONFIG, Path(store_dir)).side


def main(argv: list[str] | None = None) -> list[list[object]]:
    parser = benchmark_parser(__doc__, overrides=None)
    parser.add_argument("--folders", nargs="+", type=Path, required=True, help="image folders (<class>/<image>)")
    parser.add_argument("--side", type=int, help="the stored short side (default: as data.store_size=null picks it)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=1, help="processes asking for the same new store at once")
    args = parser.parse_args(argv)
    print(f"Machine: {machine()}\n")
    rows = []
    for folder in args.folders:
        images = ImageFolder(folder)
        paths = [path for path, _ in images.samples]
        if args.runs > 1:
            runs = [concurrent_seconds(images, args.runs, args.side) for _ in range(args.rounds)]
        else:
            runs = [build_seconds(paths, args.side) for _ in range(args.rounds)]
        seconds = median([s for s, _ in runs])
        rows.append([str(folder), len(paths), runs[0][1], seconds, len(paths) / seconds])
    print(table(["folder", "images", "side px", "build s", "images/s"], rows))
    return rows


if __name__ == "__main__":
    main()

"""How long the decoded image store takes to build (`finetune.data.store`: the first `data.store=true` run pays it).

    python -m benchmarks.store_build --folders ../shared/datasets/seefood512/train
    python -m benchmarks.store_build --folders /tmp/cifar10/train --rounds 3     # after tar -xzf cifar10-jpg.tar.gz

Each folder's images (an `ImageFolder`'s files, checked before the clock starts) are decoded into a new store in a
temporary folder, `--rounds` times (median): the header pass that picks the side (`default_side`; `--side` skips
it) and `build_store`, as `StoredImages.of` runs them, for ImageNet's usual eval transform (a 256 px resize, bilinear).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks._common import benchmark_parser, machine, median, table
from finetune.data.images import ImageFolder
from finetune.data.store import build_store, default_side
from finetune.models import InputConfig

CONFIG = InputConfig()  # 224 px crops of a 256 px resize, bilinear


def build_seconds(paths: list[Path], side: int | None) -> tuple[float, int]:
    """Seconds to pick the side (unless given) and build the store of `paths`; the side."""
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        side = side or default_side(paths, CONFIG.resize)
        build_store(paths, side, CONFIG, Path(folder) / "store.npy")
        return time.perf_counter() - start, side


def main(argv: list[str] | None = None) -> list[list[object]]:
    parser = benchmark_parser(__doc__, overrides=None)
    parser.add_argument("--folders", nargs="+", type=Path, required=True, help="image folders (<class>/<image>)")
    parser.add_argument("--side", type=int, help="the stored short side (default: as data.store_size=null picks it)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"Machine: {machine()}\n")
    rows = []
    for folder in args.folders:
        paths = [path for path, _ in ImageFolder(folder).samples]
        runs = [build_seconds(paths, args.side) for _ in range(args.rounds)]
        seconds = median([s for s, _ in runs])
        rows.append([str(folder), len(paths), runs[0][1], seconds, len(paths) / seconds])
    print(table(["folder", "images", "side px", "build s", "images/s"], rows))
    return rows


if __name__ == "__main__":
    main()

"""What the bad-image scan at setup costs, and what a cheaper header check would miss.

    python -m benchmarks.image_scan                   # hotdog64 and seefood512 from ../shared/datasets
    python -m benchmarks.image_scan --rounds 5
    python -m benchmarks.image_scan --root /tmp --datasets cifar10   # after tar -xzf cifar10-jpg.tar.gz -C /tmp/cifar10

`ImageFolder` decodes every file once before training (`finetune.data.images.find_bad_images`: a process
per core, JPEGs at 1/8 size). Timed against: a header check (`Image.open` + `verify`, in a thread pool), and one
full sequential pass of `read_rgb` over the same files, the decoding that every epoch does at least, and what
a later run over the same files pays (`recorded`: `checked_once` reading the first run's record, `data.checked_dir`).
The four alternate for `--rounds` rounds (medians), so load from other jobs falls on all of them.
Then each kind of bad file is built and both checks are asked whether they catch it.
"""

from __future__ import annotations

import struct
import tempfile
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks._common import DATASETS, benchmark_parser, machine, median, table
from finetune.data.images import IMAGE_EXTENSIONS, checked_once, find_bad_images, read_rgb


def header_problems(paths: list[Path]) -> dict[Path, str]:
    """The cheap alternative: parse the header and, where the format has one (PNG), verify checksums."""

    def problem(path: Path) -> str | None:
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as err:
            return f"{type(err).__name__}: {err}"
        return None

    with ThreadPoolExecutor() as pool:
        problems = list(pool.map(problem, paths))
    return {path: p for path, p in zip(paths, problems, strict=True) if p}


def decode_all(paths: list[Path]) -> None:
    for path in paths:
        read_rgb(path)


def timed(function: Callable[[list[Path]], object], paths: list[Path]) -> float:
    start = time.perf_counter()
    function(paths)
    return time.perf_counter() - start


def png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def bad_files(folder: Path) -> dict[str, Path]:
    pixels = Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8))
    pixels.save(folder / "whole.jpg")
    pixels.save(folder / "whole.png")
    jpeg, png = (folder / "whole.jpg").read_bytes(), (folder / "whole.png").read_bytes()
    cases = {
        "truncated JPEG (half the file)": ("truncated.jpg", jpeg[: len(jpeg) // 2]),
        "truncated PNG (half the file)": ("truncated.png", png[: len(png) // 2]),
        "JPEG with its last 2 bytes (EOI) cut": ("no_eoi.jpg", jpeg[:-2]),
        "empty file": ("empty.jpg", b""),
        "text named .jpg": ("text.jpg", b"not an image\n"),
        "decompression bomb (10^10 px header)": ("bomb.png", png_header(100_000, 100_000)),
        "over MAX_IMAGE_PIXELS (10^8 px header)": ("large.png", png_header(10_000, 10_000)),
    }
    for name, content in cases.values():
        (folder / name).write_bytes(content)
    return {case: folder / name for case, (name, _) in cases.items()}


def main(argv: list[str] | None = None) -> tuple[list[list[object]], list[list[str]]]:
    parser = benchmark_parser(__doc__, overrides=None)
    parser.add_argument("--root", type=Path, default=DATASETS, help="the folder that holds the datasets")
    parser.add_argument("--datasets", nargs="+", default=["hotdog64", "seefood512"])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"Machine: {machine()}\n")

    rows = []
    for name in args.datasets:
        paths = sorted(p for p in (args.root / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not paths:
            print(f"{args.root / name}: absent, skipped")
            continue
        decode_all(paths)  # warm the page cache: every variant reads from memory
        with tempfile.TemporaryDirectory() as records:
            checked_once(paths, Path(records))  # the first run's record
            times: dict[str, list[float]] = {"scan": [], "header": [], "epoch": [], "recorded": []}
            for _ in range(args.rounds):
                times["scan"].append(timed(find_bad_images, paths))
                times["header"].append(timed(header_problems, paths))
                times["epoch"].append(timed(decode_all, paths))
                times["recorded"].append(timed(lambda files: checked_once(files, Path(records)), paths))
        scan, header, epoch, recorded = (median(times[k]) for k in ("scan", "header", "epoch", "recorded"))
        rows.append([name, len(paths), scan, header, epoch, recorded, scan / epoch, header / epoch, recorded / scan])
    headers = ["dataset", "files", "scan s", "header check s", "one decode pass s", "recorded s"]
    print(table([*headers, "scan/pass", "header/pass", "recorded/scan"], rows))

    with tempfile.TemporaryDirectory() as tmp:
        cases = bad_files(Path(tmp))
        found_by_scan = find_bad_images(list(cases.values()))
        found_by_header = header_problems(list(cases.values()))
        caught = [
            [case, "yes" if path in found_by_scan else "no", "yes" if path in found_by_header else "no"]
            for case, path in cases.items()
        ]
    print("\nWhich bad files each check catches (a decode at training time fails on all of them):\n")
    print(table(["bad file", "scan (decode)", "header check"], caught))
    return rows, caught


if __name__ == "__main__":
    main()

"""What each training augmentation costs: images/s of the training DataLoader with one worker.

    python -m benchmarks.augment                          # hotdog64 at 128 px, 320 images per round
    python -m benchmarks.augment --images 640 --variants d2l mixup=0.2

Each variant is the project's training DataLoader (`ImageFolderDataModule.train_dataloader`: seeded
sampling, decode, the transform, MixUp/CutMix in the collate) with `data.<key>=<value>` set as given,
e.g. `augment=randaugment` or `random_erasing=0.25`. The rate is the median of `--rounds` (which
alternate the variants), counted after one warm-up batch (the worker's start). Wall-clock rates move with the machine's load, so each
variant is also timed in this process (no worker, one thread) in CPU time: "CPU ms per batch".
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from benchmarks._common import DATASETS, benchmark_parser, machine, median, table
from finetune.data.datamodule import ImageFolderDataModule
from finetune.models.backbones import InputConfig

VARIANTS = [
    "augment=none",
    "augment=d2l",
    "augment=trivialaugment",
    "augment=randaugment",
    "random_erasing=0.25",
    "mixup=0.2",
    "cutmix=1.0",
    "mixup=0.2,cutmix=1.0",
]


def options(variant: str) -> dict[str, object]:
    """`key=value[,key=value]` -> datamodule keyword arguments (numbers as floats)."""
    pairs = (item.split("=", 1) for item in variant.split(","))
    return {key: value if key in ("augment", "sampler") else float(value) for key, value in pairs}


def loader_rate(data: ImageFolderDataModule, images: int, epoch: int, clock=time.perf_counter) -> float:
    """Training images per second of `clock` over the first `images` of an epoch, after one warm-up batch."""
    loader = data.train_dataloader()
    loader.sampler.set_epoch(epoch)
    count, start = 0, None
    for batch, _ in loader:
        if start is None:
            start = clock()
            continue
        count += len(batch)
        if count >= images:
            break
    return count / (clock() - start)


def cpu_rate(data: ImageFolderDataModule, images: int, epoch: int) -> float:
    """`loader_rate` in this process's CPU time, without workers, on one thread."""
    threads, workers = torch.get_num_threads(), (data.num_workers, data.persistent_workers)
    torch.set_num_threads(1)
    data.num_workers, data.persistent_workers = 0, False
    try:
        return loader_rate(data, images, epoch, time.process_time)
    finally:
        torch.set_num_threads(threads)
        data.num_workers, data.persistent_workers = workers


def main(argv: list[str] | None = None) -> list[list[object]]:
    parser = benchmark_parser(__doc__, overrides=None)
    parser.add_argument("--data", type=Path, default=DATASETS / "hotdog64")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=320, help="timed images per round (after the warm-up batch)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=VARIANTS, help="data keys as key=value[,key=value]")
    args = parser.parse_args(argv)

    print(f"# Training DataLoader, {args.workers} worker(s), batches of {args.batch_size}: {machine()}\n", flush=True)
    datamodules = {}
    for variant in args.variants:
        datamodules[variant] = ImageFolderDataModule(
            InputConfig(args.image_size),
            args.data,
            batch_size=args.batch_size,
            val_fraction=0,
            num_workers=args.workers,
            persistent_workers=False,
            **options(variant),
        )
        datamodules[variant].setup()
    rates: dict[str, list[tuple[float, float]]] = {variant: [] for variant in args.variants}
    for epoch in range(args.rounds):  # the variants alternate, so load from other jobs falls on all of them
        for variant, data in datamodules.items():
            rates[variant].append((loader_rate(data, args.images, epoch), cpu_rate(data, args.images, epoch)))
    rows = [
        [variant, median([wall for wall, _ in found]), 1000 * args.batch_size / median([cpu for _, cpu in found])]
        for variant, found in rates.items()
    ]
    print(f"images/s delivered at {args.image_size} px\n")
    print(table(["variant (data.<key>)", f"images/s, {args.workers} worker(s)", "CPU ms per batch"], rows))
    return rows


if __name__ == "__main__":
    main()

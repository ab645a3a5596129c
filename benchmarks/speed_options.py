"""What each speed option gives train.py's fit on this machine: images/s against the defaults, in one process.

    python -m benchmarks.speed_options                           # ResNet-18 and EfficientNet-Lite0 at 128 px
    python -m benchmarks.speed_options --models resnet18 --sizes 224 --compile
    python -m benchmarks.speed_options strategy=freeze            # a linear probe (forward-only backbone)

Options against the defaults: `model.channels_last=false`, `trainer.precision=bf16-mixed` (with and
without channels-last), `model.compile=true` (with `--compile`: its first steps include the
compilation, reported apart), and the DataLoader's
`data.num_workers` and `data.persistent_workers` (`pin_memory` only matters with a GPU), and the cost of
`callbacks.ema.enabled=true` (an average of the weights updated after every step). Each
variant is the fit as train.py builds it (progress bar off) over `--steps` timed steps after
`--warmup`, in rounds that take the variants in turn, so other jobs' load falls on all of them; the
figure is the median. `epoch start s` is the wait from the start of the second epoch to its first
step's end minus a step: what re-creating the workers costs every epoch.
"""

from __future__ import annotations

import gc
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L

from benchmarks._common import (
    EVERY_WEIGHT_TRAINS,
    MODELS,
    QUIET,
    StepClock,
    add_speed_arguments,
    benchmark_parser,
    fit,
    images_per_s,
    machine,
    median,
    table,
)
from finetune.config import compose_config

VARIANTS = {
    "defaults": [],  # fp32, channels-last, 2 persistent workers
    "channels_last=false": ["model.channels_last=false"],
    "bf16-mixed": ["trainer.precision=bf16-mixed"],
    "bf16-mixed, channels_last=false": ["trainer.precision=bf16-mixed", "model.channels_last=false"],
    "num_workers=0": ["data.num_workers=0"],
    "num_workers=1": ["data.num_workers=1"],
    "persistent_workers=false": ["data.persistent_workers=false"],
    "ema": ["callbacks.ema.enabled=true"],  # the weights' moving average, updated after every step
}


class EpochClock(StepClock):
    """Step end times, and when each epoch started."""

    def __init__(self) -> None:
        super().__init__()
        self.epoch_starts: list[tuple[float, int]] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch_starts.append((time.perf_counter(), len(self.times)))


def measure(cfg, warmup: int, batch_size: int) -> dict[str, float]:
    clock = EpochClock()
    fit(cfg, clock)
    steps = len(clock.times) // 2  # two epochs of `steps` each
    first_epoch = clock.times[:steps]
    start, index = clock.epoch_starts[1]
    step = (first_epoch[-1] - first_epoch[warmup - 1]) / (steps - warmup)
    return {
        "rate": images_per_s(first_epoch, warmup, batch_size),
        "first_steps_s": first_epoch[warmup - 1] - clock.epoch_starts[0][0],
        "epoch_start_s": clock.times[index] - start - step,
    }


def main(argv: list[str] | None = None) -> list[list[Any]]:
    parser = benchmark_parser(__doc__, "extra overrides for every variant")
    add_speed_arguments(parser, sizes=[128], steps=10, rounds=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--compile", action="store_true", help="also model.compile=true (slow to compile)")
    args = parser.parse_args(argv)
    variants = {name: VARIANTS[name] for name in args.variants}
    if args.compile:
        variants["compile"] = ["model.compile=true"]

    print(f"# Speed options of train.py's fit: {machine()}\n", flush=True)
    steps = args.warmup + args.steps
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for size in args.sizes:
                common = [
                    "data=imagefolder",
                    f"data.root={args.data}",
                    f"data.image_size={size}",
                    f"data.batch_size={args.batch_size}",
                    *MODELS[model],
                    *EVERY_WEIGHT_TRAINS,
                    *QUIET,
                    "trainer.max_epochs=2",
                    f"++trainer.limit_train_batches={steps}",
                    "++trainer.limit_val_batches=0",
                    "++trainer.num_sanity_val_steps=0",
                    *args.overrides,
                ]
                results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
                for _ in range(args.rounds):
                    for name, extra in variants.items():
                        cfg = compose_config([*common, *extra], Path(tmp))
                        results[name].append(measure(cfg, args.warmup, args.batch_size))
                        gc.collect()
                        print(model, size, name, results[name][-1], flush=True)
                base = median([r["rate"] for r in results["defaults"]]) if "defaults" in results else float("nan")
                for name, runs in results.items():
                    rate = median([r["rate"] for r in runs])
                    first = median([r["first_steps_s"] for r in runs])
                    epoch_start = median([r["epoch_start_s"] for r in runs])
                    rows.append([model, size, name, rate, rate / base, first, epoch_start])
    print(f"\nimages/s of training steps (median of {args.rounds} rounds) and x the defaults\n")
    headers = ["model", "size", "variant", "images/s", "x defaults", f"first {args.warmup} steps s", "epoch start s"]
    print(table(headers, rows))
    return rows


if __name__ == "__main__":
    main()

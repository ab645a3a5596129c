"""The host's time per training step of train.py's fit, by progress bar: what a GPU step has to hide.

    script -qc "python -m benchmarks.host_time" /dev/null      # in a terminal (Rich draws only there)
    python -m benchmarks.host_time --steps 100 --rounds 3 --variants off 10Hz

On a GPU the host queues each step's work while the device runs the step before; a step's device time hides the
host's only if the host needs less. A tiny random-init model at 32 px on the CPU (batch 4, no workers) leaves
mostly the host's own work per step: Lightning's loop, the callbacks, the optimizer's Python, the kernel launches.
Rich's progress bar redraws from a thread of its own at `refresh_rate` times a second (Lightning's default 100), and
takes the interpreter's lock from the training loop each time. Each variant is the fit as train.py builds it (the
defaults' callbacks and loggers), the variants in turn for `--rounds` rounds; ms per step over the steps after
`--warmup`, wall and CPU time of this process, median of rounds.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from benchmarks._common import (
    DATASETS,
    HOST_BOUND,
    StepClock,
    benchmark_parser,
    fit,
    images_per_s,
    in_turn,
    machine,
    median,
    table,
)
from finetune.config import compose_config

VARIANTS = {
    "off": ["~callbacks.progress_bar", "++trainer.enable_progress_bar=false"],
    "100Hz": ["callbacks.progress_bar.refresh_rate=100"],  # Lightning's default
    "10Hz": [],  # the defaults (conf/callbacks/default.yaml)
}


def main(argv: list[str] | None = None) -> list[list[object]]:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--data", type=Path, default=DATASETS / "hotdog64")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args(argv)
    if not sys.stdout.isatty():
        print("stdout is no terminal: Rich does not draw (run it in one, or under `script -qc`)", file=sys.stderr)
    torch.set_num_threads(1)  # the host's own work, not a parallel kernel's
    print(f"# Host time per training step: {machine()}\n", flush=True)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in args.variants}
    redraws: dict[str, int] = {}  # the bar's redraws a second, as the trainer got it (0: no bar)
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for name in in_turn(args.variants, round_):
                cfg = compose_config(
                    [
                        *HOST_BOUND,
                        f"data.root={args.data}",
                        "strategy=finetune",
                        "trainer.max_epochs=1",
                        f"++trainer.limit_train_batches={args.steps}",
                        "++trainer.limit_val_batches=0",
                        "++trainer.num_sanity_val_steps=0",
                        "~callbacks.model_summary",
                        *VARIANTS[name],
                        *args.overrides,
                    ],
                    Path(tmp) / f"{name}-{round_}",
                )
                clock = StepClock()
                trainer, *_ = fit(cfg, clock)
                bar = trainer.progress_bar_callback
                redraws[name] = bar.refresh_rate if bar is not None and bar.is_enabled else 0
                wall, cpu = (1000 / images_per_s(ticks, args.warmup, 1) for ticks in (clock.times, clock.cpu))
                times[name].append((wall, cpu))
                print(f"round {round_} {name}: {wall:.2f} ms/step wall, {cpu:.2f} CPU", file=sys.stderr, flush=True)
    base = median([wall for wall, _ in times[args.variants[0]]])
    rows = [
        [
            name,
            redraws[name],
            median([wall for wall, _ in runs]),
            median([cpu for _, cpu in runs]),
            median([wall for wall, _ in runs]) - base,
            " ".join(f"{wall:.2f}" for wall, _ in runs),
        ]
        for name, runs in times.items()
    ]
    headers = [
        "progress bar",
        "redraws/s",
        "ms/step",
        "CPU ms/step",
        f"ms/step more than {args.variants[0]}",
        "rounds (ms/step)",
    ]
    print(f"\nms per training step (median of {args.rounds} rounds)\n")
    print(table(headers, rows))
    return rows


if __name__ == "__main__":
    main()

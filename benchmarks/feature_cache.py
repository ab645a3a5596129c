"""A linear probe with and without the feature cache, run as a user runs it: `python train.py ...`, end to end.

    python -m benchmarks.feature_cache                  # hotdog64, efficientnet_lite0, 128 px, 10 epochs
    python -m benchmarks.feature_cache --augment-views 5  # also with augmentation: uncached vs 5 cached views

The same probe (strategy=freeze, data.augment=none) three times: without the cache, with a cold cache
(the features are computed during the run) and with a warm one (the next run on the same data and
backbone, e.g. the next job of an lr sweep). Each run is timed from process start to exit; epoch times
are the differences between the wall times of consecutive `train/loss_epoch` scalars in the run's
TensorBoard events; test accuracy is what the run prints.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from benchmarks._common import ROOT, add_run_arguments, benchmark_parser, machine, median, run_overrides, table


def run_train(args: list[str], root: Path, name: str) -> dict[str, object]:
    """`python train.py <args>` in a fresh process: wall time, epoch times, test accuracy, feature extraction time."""
    run_dir = root / name
    command = [sys.executable, "train.py", *args, f"hydra.run.dir={run_dir}", f"paths.data_dir={root / 'data'}"]
    env = {**os.environ, "FINETUNE_ROOT": str(root), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    output = result.stdout + result.stderr
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{output[-3000:]}")
    events = EventAccumulator(str(next((run_dir / "tensorboard").iterdir()))).Reload()  # tensorboard/<run name>/
    ends = [event.wall_time for event in events.Scalars("train/loss_epoch")]
    extractions = re.findall(r"Features of \d+ images computed in ([\d.]+) s", output)
    return {
        "run": name,
        "wall_s": wall,
        "epochs_s": [b - a for a, b in itertools.pairwise(ends)],  # epoch 1, 2, ...: each after the first
        "extraction_s": sum(map(float, extractions)) if extractions else None,  # None: nothing computed
        "test_acc": float(re.search(r"Test accuracy: ([\d.]+)", output)[1]),
    }


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = benchmark_parser(__doc__, "extra overrides for every run")
    add_run_arguments(parser, epochs=10)
    parser.add_argument("--augment-views", type=int, default=0, help="also compare with augmentation on, N views")
    args = parser.parse_args(argv)

    common = [
        *run_overrides(args),
        "strategy=freeze",
        "~callbacks.progress_bar",
        *args.overrides,
    ]
    plan = [
        ("uncached", ["data.augment=none"]),
        ("cached (cold)", ["data.augment=none", "callbacks.feature_cache.enabled=true"]),
        ("cached (warm)", ["data.augment=none", "callbacks.feature_cache.enabled=true"]),
    ]
    if args.augment_views:
        views = args.augment_views
        plan += [
            ("augmented, uncached", ["data.augment=d2l"]),
            (
                f"augmented, {views} views cached",
                ["callbacks.feature_cache.enabled=true", f"callbacks.feature_cache.views={views}"],
            ),
        ]
    print(f"# Feature cache, python train.py {' '.join(common)}: {machine()}\n", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, extra) in enumerate(plan):
            results.append(run_train([*common, *extra], Path(tmp), f"{index}"))
            results[-1]["run"] = name
            print({k: v if k != "epochs_s" else [round(e, 2) for e in v] for k, v in results[-1].items()}, flush=True)

    base = results[0]
    rows = [
        [
            r["run"],
            r["wall_s"],
            base["wall_s"] / r["wall_s"],
            median(r["epochs_s"]),
            min(b / e for b, e in zip(base["epochs_s"], r["epochs_s"], strict=True)),
            r["extraction_s"],
            r["test_acc"],
        ]
        for r in results[:3]
    ]
    print("\nwall = process start to exit; epoch = each epoch after the first; speed-ups against the uncached run\n")
    headers = ["run", "wall s", "end-to-end speed-up", "median epoch s", "min epoch speed-up", "features s", "test acc"]
    print(table(headers, rows))
    if args.augment_views:
        print(
            "\n" + table(["run", "wall s", "test acc"], [[r["run"], r["wall_s"], r["test_acc"]] for r in results[3:]])
        )
    return results


if __name__ == "__main__":
    main()

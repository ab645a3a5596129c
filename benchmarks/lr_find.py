"""How far is lr_find.py's suggestion from the best lr of a sweep? On one data set: lr_find.py with the recipe (the
default strategy's first phase: the head's lr) and with `strategy=finetune` (every weight training), then compare.py
races the recipe at 5 lrs and at both suggestions, 3 seeds each (one multirun, paired statistics, compare.md).
Prints each setting's test accuracy and each suggestion's distance to the best lr of the sweep, in points.

    python -m benchmarks.lr_find                              # hotdog64, EfficientNet-Lite0 at 128 px, 5 epochs
    python -m benchmarks.lr_find --data cifar10               # the CIFAR-10 subset (100 + 50 images per class)
    python -m benchmarks.lr_find --lrs 1e-4 3e-4 1e-3 3e-3 1e-2
    python -m benchmarks.lr_find --tiny                       # generated images, the small backbone, 1 seed

The recipe is train.py's defaults (the recommended recipe) with `benchmarks.strategies`' model, size and epochs,
changed by trailing overrides, which lr_find.py gets too. The sweep: `optimizer.lr` half a decade apart around the
recipe's 3e-4 (3e-5 .. 3e-3; the head at 10x each). The same command again reuses the suggestions found (in the
output folder, `suggestions.json`) and resumes the comparison (compare.py skips completed jobs). Results: a JSON line
per run in benchmarks/results/lr_find.jsonl (`--tiny`: in the output folder).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from datetime import date
from pathlib import Path

from benchmarks._common import ROOT, machine, table
from benchmarks.strategies import comparison_parser, data_root, recipe
from finetune.comparison import Comparison, build_report
from finetune.config import compose_config
from finetune.data.synthetic import generate_shapes
from finetune.lr_find import find_lr

LRS = ["3e-5", "1e-4", "3e-4", "1e-3", "3e-3"]
# What each suggestion is found with, besides the recipe: the default strategy's first phase, and every weight
SUGGESTIONS = {"lr_find_head": [], "lr_find_all": ["strategy=finetune"]}
RESULTS = ROOT / "benchmarks" / "results" / "lr_find.jsonl"
# --tiny: 2 generated classes of 8 training images at 32 px, the small backbone, batches of 4, one epoch
TINY = [
    "model=timm",
    "model.name=test_resnet",
    "strategy.pretrained=false",
    "data.image_size=32",
    "data.batch_size=4",
    "data.num_workers=0",
    "data.min_steps_per_epoch=0",
    "trainer.max_epochs=1",
    "compare.estimate=false",
]


def suggestions(common: list[str], out: Path) -> dict[str, float]:
    """Each suggestion's lr: lr_find.py run in this process with the recipe (its folder under `out`), or the one a
    previous run of this benchmark found (`out/suggestions.json`)."""
    found_file = out / "suggestions.json"
    found = json.loads(found_file.read_text()) if found_file.is_file() else {}
    for name, extra in SUGGESTIONS.items():
        if name not in found:
            lr_find_overrides = [o for o in common if not o.startswith("compare.")]
            found[name] = find_lr(compose_config([*lr_find_overrides, *extra], out / name, "lr_find"))
            out.mkdir(parents=True, exist_ok=True)
            found_file.write_text(json.dumps(found, indent=2) + "\n")
    return found


def settings(lrs: list[str], found: dict[str, float]) -> dict[str, str]:
    """The raced settings, by name: the sweep's lrs and the suggestions, as `optimizer.lr` values."""
    return {f"lr_{lr}": lr for lr in lrs} | {name: f"{lr:g}" for name, lr in found.items()}


def compare_command(common: list[str], raced: dict[str, str], seeds: str, out: Path) -> list[str]:
    """compare.py's command line: the recipe at each raced lr (no strategies), the seeds, the folder."""
    listed = ", ".join(f'{name}: ["optimizer.lr={lr}"]' for name, lr in raced.items())
    return [
        *common,
        "compare.strategies=[]",
        f"compare.settings={{{listed}}}",
        f"compare.seeds=[{seeds}]",
        f"hydra.sweep.dir={out}",
    ]


def gaps(comparison: Comparison, raced: dict[str, str]) -> dict[str, float]:
    """Each suggestion's mean test accuracy minus the best mean of the sweep's lrs, in points (negative: worse)."""
    means = {row.setting: row.mean for row in comparison.rows}
    best = max(means[name] for name in raced if name not in SUGGESTIONS)
    return {name: round(100 * (means[name] - best), 2) for name in raced if name in SUGGESTIONS}


def summary(comparison: Comparison, raced: dict[str, str]) -> str:
    """A table: every raced setting, its lr, its test accuracy (mean and 95 % CI) and its distance to the best."""
    best = comparison.best
    rows = [
        [
            row.setting,
            raced[row.setting],
            f"{row.mean:.3f}" if math.isnan(row.half) else f"{row.mean:.3f} ± {row.half:.3f}",
            "best" if row.best else f"{100 * row.diff:+.1f}",
        ]
        for row in comparison.rows
    ]
    note = f"the best: {best.setting}; points: paired mean difference to it over seeds {comparison.seeds}"
    return table(["setting", "optimizer.lr", "test accuracy", "vs the best (points)"], rows) + f"\n({note})"


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = comparison_parser(
        __doc__, None, image_size=128, num_workers=2, overrides="extra overrides for every run and for lr_find.py"
    )
    parser.add_argument("--lrs", nargs="+", default=LRS, help="the sweep's optimizer.lr values")
    parser.add_argument(
        "--tiny", action="store_true", help="generated images, the small backbone, lrs 1e-3 1e-2, seed 1"
    )
    args = parser.parse_args(argv)
    if args.tiny:
        out = (args.out or ROOT / "logs" / "benchmarks" / "lr_find-tiny").resolve()
        root = out / "shapes"
        if not root.is_dir():
            generate_shapes(root, num_classes=2, train_per_class=8, test_per_class=4, size=32, seed=0)
        args.overrides, args.lrs, args.seeds = [*TINY, *args.overrides], ["1e-3", "1e-2"], "1"
    else:
        root = data_root(args)
        out = (args.out or ROOT / "logs" / "benchmarks" / f"lr_find-{root.name}").resolve()
    common = recipe(args, root)

    found = suggestions(common, out)
    raced = settings(args.lrs, found)
    command = [sys.executable, "compare.py", *compare_command(common, raced, args.seeds, out / "compare")]
    print("$", " ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)

    comparison = build_report(out / "compare").comparisons[None]
    print(f"\n# lr_find against a sweep of the recipe: {root.name}, {machine()}\n{summary(comparison, raced)}")
    result = {
        "date": date.today().isoformat(),
        "data": root.name,
        "seeds": comparison.seeds,
        "suggestions": found,
        "accuracy": {row.setting: round(row.mean, 4) for row in comparison.rows},
        "points_from_the_best_lr": gaps(comparison, raced),
        "overrides": common,
    }
    print(json.dumps(result), flush=True)
    results = out / "lr_find.jsonl" if args.tiny else RESULTS
    with results.open("a") as file:
        file.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()

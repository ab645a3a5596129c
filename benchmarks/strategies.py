"""Strategy comparison on real data: EfficientNet-Lite0 (ImageNet weights), every strategy, several seeds, run by
`compare.py` (one multirun, paired statistics, compare.md; docs/compare.md). This script only picks the data, the
recipe and the settings:

    python -m benchmarks.strategies                                  # hotdog64, 128 px, seeds 1..3, 5 epochs
    python -m benchmarks.strategies --data cifar10                   # 100 + 50 images per class
    python -m benchmarks.strategies --data seefood512
    python -m benchmarks.strategies --shots 5 10 25 all              # the few-shot learning curve too
    python -m benchmarks.strategies --lr 6.4e-3 optimizer=sgd scheduler=none loss.label_smoothing=0 data.batch_size=128   # d2l's

Every strategy with the recipe (train.py's defaults, the recommended recipe, changed by trailing overrides), and
`scratch` again at 10x its lr for every weight (`scratch_lr10x`), as d2l trains its scratch model, so scratch is not
judged at an lr chosen for pretrained weights. The same command again resumes a cut run (compare.py skips the
completed jobs). The shared datasets are never copied into the project; CIFAR-10's subset is extracted to /tmp.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks._common import DATASETS, ROOT, benchmark_parser
from finetune.config import compose_config

STRATEGIES = "scratch,freeze,finetune,freeze_unfreeze,gradual,llrd"


def cifar10_subset(archive: Path, dest: Path, train_per_class: int, test_per_class: int) -> Path:
    """The images numbered below N in every class folder of the JPEG export (the same subset every time)."""
    done = dest / ".complete"
    if done.exists():
        return dest
    limits = {"train": train_per_class, "test": test_per_class}
    with tarfile.open(archive) as tar:
        members = [
            m
            for m in tar
            if m.isfile() and len(parts := Path(m.name).parts) == 3 and int(Path(parts[2]).stem) < limits[parts[0]]
        ]
        tar.extractall(dest, members=members, filter="data")
    done.touch()
    return dest


def data_root(args) -> Path:
    if args.data == "cifar10":
        subset = f"cifar10-{args.train_per_class}-{args.test_per_class}"
        return cifar10_subset(
            DATASETS / "cifar10-jpg.tar.gz", Path("/tmp") / subset, args.train_per_class, args.test_per_class
        )
    if args.data in ("hotdog64", "seefood512"):
        return DATASETS / args.data
    return Path(args.data).resolve()


def recipe(args, root: Path) -> list[str]:
    """Every job's overrides: the recipe (train.py's defaults) on EfficientNet-Lite0 at the size and epochs given,
    on the image folder `root`, and the trailing overrides."""
    return [
        "model=efficientnet_lite0",
        "data=imagefolder",
        f"data.root={root}",
        f"data.image_size={args.image_size}",
        f"data.num_workers={args.num_workers}",
        f"trainer.max_epochs={args.epochs}",
        "~callbacks.progress_bar",
        "~callbacks.model_summary",
        *args.overrides,
    ]


def compare_command(args, root: Path, out: Path) -> list[str]:
    """compare.py's command line: the recipe's overrides, the strategies and scratch at 10x its lr, seeds, shots."""
    common = recipe(args, root)
    lr = args.lr or compose_config(common, out).optimizer.lr
    shots = ",".join(args.shots)
    return [
        *common,
        *([f"optimizer.lr={args.lr:g}"] if args.lr else []),
        f"compare.strategies=[{STRATEGIES}]",
        f'compare.settings={{scratch_lr10x: ["strategy=scratch", "optimizer.lr={lr * 10:g}"]}}',
        f"compare.seeds=[{args.seeds}]",
        f"compare.shots=[{shots}]",
        f"hydra.sweep.dir={out}",
    ]


def comparison_parser(
    doc: str,
    shots: list[str] | None,
    image_size: int,
    num_workers: int,
    overrides: str = "extra overrides for every run",
) -> argparse.ArgumentParser:
    """The arguments of a benchmark that runs compare.py on one data set: data, seeds, shots (unless None), the
    recipe's size and epochs, the CIFAR-10 subset, the output folder, and trailing overrides for every job."""
    parser = benchmark_parser(doc, overrides)
    parser.add_argument("--data", default="hotdog64", help="hotdog64, seefood512, cifar10 or an image folder's path")
    parser.add_argument("--seeds", default="1,2,3")
    if shots is not None:
        parser.add_argument("--shots", nargs="+", default=shots, help="images per class: e.g. 5 10 25 all")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=image_size)
    parser.add_argument("--num-workers", type=int, default=num_workers)
    parser.add_argument("--train-per-class", type=int, default=100, help="cifar10 only")
    parser.add_argument("--test-per-class", type=int, default=50, help="cifar10 only")
    parser.add_argument("--out", type=Path, help="the output folder (default: under logs/benchmarks/)")
    return parser


def run_comparison(args, command: Callable[[Any, Path, Path], list[str]], name: str) -> Path:
    """Runs compare.py with `command(args, data root, folder)` into `args.out` or logs/benchmarks/<name>."""
    root = data_root(args)
    out = (args.out or ROOT / "logs" / "benchmarks" / name.format(data=root.name)).resolve()
    line = [sys.executable, "compare.py", *command(args, root, out)]
    print("$", " ".join(line[1:]), flush=True)
    subprocess.run(line, cwd=ROOT, check=True)
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = comparison_parser(__doc__, shots=["all"], image_size=128, num_workers=2)
    parser.add_argument("--lr", type=float, help="the shared lr (default: the recipe's; scratch_lr10x gets 10x)")
    args = parser.parse_args(argv)
    return run_comparison(args, compare_command, f"strategies-{{data}}-{'-'.join(args.shots)}")


if __name__ == "__main__":
    main()

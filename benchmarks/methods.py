"""Transfer methods against the recommended recipe (issue 22): the regularisers toward the source and the
parameter-efficient methods, each added to the recipe (`strategy=freeze_unfreeze`), raced by `compare.py` (one
multirun, paired statistics, compare.md) at all the training images and at 10 per class:

    python -m benchmarks.methods                                  # hotdog64, EfficientNet-Lite0 at 64 px, 5 epochs
    python -m benchmarks.methods --data cifar10 --image-size 128   # the CIFAR-10 subset
    python -m benchmarks.methods --data seefood512 --image-size 128

The recipe is train.py's defaults with `benchmarks.strategies`' model, size and epochs, changed by trailing
overrides. WiSE-FT and soups act on finished runs (`wise_ft.py`, `soup.py`), not here. The same command again
resumes a cut run (compare.py skips the completed jobs).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from benchmarks._common import ROOT, benchmark_parser
from benchmarks.strategies import data_root, recipe

METHODS = {
    "l2sp": "regularizer=l2sp",
    "bss": "regularizer=bss",
    "co_tuning": "regularizer=co_tuning",
    "bitfit": "peft=bitfit",
    "norm_only": "peft=norm_only",
    "lora": "peft=lora",
}


def compare_command(args, root: Path, out: Path) -> list[str]:
    """compare.py's command line: the recipe, then each method on top of it, seeds, shots."""
    settings = ", ".join(f'{name}: ["{override}"]' for name, override in METHODS.items())
    return [
        *recipe(args, root),
        "compare.strategies=[freeze_unfreeze]",
        f"compare.settings={{{settings}}}",
        f"compare.seeds=[{args.seeds}]",
        f"compare.shots=[{','.join(args.shots)}]",
        f"hydra.sweep.dir={out}",
    ]


def main(argv: list[str] | None = None) -> Path:
    parser = benchmark_parser(__doc__, "extra overrides for every run")
    parser.add_argument("--data", default="hotdog64", help="hotdog64, seefood512, cifar10 or an image folder's path")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--shots", nargs="+", default=["10", "all"], help="images per class: e.g. 10 all")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--train-per-class", type=int, default=100, help="cifar10 only")
    parser.add_argument("--test-per-class", type=int, default=50, help="cifar10 only")
    parser.add_argument("--out", type=Path, help="default: logs/benchmarks/methods-<data>-<size>px")
    args = parser.parse_args(argv)
    root = data_root(args)
    out = (args.out or ROOT / "logs" / "benchmarks" / f"methods-{root.name}-{args.image_size}px").resolve()
    command = [sys.executable, "compare.py", *compare_command(args, root, out)]
    print("$", " ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)
    return out


if __name__ == "__main__":
    main()

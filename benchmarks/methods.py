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

from pathlib import Path

from benchmarks.strategies import comparison_parser, recipe, run_comparison

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
    args = comparison_parser(__doc__, shots=["10", "all"], image_size=64, num_workers=1).parse_args(argv)
    return run_comparison(args, compare_command, f"methods-{{data}}-{args.image_size}px")


if __name__ == "__main__":
    main()

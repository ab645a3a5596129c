"""Transfer methods against the recommended recipe (issue 22): the regularisers toward the source and the
parameter-efficient methods, each added to the recipe (`strategy=freeze_unfreeze`), raced by `compare.py` (one
multirun, paired statistics, compare.md) at all the training images and at 10 per class:

    python -m benchmarks.methods                                  # hotdog64, EfficientNet-Lite0 at 64 px, 5 epochs
    python -m benchmarks.methods --data cifar10 --image-size 128   # the CIFAR-10 subset
    python -m benchmarks.methods --data seefood512 --image-size 128

The recipe is train.py's defaults with `benchmarks.strategies`' model, size and epochs, changed by trailing
overrides. Beside compare.md (every setting against the best) it writes and prints `against_recipe.md`: each
method against the recipe it is added to (paired differences, Holm over the methods, fit time as a ratio). WiSE-FT
and soups act on finished runs (`python -m benchmarks.weight_space <folder>`). The same command again resumes a cut
run (compare.py skips the completed jobs), or only rewrites the tables.
"""

from __future__ import annotations

import math
from pathlib import Path
from statistics import fmean

from benchmarks.strategies import comparison_parser, recipe, run_comparison
from finetune.comparison import build_report, holm, paired_test, shots_label, trainable
from finetune.report import markdown_table

RECIPE = "freeze_unfreeze"

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


def against_recipe(folder: Path) -> str:
    """Per shots: each method's test accuracy and its paired difference to the recipe over the seeds both
    completed (95 % CI, paired t, Holm over the methods), its fit time over the recipe's, its trainable
    parameters and peak memory."""
    report = build_report(folder)
    header = ["shots", "setting", "test acc", "vs recipe (points, 95% CI)", "p (paired t)", "p (Holm)"]
    header += ["fit time (s)", "x recipe's", "trainable params", "peak memory (MB)", "seeds"]
    rows = []
    for shots in report.shots:
        recipe_runs = {r.job.seed: r for r in report.of(RECIPE, shots)}
        paired = {}  # setting -> its runs of the seeds the recipe also completed
        for setting in report.settings:
            runs = [r for r in report.of(setting, shots) if r.job.seed in recipe_runs]
            if runs:
                paired[setting] = runs
        tests = {s: paired_test([r.test_acc for r in runs], [recipe_runs[r.job.seed].test_acc for r in runs])
                 for s, runs in paired.items()}  # fmt: skip
        methods = [s for s in paired if s != RECIPE]
        adjusted = dict(zip(methods, holm([tests[s][0] for s in methods]), strict=True))
        for setting, runs in paired.items():
            p, diff, half = tests[setting]
            own = setting == RECIPE
            fit = fmean([r.fit_time_s for r in runs])
            rows.append(
                [
                    shots_label(shots),
                    f"**{setting}** (recipe)" if own else setting,
                    f"{fmean([r.test_acc for r in runs]):.3f}",
                    "" if own else f"{100 * diff:+.1f} ± {100 * half:.1f}",
                    "" if own or math.isnan(p) else f"{p:.2g}",
                    "" if own else f"{adjusted[setting]:.2g}",
                    f"{fit:.0f}",
                    f"{fit / fmean([recipe_runs[r.job.seed].fit_time_s for r in runs]):.2f}",  # over the same seeds
                    trainable(runs),
                    f"{fmean([r.peak_memory_mb for r in runs]):.0f}",
                    ",".join(str(r.job.seed) for r in runs),
                ]
            )
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> Path:
    args = comparison_parser(__doc__, shots=["10", "all"], image_size=64, num_workers=1).parse_args(argv)
    folder = run_comparison(args, compare_command, f"methods-{{data}}-{args.image_size}px")
    table = against_recipe(folder)
    (folder / "against_recipe.md").write_text(f"# Each method against the recipe ({folder.name})\n\n{table}\n")
    print(table)
    return folder


if __name__ == "__main__":
    main()

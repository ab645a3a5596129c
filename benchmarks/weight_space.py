"""WiSE-FT and greedy soups on a finished methods comparison (issue 22): for every seed and shots of a compare.py
folder made by `benchmarks.methods`, `wise_ft.py` on the recipe's run (its linear probe -> its end) and `soup.py`
over that seed's runs of the methods (LoRA's are left out by soup.py: their factors do not average), each against
the fine-tuned run on the test split; the paired differences over seeds with their 95 % CI and paired t-test.

    python -m benchmarks.methods                                         # first: the comparison
    python -m benchmarks.weight_space logs/benchmarks/methods-hotdog64-64px

Each seed's runs are hard-linked into a folder of their own (soup.py soups one folder's runs of one start), under
the output folder, which also gets `weight_space.md` (the tables) and `weight_space.json` (every figure).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from benchmarks._common import benchmark_parser, machine
from benchmarks.methods import RECIPE
from finetune.comparison import load_plan, paired_test, shots_label
from finetune.config import compose_config
from finetune.report import markdown_table
from finetune.soup import make_soup
from finetune.wise_ft import wise_ft


def link_runs(folder: Path, names: list[str], into: Path) -> Path:
    """The jobs `names` of a comparison as one sweep folder for soup.py (hard links: no copy of the checkpoints)."""
    for name in names:
        for source in (folder / "jobs" / name).rglob("*"):
            target = into / name / source.relative_to(folder / "jobs" / name)
            if source.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            elif not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(source, target)
    return into


def measure(folder: Path, out: Path) -> list[dict]:
    """One record per seed and shots: test accuracy of the recipe's probe, end and WiSE-FT, and of the soup and its
    best run, with the chosen alpha and the soup's ingredients."""
    jobs = load_plan(folder)
    records = []
    for seed, shots in sorted({(job.seed, job.shots) for job in jobs}, key=lambda k: (k[1] is None, k[1] or 0, k[0])):
        group = [job for job in jobs if (job.seed, job.shots) == (seed, shots)]
        if not all((folder / "jobs" / job.name / "checkpoints" / "last.ckpt").is_file() for job in group):
            print(f"seed {seed}, shots {shots_label(shots)}: not every run finished; left out", flush=True)
            continue
        name = f"seed{seed}-{shots_label(shots)}"
        (recipe,) = (job for job in group if job.setting == RECIPE)
        end = folder / "jobs" / recipe.name / "checkpoints" / "last.ckpt"
        wise = wise_ft(compose_config([f"ckpt_path={end}"], out / f"wise_ft-{name}", task="wise_ft"))
        points = {p.alpha: p for p in wise.points}
        sweep = link_runs(folder, [job.name for job in group], out / f"sweep-{name}")
        soup = make_soup(compose_config([f"sweep_dir={sweep}"], out / f"soup-{name}", task="soup"))
        records.append(
            {
                "seed": seed,
                "shots": shots_label(shots),
                "probe": points[0.0].test.acc,
                "end": points[1.0].test.acc,
                "wise_ft": wise.chosen.test.acc,
                "alpha": wise.chosen.alpha,
                "soup": soup.test.acc,
                "soup_best_run": soup.best_test.acc,
                "best_run": soup.ingredients[0].name,
                "ingredients": [i.name for i in soup.ingredients if i.kept],
            }
        )
        print(json.dumps(records[-1]), flush=True)
    return records


def summary(records: list[dict]) -> str:
    """Per shots: the mean of each model and the paired differences that answer the issue's question."""
    rows = []
    pairs = [("wise_ft", "end"), ("wise_ft", "probe"), ("soup", "end"), ("soup", "soup_best_run")]
    for shots in dict.fromkeys(r["shots"] for r in records):
        chosen = [r for r in records if r["shots"] == shots]
        for a, b in pairs:
            p, diff, half = paired_test([r[a] for r in chosen], [r[b] for r in chosen])
            rows.append(
                [
                    shots,
                    f"{a} - {b}",
                    f"{sum(r[a] for r in chosen) / len(chosen):.3f}",
                    f"{sum(r[b] for r in chosen) / len(chosen):.3f}",
                    f"{100 * diff:+.1f} ± {100 * half:.1f}",
                    f"{p:.2g}",
                    str(len(chosen)),
                ]
            )
    return markdown_table(
        ["shots", "comparison", "mean a", "mean b", "a - b (points, 95% CI)", "p (paired t)", "seeds"], rows
    )


def per_seed(records: list[dict]) -> str:
    keys = ["shots", "seed", "probe", "end", "wise_ft", "alpha", "soup", "soup_best_run", "best_run", "ingredients"]
    return markdown_table(
        keys,
        [[f"{r[k]:.3f}" if isinstance(r[k], float) and k != "alpha" else str(r[k]) for k in keys] for r in records],
    )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = benchmark_parser(__doc__, overrides=None)
    parser.add_argument("folder", type=Path, help="a compare.py folder made by benchmarks.methods")
    parser.add_argument("--out", type=Path, help="default: <folder>/weight_space")
    args = parser.parse_args(argv)
    folder = args.folder.resolve()
    out = (args.out or folder / "weight_space").resolve()
    records = measure(folder, out)
    text = f"{summary(records)}\n\n{per_seed(records)}\n"
    (out / "weight_space.json").write_text(json.dumps({"folder": str(folder), "machine": machine(), "runs": records}))
    (out / "weight_space.md").write_text(f"# WiSE-FT and soups of {folder}\n\n{text}")
    print(text)
    return records


if __name__ == "__main__":
    main()

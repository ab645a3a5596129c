"""A sweep's results as tables and plots: `python -m finetune.report <run or multirun folder>`.

Reads what every run under the folder wrote (any folder with `.hydra/overrides.yaml`): its
TensorBoard events (metrics per epoch; a run without them, e.g. `logger=mlflow`, from its `csv/metrics.csv`),
its overrides and config, `status.json` (completed or failed, wall time) and the figures of its test (`eval/`,
`finetune.callbacks.ErrorAnalysis`). Writes
`report.md` and PNG plots into the folder and prints the tables.
Figures are built without pyplot (Agg canvas), so this runs headless and leaves a notebook's backend alone.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from omegaconf import OmegaConf

from finetune.run_status import read_status

CURVES = ("val/acc", "val/loss", "train/acc_epoch", "train/loss_epoch")
# What runs are judged by (their task's headline metric, `finetune.models.tasks`): the tag after `val/` and `test/`,
# its short name in tables and its name in plots; multi-label runs log the mean average precision
HEADLINES = {"acc": ("acc", "accuracy"), "map": ("mAP", "mAP")}
# Runs that differ only in these are repeats of one setting (seeds, cross-validation folds), by their plural
REPEATS = {"seed": "seeds", "data.fold": "folds"}
GROUPED_OUT = tuple(REPEATS)


# The figures of a run's test error analysis shown for the best run, by caption.
ERROR_FIGURES = {
    "Confusion matrix": "confusion_matrix.png",
    "Most confidently wrong": "top_errors.png",
    "Precision-recall curves": "precision_recall.png",  # a multi-label run's
}


@dataclass
class Run:
    name: str
    folder: Path
    overrides: dict[str, str]
    strategy: str | None
    lr: float | None
    status: str
    error: str | None
    wall_time_s: float
    curves: dict[str, list[float]]  # per epoch, index = epoch
    test_acc: float
    test_macro_f1: float  # multi-label: at the tuned thresholds
    collapsed: str | None = None  # why its test predictions collapsed (`finetune.analysis.collapse`), if they did
    test_map: float = math.nan
    headline: str = "acc"  # what it is judged by, a key of HEADLINES: `map` for a multi-label run

    @property
    def best_val_acc(self) -> float:
        return max(self.curves.get("val/acc") or [math.nan])

    @property
    def best_val(self) -> float:
        """The best validation value of its headline metric (accuracy, or mAP)."""
        return max(self.curves.get(f"val/{self.headline}") or [math.nan])

    @property
    def test(self) -> float:
        """Its test value of its headline metric."""
        return self.test_map if self.headline == "map" else self.test_acc

    @property
    def epochs(self) -> int:
        return len(self.curves.get("val/loss", []))


def _scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar of the run, by step: from its TensorBoard events, or from the CSV logger's table when it has
    none (the trackers' logger configs keep one in the run folder, so the report works whatever logger is chosen)."""
    return _event_scalars(run_dir) or _csv_scalars(run_dir)


def _event_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar of the run's event files, by step; a later value at the same step wins (a resume)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, dict[int, float]] = {}
    for folder in sorted({p.parent for p in run_dir.rglob("events.out.tfevents.*")}):
        events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update((e.step, e.value) for e in events.Scalars(tag))
    return scalars


def _csv_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every metric of the run's `metrics.csv` (Lightning's CSVLogger: one row per logging step, empty cells for
    the metrics not logged at that step), by step."""
    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(run_dir.rglob("metrics.csv")):
        with path.open(newline="") as file:
            for row in csv.DictReader(file):
                step = int(row.pop("step"))
                for tag, value in row.items():
                    if value:
                        scalars.setdefault(tag, {})[step] = float(value)
    return scalars


def _per_epoch(scalars: dict[str, dict[int, float]]) -> dict[str, list[float]]:
    """Lightning logs `epoch` at every step it logs metrics, which maps each step to its epoch."""
    epoch_at = {step: int(value) for step, value in scalars.get("epoch", {}).items()}
    curves = {}
    for tag in (*CURVES, *(["val/map"] if "val/map" in scalars else [])):  # a multi-label run's headline
        by_epoch = {epoch_at[step]: value for step, value in sorted(scalars.get(tag, {}).items()) if step in epoch_at}
        curves[tag] = [by_epoch[e] for e in sorted(by_epoch)]
    return curves


def load_run(run_dir: Path, name: str) -> Run:
    overrides = {}
    for line in OmegaConf.load(run_dir / ".hydra" / "overrides.yaml"):
        key, _, value = str(line).partition("=")
        overrides[key] = value
    config_file = run_dir / ".hydra" / "config.yaml"
    config = OmegaConf.load(config_file) if config_file.is_file() else OmegaConf.create()
    status = read_status(run_dir)
    scalars = _scalars(run_dir)

    def last(tag: str) -> float:
        values = scalars.get(tag, {})
        return values[max(values)] if values else math.nan

    return Run(
        name=name,
        folder=run_dir,
        overrides=overrides,
        strategy=OmegaConf.select(config, "strategy.name", throw_on_resolution_failure=False),
        lr=OmegaConf.select(config, "optimizer.lr", throw_on_resolution_failure=False),
        status=str(status.get("status", "unfinished")),
        collapsed=status.get("collapsed"),
        error=status.get("error"),
        wall_time_s=float(status.get("wall_time_s", math.nan)),
        curves=_per_epoch(scalars),
        test_acc=last("test/acc"),
        test_macro_f1=last("test/macro_f1") if "test/macro_f1" in scalars else last("test/tuned_f1"),
        test_map=last("test/map"),
        headline="map" if "val/map" in scalars else "acc",
    )


def _natural(path: Path) -> list[tuple[int, int, str]]:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.parts]


def load_runs(folder: str | os.PathLike) -> list[Run]:
    """The run in `folder`, or every run below it (job folders of one or more multiruns), in job order."""
    folder = Path(folder)
    run_dirs = sorted((p.parent.parent for p in folder.rglob(".hydra/overrides.yaml")), key=_natural)
    if not run_dirs:
        raise FileNotFoundError(f"No runs under {folder} (a run folder holds .hydra/overrides.yaml)")
    return [load_run(d, d.relative_to(folder).as_posix() if d != folder else d.name) for d in run_dirs]


def varying_keys(runs: Sequence[Run]) -> list[str]:
    """Override keys whose value is not the same in every run (the sweep's axes), in command-line order."""
    keys = list(dict.fromkeys(k for run in runs for k in run.overrides))
    return [k for k in keys if len({run.overrides.get(k) for run in runs}) > 1]


def _value(text: str | None) -> str:
    """An override's value for a table: numbers to 3 significant digits (Optuna writes 17)."""
    if text is None:
        return "default"
    try:
        return f"{float(text):.3g}"
    except ValueError:
        return text


def setting(run: Run, keys: Sequence[str], ignore: Sequence[str] = GROUPED_OUT) -> str:
    """The run's values of `keys` but the ignored ones (seed, fold): what its repeats have in common."""
    return " ".join(f"{k}={_value(run.overrides.get(k))}" for k in keys if k not in ignore) or "all runs"


def fmt(value: float, digits: int = 3) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table (also used by `finetune.analysis`)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def headline(runs: Sequence[Run]) -> tuple[str, str]:
    """The short name and the name of what the runs are judged by (`HEADLINES`): mAP if any run is multi-label."""
    return HEADLINES["map" if any(run.headline == "map" for run in runs) else "acc"]


def runs_table(runs: Sequence[Run]) -> str:
    """One row per run: the overrides that differ, best val acc, test acc (mAP for multi-label runs) and macro-F1,
    epochs, wall time, status."""
    keys, (short, _) = varying_keys(runs), headline(runs)
    header = ["run", *keys, f"best val {short}", f"test {short}", "test macro-F1", "epochs", "wall time (s)", "status"]
    rows = [
        [
            run.name,
            *(_value(run.overrides.get(k)) for k in keys),
            fmt(run.best_val),
            fmt(run.test),
            fmt(run.test_macro_f1),
            str(run.epochs),
            fmt(run.wall_time_s, 0),
            f"{run.status}, collapsed" if run.collapsed else run.status,
        ]
        for run in runs
    ]
    return markdown_table(header, rows)


def mean_and_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample std (0 for one value) and count of the values that are not NaN."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan, 0
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def mean_std(values: Sequence[float]) -> str:
    mean, std, count = mean_and_std(values)
    return fmt(mean) if count < 2 else f"{mean:.3f} ± {std:.3f}"


def groups(runs: Sequence[Run], ignore: Sequence[str] = GROUPED_OUT) -> dict[str, list[Run]]:
    """Runs by setting (every varying override but the ignored ones), in order of first appearance."""
    keys = varying_keys(runs)
    grouped: dict[str, list[Run]] = {}
    for run in runs:
        grouped.setdefault(setting(run, keys, ignore), []).append(run)
    return grouped


def repeated_over(runs: Sequence[Run]) -> str:
    """What the summary averages over: the repeat keys that vary (`seeds`, `folds`, `seeds and folds`)."""
    varying = varying_keys(runs)
    return " and ".join(name for key, name in REPEATS.items() if key in varying) or "repeats"


def summary_table(runs: Sequence[Run]) -> str:
    """Repeats of one setting (seeds, folds) as mean ± sample std over its completed runs."""
    short, _ = headline(runs)
    header = ["setting", "completed", f"best val {short}", f"test {short}", "test macro-F1", "wall time (s)"]
    rows = []
    for label, members in groups(runs).items():
        done = [r for r in members if r.status == "completed"]
        rows.append(
            [
                label,
                f"{len(done)}/{len(members)}",
                mean_std([r.best_val for r in done]),
                mean_std([r.test for r in done]),
                mean_std([r.test_macro_f1 for r in done]),
                fmt(statistics.mean(r.wall_time_s for r in done), 0) if done else "-",
            ]
        )
    return markdown_table(header, rows)


def best_run(runs: Sequence[Run]) -> Run | None:
    """The completed run with the best validation accuracy (mAP for multi-label runs; the test split does not
    choose; a collapsed run is no candidate), None if none."""
    done = [r for r in runs if r.status == "completed" and not r.collapsed and not math.isnan(r.best_val)]
    return max(done, key=lambda r: r.best_val, default=None)


def error_figures(run: Run) -> dict[str, Path]:
    """The error-analysis figures the run's test wrote into `<run>/eval/`, by caption (no grid of wrong images
    when no test image was wrong)."""
    found = {caption: run.folder / "eval" / name for caption, name in ERROR_FIGURES.items()}
    return {caption: path for caption, path in found.items() if path.is_file()}


def plot_curves(runs: Sequence[Run]) -> Figure:
    """Validation accuracy and loss per epoch, one line per run, one colour per setting."""
    fig = Figure(figsize=(11, 5), layout="constrained")
    axes = fig.subplots(1, 2)
    for index, (label, members) in enumerate(groups(runs).items()):
        for n, run in enumerate(members):
            for ax, tag in zip(axes, (f"val/{run.headline}", "val/loss"), strict=True):
                values = run.curves.get(tag, [])
                first = n == 0 and ax is axes[0]  # one legend entry per setting
                ax.plot(range(len(values)), values, marker="o", color=f"C{index % 10}", label=label if first else None)
    for ax, title in zip(axes, (f"validation {headline(runs)[1]}", "validation loss"), strict=True):
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")  # a diverging run would flatten every other curve
    fig.legend(loc="outside lower center", ncols=min(3, len(groups(runs))), fontsize="small")
    return fig


def plot_lr(runs: Sequence[Run]) -> Figure | None:
    """Accuracy against lr (log x) per setting, a line through its repeats' mean; failed runs as red crosses at 0.

    None if the lr did not vary.
    """
    if len({r.lr for r in runs if r.lr is not None}) < 2:
        return None
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    series = groups(runs, ignore=(*GROUPED_OUT, "optimizer.lr"))
    for index, (label, members) in enumerate(series.items()):
        done = [r for r in members if r.status == "completed"]
        lrs = sorted({r.lr for r in done})
        for metric, style, name in (("best_val", "o-", "best val"), ("test", "s--", "test")):
            values = [getattr(r, metric) for r in done]
            means = [statistics.mean(v for r, v in zip(done, values, strict=True) if r.lr == lr) for lr in lrs]
            ax.scatter([r.lr for r in done], values, marker=style[0], color=f"C{index}", alpha=0.4)
            text = (name if len(series) == 1 else f"{name} ({label})") + (" (mean)" if len(done) > len(lrs) else "")
            ax.plot(lrs, means, style, color=f"C{index}", label=text)
    failed = [r.lr for r in runs if r.status == "failed" and r.lr is not None]
    if failed:
        ax.plot(failed, [0.0] * len(failed), "x", color="red", markersize=10, label="failed")
    name = headline(runs)[1]
    ax.set(xscale="log", xlabel="optimizer.lr", ylabel=name, title=f"{name} against lr")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    return fig


def plot_strategies(runs: Sequence[Run]) -> Figure | None:
    """Mean best val and test accuracy per setting (error bar: std over seeds and folds). None if one strategy only."""
    if len({r.strategy for r in runs}) < 2:
        return None
    labels, stats = [], []
    for label, members in groups(runs).items():
        done = [r for r in members if r.status == "completed"]
        labels.append(label.replace(" ", "\n"))
        stats.append([mean_and_std([getattr(r, key) for r in done])[:2] for key in ("best_val", "test")])
    fig = Figure(figsize=(max(6.0, 1.3 * len(labels)), 4.5), layout="constrained")
    ax = fig.subplots()
    width = 0.4
    short, name = headline(runs)
    for offset, (bar, column) in enumerate(((f"best val {short}", 0), (f"test {short}", 1))):
        xs = [i + (offset - 0.5) * width for i in range(len(labels))]
        means, stds = zip(*(s[column] for s in stats), strict=True)
        bars = ax.bar(xs, means, width, yerr=stds, capsize=3, label=bar)
        ax.bar_label(bars, fmt="%.3f", fontsize="x-small", padding=2)
    ax.set_xticks(range(len(labels)), labels, fontsize="small", rotation=20, ha="right")
    ax.set(ylabel=name, ylim=(0, 1.05), title=f"strategies (mean ± std over {repeated_over(runs)})")
    ax.legend(fontsize="small", loc="lower right")
    return fig


def write_report(folder: str | os.PathLike) -> str:
    """Writes report.md and the plots into `folder`; returns the report's text."""
    folder = Path(folder)
    runs = load_runs(folder)
    parts = [f"# Report: {folder}", "", "## Runs", "", runs_table(runs)]
    failed = [f"- {r.name}: {r.error}" for r in runs if r.status == "failed"]
    if failed:
        parts += ["", "Failed runs:", "", *failed]
    collapsed = [f"- {r.name}: {r.collapsed}" for r in runs if r.collapsed]
    if collapsed:  # completed, but no classifier: not a candidate for the best run
        parts += ["", "Collapsed runs (completed, but one class for nearly every test image, or chance accuracy):", ""]
        parts += collapsed
    if any(len(members) > 1 for members in groups(runs).values()):
        parts += ["", f"## Summary (mean ± std over {repeated_over(runs)})", "", summary_table(runs)]
    best = best_run(runs)
    if best is not None:
        short = headline(runs)[0]
        parts += ["", f"## Best run: {best.name} (best val {short} {best.best_val:.3f}, test {short} {fmt(best.test)})"]
        figures = error_figures(best)
        for caption, path in figures.items():
            parts += ["", f"{caption}:", "", f"![{caption}]({path.relative_to(folder).as_posix()})"]
        if "Confusion matrix" in figures and "Most confidently wrong" not in figures:
            parts += ["", "No test image was wrong."]
    plots = {"curves.png": plot_curves(runs), "acc_vs_lr.png": plot_lr(runs), "strategies.png": plot_strategies(runs)}
    parts += ["", "## Plots", ""]
    for filename, figure in plots.items():
        if figure is not None:
            figure.savefig(folder / filename, dpi=120)
            parts.append(f"![{filename}]({filename})")
    text = "\n".join(parts) + "\n"
    (folder / "report.md").write_text(text)
    return text


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Tables and plots of a run or a multirun folder.")
    parser.add_argument("folder", type=Path, help="a run folder, or a multirun folder holding job folders")
    args = parser.parse_args(argv)
    text = write_report(args.folder)
    print(text.split("\n## Plots")[0])
    print(f"Wrote {args.folder / 'report.md'} and its plots.")


if __name__ == "__main__":
    main()

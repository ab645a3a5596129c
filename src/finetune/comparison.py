"""The answer of `python compare.py`: which setting transfers best, by how much, and whether the lead is real.

`python -m finetune.comparison <comparison folder>` rewrites it from the runs (compare.py does so after its jobs).

For one seed, every setting trains on the same split, the same few-shot subset, the same batches in the same order
with the same augmentation draws (`finetune.data.sampling`): what differs between two settings' runs of a seed is
the setting (and its own random draws: the new head's init, dropout). So the differences are paired by seed, and
the test is the paired t-test on the per-seed differences (`scipy.stats.ttest_rel`), with its 95 % confidence
interval. Not Wilcoxon's signed-rank test: with 3 seeds its smallest two-sided p is 0.25, so it can never find a
difference; the t-test assumes the differences are roughly normal, which a handful of seeds cannot check.
Each setting is compared with the best one (the highest mean test accuracy over the seeds every setting
completed), and the p values are corrected for the number of comparisons by Holm's step-down method.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from scipy import stats

from finetune.report import fmt, load_run, markdown_table, mean_and_std
from finetune.run_status import read_status

PLAN_FILE = "jobs.json"  # what compare.py planned: every job's name, setting, seed, shots and overrides
JOBS_DIR = "jobs"
REPORT_FILE = "compare.md"
ALPHA = 0.05
LEVEL = 0.95


@dataclass
class Job:
    """One run of a comparison: `setting` (a name) at `seed` on `shots` images per class (None: all)."""

    name: str
    setting: str
    seed: int
    shots: int | None
    overrides: list[str]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class Result:
    """What a job's run left: its status (from status.json), its test metrics (from its event files) and cost."""

    job: Job
    status: str
    error: str | None = None
    test_acc: float = math.nan
    test_macro_f1: float = math.nan
    fit_time_s: float = math.nan
    peak_memory_mb: float = math.nan
    peak_gpu_memory_mb: float = math.nan
    steps: float = math.nan
    epochs: float = math.nan
    train_images: float = math.nan
    trainable_params: float = math.nan
    trainable_share: float = math.nan


@dataclass
class Row:
    """One setting of a comparison (one value of shots) against the best setting, over `seeds`."""

    setting: str
    seeds: list[int]
    mean: float
    half: float  # the 95 % CI's half-width of the mean
    f1_mean: float = math.nan
    f1_half: float = math.nan
    diff: float = math.nan  # mean paired difference to the best (this - best), accuracy units
    diff_half: float = math.nan
    diff_std: float = math.nan
    p: float = math.nan
    p_holm: float = math.nan
    rank: float = math.nan
    best: bool = False

    @property
    def significant(self) -> bool:
        return not self.best and not math.isnan(self.p_holm) and self.p_holm < ALPHA

    @property
    def lower_alone(self) -> bool:
        """Worse by its own test (its CI excludes 0) but not beyond Holm's correction for the comparisons made."""
        return not self.best and not self.significant and self.p < ALPHA


@dataclass
class Comparison:
    """Every setting of one value of shots, best first."""

    rows: list[Row]
    seeds: list[int]  # the seeds every setting completed (the statistics use only these)
    dropped: dict[str, list[int]] = field(default_factory=dict)  # completed seeds left out, by setting

    @property
    def best(self) -> Row:
        return self.rows[0]


def mean_ci(values: Sequence[float], level: float = LEVEL) -> tuple[float, float]:
    """The mean and the half-width of its t confidence interval (NaN for fewer than 2 values; 0 without spread)."""
    values = [float(v) for v in values]
    if not values:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    sem = statistics.stdev(values) / math.sqrt(len(values))
    return mean, float(stats.t.ppf((1 + level) / 2, len(values) - 1) * sem)


def paired_test(values: Sequence[float], best: Sequence[float]) -> tuple[float, float, float]:
    """(p of the two-sided paired t-test, mean difference values - best, CI half-width of that difference).

    Differences that are all equal (no spread) give p = 0 when they are not 0, and p = 1 when they are."""
    diffs = [a - b for a, b in zip(values, best, strict=True)]
    mean, half = mean_ci(diffs)
    if len(diffs) < 2:
        return math.nan, mean, half
    if statistics.stdev(diffs) == 0:
        return (1.0 if mean == 0 else 0.0), mean, 0.0
    return float(stats.ttest_rel(values, best).pvalue), mean, half


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment (1979): the i-th smallest of m p values times (m - i), at most 1, and never
    below the adjusted p before it. NaN stays NaN and does not count."""
    indexed = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for step, (p, i) in enumerate(indexed):
        running = max(running, min(1.0, p * (len(indexed) - step)))
        adjusted[i] = running
    return adjusted


def mean_ranks(table: Mapping[str, Mapping[int, float]], seeds: Sequence[int]) -> dict[str, float]:
    """Each setting's rank (1 = the highest accuracy; ties share the mean rank) averaged over the seeds."""
    names = [name for name in table if table[name]]
    ranks = {name: [] for name in table}
    for seed in seeds:
        for name, rank in zip(names, stats.rankdata([-table[n][seed] for n in names]), strict=True):
            ranks[name].append(float(rank))
    return {name: statistics.fmean(r) if r else math.nan for name, r in ranks.items()}


def compare(acc: Mapping[str, Mapping[int, float]], f1: Mapping[str, Mapping[int, float]] | None = None) -> Comparison:
    """The statistics of a table of test accuracies, setting -> seed -> accuracy, over the seeds every setting has.

    The best setting has the highest mean; every other one gets its paired difference to it (CI, paired t p,
    Holm-adjusted p). Rows are in order of mean accuracy, best first."""
    present = [set(by_seed) for by_seed in acc.values() if by_seed]  # a setting with no run at all is listed apart
    seeds = sorted(set.intersection(*present)) if present else []
    dropped = {name: sorted(set(by_seed) - set(seeds)) for name, by_seed in acc.items() if set(by_seed) - set(seeds)}
    ranks = mean_ranks(acc, seeds)
    rows = []
    for name, by_seed in acc.items():
        mean, half = mean_ci([by_seed[s] for s in seeds]) if by_seed else (math.nan, math.nan)
        scored = by_seed and f1 and f1.get(name)
        f1_mean, f1_half = mean_ci([f1[name][s] for s in seeds]) if scored else (math.nan, math.nan)
        rows.append(Row(name, seeds, mean, half, f1_mean, f1_half, rank=ranks[name]))
    rows.sort(key=lambda row: -row.mean if not math.isnan(row.mean) else math.inf)
    if not rows or not seeds:
        return Comparison(rows, seeds, dropped)
    rows = [row for row in rows if not math.isnan(row.mean)] + [row for row in rows if math.isnan(row.mean)]
    best = rows[0]
    best.best, best.diff, best.diff_half = True, 0.0, 0.0
    best_values = [acc[best.setting][s] for s in seeds]
    for row in rows[1:]:
        if not acc[row.setting]:
            continue
        values = [acc[row.setting][s] for s in seeds]
        row.p, row.diff, row.diff_half = paired_test(values, best_values)
        diffs = [a - b for a, b in zip(values, best_values, strict=True)]
        row.diff_std = statistics.stdev(diffs) if len(diffs) > 1 else math.nan
    for row, adjusted in zip(rows[1:], holm([row.p for row in rows[1:]]), strict=True):
        row.p_holm = adjusted
    return Comparison(rows, seeds, dropped)


def seeds_needed(diff: float, std: float, level: float = LEVEL, most: int = 1000) -> int | None:
    """About how many seeds a paired t interval needs to exclude 0 for a true difference `diff` whose per-seed
    differences spread by `std`; None above `most` (or for no difference at all)."""
    if diff == 0 or math.isnan(std) or math.isnan(diff):
        return None
    for n in range(2, most + 1):
        if stats.t.ppf((1 + level) / 2, n - 1) * std / math.sqrt(n) < abs(diff):
            return n
    return None


def _points(value: float) -> str:
    return f"{100 * value:+.1f}"


def _p(value: float) -> str:
    if math.isnan(value):
        return "-"
    return "< 0.001" if value < 0.001 else f"{value:.2g}"


def _p_is(value: float) -> str:
    """`= 0.01`, or `< 0.001`."""
    text = _p(value)
    return text if text.startswith("<") else f"= {text}"


def _against_best(row: Row, comparisons: int) -> str:
    """A setting's clause of the recommendation: worse beyond noise, lower only before the correction for the
    number of comparisons, or within noise."""
    diff, half = f"{100 * -row.diff:.1f} ± {100 * row.diff_half:.1f} points", f"Holm p {_p_is(row.p_holm)}"
    if row.significant:
        return f"`{row.setting}` is {diff} worse ({half})"
    if row.lower_alone:
        return (
            f"`{row.setting}` is {diff} lower alone (p {_p_is(row.p)}), but not beyond the correction for "
            f"{comparisons} comparisons ({half})"
        )
    return f"`{row.setting}` is within noise of it ({_points(row.diff)} ± {100 * row.diff_half:.1f} points, {half})"


def recommendation(comparison: Comparison, cost: Mapping[str, float] | None = None) -> str:
    """One paragraph that says what the numbers support: the best setting, which ones are worse beyond noise,
    which are lower only before the correction for the number of comparisons, which are within noise, and when
    more seeds would be needed to decide. `cost`: fit time per setting (s); the cheaper choice is offered only
    among the settings within noise."""
    rows, n = comparison.rows, len(comparison.seeds)
    if not rows or n == 0:
        return "No seed has a completed run of every setting yet: nothing to compare (see the jobs below)."
    best = comparison.best
    if len(rows) == 1:
        return f"Only `{best.setting}` completed: there is nothing to compare it with."
    if n == 1:
        return (
            f"`{best.setting}` has the highest test accuracy ({best.mean:.3f}) on the one seed every setting "
            "completed: one seed gives no confidence interval, run compare.seeds=3 or more to know whether the lead "
            "is real."
        )
    head = f"`{best.setting}` is best (test accuracy {best.mean:.3f} ± {best.half:.3f} over {n} seeds)"
    compared = [r for r in rows[1:] if not math.isnan(r.diff)]  # not the settings without a completed run
    text = head + "; " + "; ".join(_against_best(r, len(compared)) for r in compared) + "."
    undecided = [r for r in compared if not r.significant]
    if not undecided:
        return text + f" Every other setting is worse beyond the seed-to-seed noise: use `{best.setting}`."
    names = ", ".join(f"`{r.setting}`" for r in undecided)
    needed = [seeds_needed(r.diff, r.diff_std) for r in undecided]
    known = [k for k in needed if k is not None]
    more = f" (the differences seen would need up to about {max(known)} seeds)" if known and max(known) > n else ""
    text += f" With {n} seeds, {names} cannot be told apart from `{best.setting}`: more seeds would be needed to decide{more}."
    if cost and not math.isnan(cost.get(best.setting, math.nan)):
        close = [r for r in undecided if not r.lower_alone]
        cheap = [r for r in close if cost.get(r.setting, math.inf) < 0.8 * cost[best.setting]]
        if cheap:
            fastest = min(cheap, key=lambda r: cost[r.setting])
            share = cost[fastest.setting] / cost[best.setting]
            text += f" Of those, `{fastest.setting}` fits in {share:.0%} of the time: the cheaper choice within noise."
    return text


def load_plan(folder: str | os.PathLike) -> list[Job]:
    plan = json.loads((Path(folder) / PLAN_FILE).read_text())
    return [Job(**job) for job in plan["jobs"]]


def load_result(folder: Path, job: Job) -> Result:
    """A job's outcome: `unfinished` without a status.json (running, or killed), its metrics from its event files."""
    run_dir = folder / JOBS_DIR / job.name
    if not (run_dir / ".hydra" / "overrides.yaml").is_file():
        return Result(job, "not started")
    record = read_status(run_dir)
    run = load_run(run_dir, job.name)
    number = lambda key: float(record[key]) if record.get(key) is not None else math.nan  # noqa: E731
    return Result(
        job,
        status="collapsed" if run.status == "completed" and run.collapsed else run.status,
        error=run.error,
        test_acc=run.test_acc,
        test_macro_f1=run.test_macro_f1,
        fit_time_s=number("fit_time_s"),
        peak_memory_mb=number("peak_memory_mb"),
        peak_gpu_memory_mb=number("peak_gpu_memory_mb"),
        steps=number("steps"),
        epochs=number("epochs"),
        train_images=number("train_images"),
        trainable_params=number("trainable_params"),
        trainable_share=number("trainable_share"),
    )


def usable(result: Result) -> bool:
    """A run that counts: completed (a collapsed run is a real, bad result) with a test accuracy."""
    return result.status in ("completed", "collapsed") and not math.isnan(result.test_acc)


def shots_label(shots: int | None) -> str:
    return "all" if shots is None else str(shots)


def _ci(mean: float, half: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def _mean(values: Sequence[float]) -> float:
    return mean_and_std(values)[0]


def _median(values: Sequence[float]) -> float:
    """The median of the known values: a cost that one job slowed by other work on the machine does not move."""
    known = [v for v in values if not math.isnan(v)]
    return statistics.median(known) if known else math.nan


@dataclass
class Report:
    """Everything compare.md says, by shots value (None: all images)."""

    results: list[Result]
    settings: list[str]
    shots: list[int | None]
    comparisons: dict[int | None, Comparison]

    def of(self, setting: str, shots: int | None) -> list[Result]:
        return [r for r in self.results if r.job.setting == setting and r.job.shots == shots and usable(r)]

    def cost(self, shots: int | None) -> dict[str, float]:
        return {s: _median([r.fit_time_s for r in self.of(s, shots)]) for s in self.settings}

    @property
    def main_shots(self) -> int | None:
        """The comparison the headline is about: all images if compared, else the largest K (the largest with
        runs every setting completed, while a comparison is under way)."""
        order = sorted(self.shots, key=lambda k: math.inf if k is None else k, reverse=True)
        return next((k for k in order if self.comparisons[k].seeds), order[0])


def build_report(folder: str | os.PathLike) -> Report:
    folder = Path(folder)
    jobs = load_plan(folder)
    results = [load_result(folder, job) for job in jobs]
    settings = list(dict.fromkeys(job.setting for job in jobs))
    shots = list(dict.fromkeys(job.shots for job in jobs))
    comparisons = {}
    for k in shots:
        acc, f1 = {}, {}
        for setting in settings:
            done = [r for r in results if r.job.setting == setting and r.job.shots == k and usable(r)]
            acc[setting] = {r.job.seed: r.test_acc for r in done}
            f1[setting] = {r.job.seed: r.test_macro_f1 for r in done}
        comparisons[k] = compare(acc, f1)
    return Report(results, settings, shots, comparisons)


def comparison_table(report: Report, shots: int | None) -> str:
    comparison = report.comparisons[shots]
    header = [
        "setting",
        "test acc (95% CI)",
        "test macro-F1 (95% CI)",
        "vs best (points, 95% CI)",
        "p (paired t)",
        "p (Holm)",
        "mean rank",
        "fit time (s)",
        "peak memory (MB)",
        "trainable params",
        "budget",
    ]
    rows = []
    for row in comparison.rows:
        done = report.of(row.setting, shots)
        memory = _mean([r.peak_gpu_memory_mb for r in done])
        memory_text = f"{memory:.0f} GPU" if not math.isnan(memory) else fmt(_mean([r.peak_memory_mb for r in done]), 0)
        rows.append(
            [
                f"**{row.setting}**" if row.best else row.setting,
                _ci(row.mean, row.half),
                _ci(row.f1_mean, row.f1_half),
                "best"
                if row.best
                else "-"
                if math.isnan(row.diff)
                else f"{_points(row.diff)} ± {100 * row.diff_half:.1f}",
                "" if row.best else _p(row.p),
                "" if row.best else _p(row.p_holm),
                fmt(row.rank, 1),
                fmt(_median([r.fit_time_s for r in done]), 0),
                memory_text,
                trainable(done),
                budget(done),
            ]
        )
    return markdown_table(header, rows)


def trainable(done: Sequence[Result]) -> str:
    """The parameters the runs of one point train at some epoch, and their share of the model's (means)."""
    count, share = (_mean([getattr(r, key) for r in done]) for key in ("trainable_params", "trainable_share"))
    return "-" if math.isnan(count) else f"{count:,.0f} ({100 * share:.2f} %)"


def budget(done: Sequence[Result]) -> str:
    """What the runs of one point trained on: images, epochs, optimizer steps (means over the seeds)."""
    images, epochs, steps = (_mean([getattr(r, key) for r in done]) for key in ("train_images", "epochs", "steps"))
    if math.isnan(steps):
        return "-"
    return ", ".join(_count(value, noun) for value, noun in ((images, "image"), (epochs, "epoch"), (steps, "step")))


def _count(value: float, noun: str) -> str:
    """'1 epoch', '5 epochs': the value rounded as it is printed."""
    shown = f"{value:.0f}"
    return f"{shown} {noun}" if shown == "1" else f"{shown} {noun}s"


def jobs_table(report: Report) -> str:
    header = ["job", "setting", "seed", "shots", "status", "test acc", "test macro-F1", "fit time (s)", "steps"]
    rows = [
        [
            r.job.name,
            r.job.setting,
            str(r.job.seed),
            shots_label(r.job.shots),
            r.status,
            fmt(r.test_acc),
            fmt(r.test_macro_f1),
            fmt(r.fit_time_s, 0),
            fmt(r.steps, 0),
        ]
        for r in report.results
    ]
    return markdown_table(header, rows)


def plot_differences(report: Report) -> Figure:
    """Each setting's paired difference to the best, with its 95 % CI, one panel per shots value."""
    panels = report.shots
    fig = Figure(figsize=(4.5 * len(panels) + 1.5, 0.5 * len(report.settings) + 2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, k in zip(axes, panels, strict=True):
        comparison = report.comparisons[k]
        rows = comparison.rows[::-1]
        ys = range(len(rows))
        diffs = [100 * r.diff for r in rows]
        halves = [0 if math.isnan(r.diff_half) else 100 * r.diff_half for r in rows]
        colours = ["C3" if r.significant else "C0" for r in rows]
        for y, d, h, c in zip(ys, diffs, halves, colours, strict=True):
            ax.errorbar(d, y, xerr=h, fmt="o", color=c, capsize=4)
        ax.axvline(0, color="grey", lw=1)
        ax.set_yticks(list(ys), [r.setting for r in rows])
        ax.set(
            xlabel="test accuracy - best's (points)",
            title=f"shots={shots_label(k)} ({_count(len(comparison.seeds), 'paired seed')})",
        )
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle("paired difference to the best setting, 95% CI (red: worse after Holm)", fontsize="medium")
    return fig


def plot_learning_curve(report: Report, classes: int | None) -> Figure | None:
    """Test accuracy against training images per class, per setting, with 95 % CI bands (several shots only)."""
    if len(report.shots) < 2:
        return None
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    ticks: set[float] = set()
    for index, setting in enumerate(report.settings):
        points = []
        for k in report.shots:
            done = report.of(setting, k)
            if not done:
                continue
            per_class = k if k is not None else _mean([r.train_images for r in done]) / (classes or 1)
            mean, half = mean_ci([r.test_acc for r in done])
            points.append((per_class, mean, 0 if math.isnan(half) else half))
        points.sort()
        if not points:
            continue
        xs, means, halves = zip(*points, strict=True)
        ticks.update(xs)
        ax.plot(xs, means, "o-", color=f"C{index % 10}", label=setting)
        ax.fill_between(
            xs,
            [m - h for m, h in zip(means, halves, strict=True)],
            [m + h for m, h in zip(means, halves, strict=True)],
            color=f"C{index % 10}",
            alpha=0.15,
        )
    ax.set(xscale="log", xlabel="training images per class", ylabel="test accuracy", title="accuracy against data")
    ax.set_xticks(sorted(ticks), [f"{x:.0f}" for x in sorted(ticks)])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    return fig


def write_comparison(folder: str | os.PathLike, command: str | None = None) -> str:
    """Writes compare.md and its plots into the comparison folder; returns the summary that is printed."""
    folder = Path(folder)
    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # its event reader logs every file it moves on to
    report = build_report(folder)
    plan = json.loads((folder / PLAN_FILE).read_text())
    command = command or plan.get("command")
    main = report.main_shots
    comparison = report.comparisons[main]
    summary = [
        f"# Comparison: {len(report.settings)} settings x {_count(len(set(r.job.seed for r in report.results)), 'seed')}"
        + (f" x {len(report.shots)} shots" if len(report.shots) > 1 else ""),
        "",
    ]
    if command:
        summary += ["```bash", command, "```", ""]
    summary += [recommendation(comparison, report.cost(main)), ""]
    label = "all training images" if main is None else f"{main} training images per class"
    summary += [f"## Test accuracy, {label} ({_count(len(comparison.seeds), 'seed')}: {comparison.seeds})", ""]
    summary += [comparison_table(report, main), ""]
    for k in report.shots:
        if k == main:
            continue
        other = report.comparisons[k]
        summary += [
            f"## shots={shots_label(k)} ({_count(len(other.seeds), 'seed')})",
            "",
            recommendation(other, report.cost(k)),
        ]
        summary += ["", comparison_table(report, k), ""]
    failed = [r for r in report.results if not usable(r)]
    if failed:
        summary += ["## Jobs without a result (listed, not used)", ""]
        summary += [f"- {r.job.name}: {r.status}" + (f": {r.error}" if r.error else "") for r in failed]
        summary += [""]
    for k, other in report.comparisons.items():
        for setting, seeds in other.dropped.items():
            summary.append(
                f"- shots={shots_label(k)}: `{setting}`'s seeds {seeds} are left out: not every setting completed them"
            )
    text = "\n".join(summary).rstrip() + "\n"
    plots = {
        "differences.png": plot_differences(report),
        "learning_curve.png": plot_learning_curve(report, plan.get("classes")),
    }
    method = [
        "## How to read this",
        "",
        "- test acc: the mean over the seeds every setting completed, with the 95 % t confidence interval of the mean.",
        "- vs best: the mean of the per-seed differences to the best setting (in accuracy points), with its 95 % CI. "
        "For one seed every setting saw the same split, few-shot subset, batch order and augmentation, so the "
        "differences are paired; p is the paired t-test's (scipy.stats.ttest_rel, two-sided), p (Holm) corrected for "
        f"the number of comparisons with the best ({max(0, len(report.settings) - 1)}). Worse beyond noise: "
        f"p (Holm) < {ALPHA}. "
        "The intervals are each comparison's own (not adjusted): one that excludes 0 with p (Holm) >= 0.05 is a "
        "lead that the number of comparisons does not let us call real.",
        "- mean rank: 1 = the best setting of a seed, averaged over the seeds.",
        "- fit time: the median over the seeds of the training's wall time (validation included, test excluded), "
        "which a job slowed by other work on the machine does not move; peak memory: the training "
        "process's peak resident memory (the GPU's peak allocation on a GPU).",
        "- trainable params: the parameters that train at some epoch of the run (a linear probe: the head's; "
        "peft: the method's and the head's), with their share of all the model's.",
        "- budget: training images, epochs and optimizer steps of each run (means over seeds); an epoch has at "
        "least data.min_steps_per_epoch steps, so few-shot points are not starved of steps.",
        "",
        "## Plots",
        "",
    ]
    for name, figure in plots.items():
        if figure is not None:
            figure.savefig(folder / name, dpi=110)
            method.append(f"![{name}]({name})")
    body = text + "\n" + "\n".join(method) + "\n\n## Jobs\n\n" + jobs_table(report) + "\n"
    (folder / REPORT_FILE).write_text(body)
    return text


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Rewrites compare.md and its plots from a comparison's runs.")
    parser.add_argument("folder", type=Path, help="the comparison folder (it holds jobs.json)")
    args = parser.parse_args(argv)
    print(write_comparison(args.folder))
    print(f"Wrote {args.folder / REPORT_FILE} and its plots.")


if __name__ == "__main__":
    main()

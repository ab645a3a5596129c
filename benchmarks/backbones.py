"""Which backbone? EfficientNet-Lite0/1/2 (ImageNet weights shipped by their packages, offline) as a linear
probe and with the recommended recipe, on real photos: test accuracy against parameters and training speed.

    python -m benchmarks.backbones                     # hotdog64 at 128 px, seefood512 at 224 px; seed 1
    python -m benchmarks.backbones --seeds 1,2,3 --recipe "strategy=llrd scheduler=warmup_cosine" trainer.max_epochs=10
    python -m benchmarks.backbones --tiny              # generated images (data=synthetic), 2 steps per run

Every run is train.py's fit and test in this process (`benchmarks._common.fit`, then the test of the final
weights, as train.py reports them), with train.py's defaults (batch 32, 10% of train validates), on each image
folder at the size given. Two rows per backbone and data set: the linear probe (`strategy=freeze`) and the
recipe (`--recipe`, Hydra overrides; default: none, i.e. train.py's recommended recipe). Trailing overrides
apply to every run. Each run's figures are printed as a JSON line (`grep '^{'` keeps them). Training images/s:
the images of every training step over its time, leaving out each epoch's first step (it waits for the loader
and follows validation). The table is printed and the plot (test accuracy against parameters and against
training images/s) written after each seed, so a run cut short still compares every backbone. The runs stay
under `--out` (TensorBoard events, test analysis; no checkpoints).
"""

from __future__ import annotations

import json
import statistics
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
from matplotlib.figure import Figure

from benchmarks._common import DATASETS, QUIET, ROOT, StepClock, benchmark_parser, fit, machine, table
from finetune.config import compose_config
from finetune.report import mean_and_std, mean_std

BACKBONES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
SIZES = {"hotdog64": 128, "seefood512": 224}  # image size per data set (hotdog64's photos are 64 px)
PROBE = ["strategy=freeze"]
# the runs keep their TensorBoard events and test analysis, not 20-40 MB of checkpoints each
NO_CHECKPOINTS = [
    "~callbacks.model_checkpoint",
    "~callbacks.last_checkpoint",
    "~callbacks.mid_epoch_checkpoint",
    "++trainer.enable_checkpointing=false",
]
PLOT = ROOT / "benchmarks" / "results" / "backbones.png"
# --tiny: 2 classes of 4 generated training images, batches of 4 at 32 px, one epoch of 2 steps
TINY_DATA = [
    "data=synthetic",
    "data.num_classes=2",
    "data.train_per_class=4",
    "data.test_per_class=2",
    "data.image_size=32",
]
TINY = ["data.batch_size=4", "data.num_workers=0", "trainer.max_epochs=1", "++trainer.limit_train_batches=2"]


class TrainingClock(StepClock):
    """StepClock's time after every training step, with the step's images and where each epoch starts."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[int] = []
        self.epoch_starts: set[int] = set()

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.epoch_starts.add(len(self.times))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, *args: Any
    ) -> None:
        super().on_train_batch_end(trainer)
        self.images.append(len(batch[1]))

    def images_per_s(self) -> float:
        """Over every step but the first of each epoch."""
        steps = [i for i in range(len(self.times)) if i not in self.epoch_starts]
        if not steps:
            raise ValueError("one step per epoch: no step to time (the first of each epoch is left out)")
        return sum(self.images[i] for i in steps) / sum(self.times[i] - self.times[i - 1] for i in steps)


def run(overrides: list[str], root: Path) -> dict[str, float]:
    """One run: params (M), training images/s, test accuracy of the final weights, wall time of the fit."""
    cfg = compose_config(overrides, root)
    clock = TrainingClock()
    start = time.perf_counter()
    trainer, datamodule, model = fit(cfg, clock)
    fit_s = time.perf_counter() - start
    (metrics,) = trainer.test(model, datamodule=datamodule, verbose=False)
    return {
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "images_per_s": clock.images_per_s(),
        "test_acc": metrics["test/acc"],
        "fit_s": fit_s,
    }


def summary(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (data, backbone, strategy): params, mean images/s, and the test accuracy of every seed."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for result in results:
        groups.setdefault((result["data"], result["backbone"], result["strategy"]), []).append(result)
    return [
        {
            "data": data,
            "backbone": backbone,
            "strategy": strategy,
            "params_m": members[0]["params_m"],
            "images_per_s": statistics.mean(r["images_per_s"] for r in members),
            "test_accs": [r["test_acc"] for r in members],
        }
        for (data, backbone, strategy), members in groups.items()
    ]


def plot(rows: list[dict[str, Any]]) -> Figure:
    """Test accuracy against parameters and against training images/s: a line through the backbones per data
    set (colour) and strategy (marker), error bars the std over seeds."""
    fig = Figure(figsize=(11, 4.8), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    series: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        series.setdefault((row["data"], row["strategy"]), []).append(row)
    datasets = list(dict.fromkeys(row["data"] for row in rows))
    strategies = list(dict.fromkeys(row["strategy"] for row in rows))
    for (data, strategy), members in series.items():
        means, stds = zip(*(mean_and_std(r["test_accs"])[:2] for r in members), strict=True)
        style = {
            "color": f"C{datasets.index(data) % 10}",
            "marker": "os^vD"[strategies.index(strategy) % 5],
            "linestyle": "-" if strategies.index(strategy) == 0 else "--",
            "capsize": 3,
        }
        for ax, key in zip(axes, ("params_m", "images_per_s"), strict=True):
            xs = [r[key] for r in members]
            ax.errorbar(xs, means, yerr=stds, label=f"{data}, {strategy}" if ax is axes[0] else None, **style)
            for x, y, r in zip(xs, means, members, strict=True):
                ax.annotate(
                    r["backbone"].replace("efficientnet_", ""),
                    (x, y),
                    fontsize="x-small",
                    xytext=(3, 3),
                    textcoords="offset points",
                )
    axes[0].set(xlabel="parameters (M)", ylabel="test accuracy", title="accuracy against size")
    axes[1].set(xlabel="training images/s", title="accuracy against training speed")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=min(4, len(series)), fontsize="small")
    return fig


def report(results: list[dict[str, Any]], plot_path: Path) -> list[dict[str, Any]]:
    """Prints the table and writes the plot; returns the table's rows."""
    rows = summary(results)
    headers = ["data", "backbone", "params (M)", "strategy", "test acc", "training images/s"]
    cells = [
        [r["data"], r["backbone"], f"{r['params_m']:.2f}", r["strategy"], mean_std(r["test_accs"]), r["images_per_s"]]
        for r in rows
    ]
    seeds = len(rows[0]["test_accs"])
    print(f"\ntest acc: mean ± std over {seeds} seed(s), of the final weights\n\n{table(headers, cells)}\n", flush=True)
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    plot(rows).savefig(plot_path, dpi=120)
    print(f"plot: {plot_path}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = benchmark_parser(__doc__, "extra overrides for every run")
    parser.add_argument("--datasets", nargs="+", default=list(SIZES), choices=list(SIZES), help="under --root")
    parser.add_argument("--root", type=Path, default=DATASETS, help="where the data sets are")
    parser.add_argument("--backbones", nargs="+", default=BACKBONES, choices=BACKBONES)
    parser.add_argument("--recipe", default="", help="the recipe's overrides in one argument (default: train.py's)")
    parser.add_argument("--seeds", default="1")
    parser.add_argument("--tiny", action="store_true", help="generated images (data=synthetic), 32 px, 2 steps a run")
    parser.add_argument("--out", type=Path, help="the runs; default: logs/benchmarks/backbones/<time>")
    parser.add_argument("--plot", type=Path, help=f"default: {PLOT.relative_to(ROOT)} (--tiny: into --out)")
    args = parser.parse_args(argv)

    out = args.out or ROOT / "logs" / "benchmarks" / "backbones" / f"{datetime.now():%Y-%m-%d_%H-%M-%S}"
    data = {
        name: ["data=imagefolder", f"data.root={args.root / name}", f"data.image_size={SIZES[name]}"]
        for name in args.datasets
    }
    extra = args.overrides
    if args.tiny:
        data, extra = {"tiny": TINY_DATA}, [*TINY, *extra]
    plot_path = args.plot or (out / "backbones.png" if args.tiny else PLOT)
    strategies = {" ".join(PROBE): PROBE, args.recipe or "recipe": args.recipe.split()}
    common = " ".join([*QUIET, *NO_CHECKPOINTS, *extra])
    print(f"# Backbones: {machine()}\n# every run: {common}\n", flush=True)

    results = []
    for seed in args.seeds.split(","):
        for name, data_overrides in data.items():
            for backbone in args.backbones:
                for label, strategy in strategies.items():
                    overrides = [
                        *data_overrides,
                        f"model={backbone}",
                        *QUIET,
                        *NO_CHECKPOINTS,
                        *strategy,
                        f"seed={seed}",
                        *extra,
                    ]
                    folder = out / name / backbone / label.replace(" ", "_").replace("=", "-") / f"seed{seed}"
                    result = {"data": name, "backbone": backbone, "strategy": label, "seed": int(seed)}
                    result |= run(overrides, folder)
                    results.append(result)
                    print(json.dumps(result), flush=True)
        rows = report(results, plot_path)
    return rows


if __name__ == "__main__":
    main()

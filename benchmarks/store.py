"""The decoded image store against the JPEG path in train.py's fit: wall time and test accuracy, same seeds.

    python -m benchmarks.store                            # seefood512 at 128 and 224 px, CIFAR-10 subset; seeds 1,2,3
    python -m benchmarks.store --datasets seefood512-224 --seeds 1 trainer.max_epochs=2
    python -m benchmarks.store --tiny                     # generated images, 2 steps a run

Every run is train.py's fit and test in this process with its defaults (the recommended recipe) on
EfficientNet-Lite0 (ImageNet weights, offline): `data.store=false` (every epoch decodes and resizes every JPEG in
the loader's workers) against `data.store=true` (`finetune.data.store`: decoded once; on this CPU the crop and
flip stay in the workers, `data.augment_on=auto`). The store of each data set is built before its first run,
and that one-time build is timed on its own. For each seed the two runs take turns going first. Each run is
printed as a JSON line (`grep '^{'`), and the table (mean ± std over seeds, the ratio of fit times) at the end.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import DATASETS, QUIET, benchmark_parser, machine, table
from benchmarks.backbones import NO_CHECKPOINTS, TINY, TINY_DATA, run
from benchmarks.strategies import cifar10_subset
from finetune.builders import build
from finetune.config import compose_config
from finetune.report import mean_std

DATASET_NAMES = ["seefood512-128", "seefood512-224", "cifar10-128"]


def data_overrides(name: str) -> list[str]:
    """The data of a named variant: `<data set>-<image size>`; CIFAR-10 is 100 train / 50 test images per class."""
    dataset, size = name.rsplit("-", 1)
    root = (
        cifar10_subset(DATASETS / "cifar10-jpg.tar.gz", Path("/tmp/cifar10-100-50"), 100, 50)
        if dataset == "cifar10"
        else DATASETS / dataset
    )
    return ["data=imagefolder", f"data.root={root}", f"data.image_size={size}"]


def build_stores(overrides: list[str], root: Path) -> float:
    """Seconds to decode the data set into its store (what the first `data.store=true` run pays once)."""
    start = time.perf_counter()
    datamodule, _ = build(compose_config([*overrides, "data.store=true"], root))
    datamodule.prepare_data()  # generated or downloaded data sets are written first
    datamodule.setup("fit")
    return time.perf_counter() - start


def summary(results: list[dict[str, Any]]) -> list[list[object]]:
    rows = []
    for name in dict.fromkeys(r["data"] for r in results):
        runs = {store: [r for r in results if r["data"] == name and r["store"] == store] for store in (False, True)}
        fit_s = {store: statistics.mean(r["fit_s"] for r in members) for store, members in runs.items()}
        for store, members in runs.items():
            rows.append(
                [
                    name,
                    "store" if store else "JPEG",
                    mean_std([r["test_acc"] for r in members]),
                    fit_s[store],
                    f"{fit_s[store] / fit_s[False]:.2f}",
                    statistics.mean(r["images_per_s"] for r in members),
                ]
            )
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = benchmark_parser(__doc__, "extra overrides for every run")
    parser.add_argument("--datasets", nargs="+", default=DATASET_NAMES, help="<data set>-<size>")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--tiny", action="store_true", help="generated images (data=synthetic), 32 px, 2 steps a run")
    args = parser.parse_args(argv)

    model = ["model=efficientnet_lite0"]
    datasets = {"tiny": TINY_DATA} if args.tiny else {name: data_overrides(name) for name in args.datasets}
    extra = [*QUIET, *NO_CHECKPOINTS, *model, *(TINY if args.tiny else []), *args.overrides]
    print(f"# The store against the JPEG path: {machine()}\n# every run: {' '.join(extra)}\n", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, data in datasets.items():
            build_s = build_stores([*data, *extra, f"paths.data_dir={root / 'data'}"], root / "build")
            print(json.dumps({"data": name, "store_build_s": build_s}), flush=True)
            for index, seed in enumerate(args.seeds.split(",")):
                for store in (False, True) if index % 2 == 0 else (True, False):
                    overrides = [
                        *data,
                        *extra,
                        f"paths.data_dir={root / 'data'}",
                        f"data.store={store}",
                        f"seed={seed}",
                    ]
                    result = {"data": name, "store": store, "seed": int(seed)}
                    result |= run(overrides, root / name / f"store-{store}" / f"seed{seed}")
                    results.append(result)
                    print(json.dumps(result), flush=True)
    headers = ["data", "path", "test acc", "fit s", "fit time / JPEG's", "training images/s"]
    print(f"\nmean (± std) over seeds {args.seeds}\n\n{table(headers, summary(results))}", flush=True)
    return results


if __name__ == "__main__":
    main()

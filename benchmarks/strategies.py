"""Strategy comparison on real data: EfficientNet-Lite0 (ImageNet weights), every strategy, several seeds.

    python -m benchmarks.strategies                                  # hotdog64, 128 px, seeds 1,2,3, 5 epochs
    python -m benchmarks.strategies --data cifar10                   # 100 + 50 images per class
    python -m benchmarks.strategies --lr 6.4e-3 optimizer=sgd scheduler=none loss.label_smoothing=0 data.batch_size=128   # d2l's

Runs the sweeps as a user types them (`train.py -m ...`, one multirun folder each, under one output
folder), then `python -m finetune.report` on that folder, which prints the table and writes
report.md and the plots there. Per seed, two sweeps: every strategy with the recipe (train.py's defaults, the
recommended recipe, changed by trailing overrides), and `scratch` again at 10x its lr for every weight, as d2l
trains its scratch model, so scratch is not judged at an lr chosen for pretrained weights. Seed by seed, with a report after each, so a run cut short still compares every strategy.
The shared datasets are never copied into the project; CIFAR-10's subset is extracted to /tmp.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import time
from datetime import datetime
from pathlib import Path

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


def sweep(sweep_dir: Path, overrides: list[str]) -> None:
    command = [sys.executable, "train.py", "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"]
    print("$", " ".join(command[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    print(f"  done in {(time.perf_counter() - start) / 60:.1f} min", flush=True)


def main(argv: list[str] | None = None) -> Path:
    parser = benchmark_parser(__doc__, "extra overrides for every run")
    parser.add_argument("--data", default="hotdog64", help="hotdog64, cifar10 or an image folder's path")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--train-per-class", type=int, default=100, help="cifar10 only")
    parser.add_argument("--test-per-class", type=int, default=50, help="cifar10 only")
    parser.add_argument("--lr", type=float, help="the shared lr (default: the recipe's; scratch also gets 10x)")
    parser.add_argument("--out", type=Path, help="default: logs/benchmarks/strategies-<data>/<time>")
    args = parser.parse_args(argv)

    if args.data == "cifar10":
        subset = f"cifar10-{args.train_per_class}-{args.test_per_class}"
        root = cifar10_subset(
            DATASETS / "cifar10-jpg.tar.gz", Path("/tmp") / subset, args.train_per_class, args.test_per_class
        )
    elif args.data == "hotdog64":
        root = DATASETS / "hotdog64"
    else:
        root = Path(args.data).resolve()
    out = args.out or ROOT / "logs" / "benchmarks" / f"strategies-{root.name}" / f"{datetime.now():%Y-%m-%d_%H-%M-%S}"
    common = [
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
    shared_lr = args.lr or compose_config(common, out).optimizer.lr
    for seed in args.seeds.split(","):
        lr = f"optimizer.lr={shared_lr:g}"
        sweep(out / f"seed{seed}" / "strategies", [f"seed={seed}", f"strategy={STRATEGIES}", lr, *common])
        lr = f"optimizer.lr={shared_lr * 10:g}"
        sweep(out / f"seed{seed}" / "scratch_lr10x", [f"seed={seed}", "strategy=scratch", lr, *common])
        subprocess.run([sys.executable, "-m", "finetune.report", str(out)], cwd=ROOT, check=True)
    return out


if __name__ == "__main__":
    main()

"""Peak memory (RSS) of a CPU training run, and its growth from epoch to epoch (a leak would grow).

    python -m benchmarks.memory              # efficientnet_lite0 fine-tuned on hotdog64 at 128 px, 6 short epochs

The run is train.py's fit and test (`finetune.train.build`, the config's Trainer, callbacks and
loggers). Forked DataLoader workers share most of their pages with the main process, so the sum of
RSS would count those twice: the total is the main process's RSS plus each worker's USS (the pages
only it holds). A thread samples it every 0.2 s for the peak; at the end of every training epoch
both are recorded. A leak in the training loop shows as growth from epoch to epoch.
"""

from __future__ import annotations

import resource
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import psutil
from lightning.pytorch.callbacks import Callback

from benchmarks._common import QUIET, add_run_arguments, benchmark_parser, fit, machine, run_overrides, table
from finetune.config import compose_config

MB = 2**20


def memory() -> tuple[float, float]:
    """(RSS of this process, that plus its workers' USS) in MB."""
    me = psutil.Process()
    main = me.memory_info().rss
    workers = 0
    for worker in me.children(recursive=True):
        try:
            workers += worker.memory_full_info().uss
        except psutil.NoSuchProcess:  # a worker that just exited
            continue
    return main / MB, (main + workers) / MB


class MemoryMonitor(Callback):
    """Memory at each training epoch's end, and the peak of the total sampled in a thread."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.epochs, self.peak_total = interval, [], 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_total = max(self.peak_total, memory()[1])

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._thread.start()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epochs.append(memory())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = benchmark_parser(__doc__, "extra config overrides")
    add_run_arguments(parser, epochs=6)
    parser.add_argument("--train-batches", type=int, default=15, help="per epoch")
    parser.add_argument("--val-batches", type=int, default=5, help="per epoch")
    args = parser.parse_args(argv)

    overrides = [
        *run_overrides(args),
        *QUIET,
        f"++trainer.limit_train_batches={args.train_batches}",
        f"++trainer.limit_val_batches={args.val_batches}",
        *args.overrides,
    ]
    print(f"# Memory, {' '.join(overrides)}: {machine()}\n", flush=True)
    monitor = MemoryMonitor()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        trainer, datamodule, model = fit(compose_config(overrides, Path(tmp)), monitor)
        trainer.test(model, datamodule=datamodule, verbose=False)
    monitor.stop()
    peak_main = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    mains = [main for main, _ in monitor.epochs]
    per_epoch = (mains[-1] - mains[1]) / (len(mains) - 2) if len(mains) > 2 else float("nan")
    rows = [[epoch, main, total] for epoch, (main, total) in enumerate(monitor.epochs)]
    print(table(["end of epoch", "main RSS MB", "main RSS + workers USS MB"], rows))
    result = {
        "peak_main_mb": peak_main,
        "peak_total_mb": monitor.peak_total,
        "growth_mb_per_epoch": per_epoch,
        "wall_s": time.perf_counter() - start,
    }
    print(
        f"\npeak: main process RSS {peak_main:.0f} MB, main RSS + workers USS (sampled) {monitor.peak_total:.0f} MB; "
        f"main RSS growth from epoch 1 to {len(mains) - 1}: {per_epoch:+.1f} MB/epoch; {result['wall_s']:.0f} s"
    )
    return result


if __name__ == "__main__":
    main()

"""How often train.py's training steps read a device tensor's value on the host, and which code does it.

    python -m benchmarks.host_reads                      # hotdog64 at 32 px, 2 epochs of 20 steps, three data paths
    python -m benchmarks.host_reads --steps 50 trainer.log_every_n_steps=25

On a GPU the host queues a step's kernels while the device still runs the previous step's. Reading a device
tensor's value on the host (`.item()`, `float(t)`, `if t:`, a boolean mask's size, `.cpu()`) makes the host wait
until the device has run everything queued, and the device then idles while the next step is queued. This counts the
calls that would do it, on any machine (a TorchFunctionMode sees every call on a tensor): here on the CPU they wait
for nothing, on a GPU each is a wait. Not counted, as they read CPU tensors on every device: the data loader's work
(in its workers on a GPU machine) and the optimizer's step counters. A read is counted in the training step it falls
in, from its batch's start to the next batch's (or the epoch's end); validation is left out. A tiny random-init
model at 32 px (the reads do not depend on the model); `benchmarks.throughput` counts the waits on a real GPU.
"""

from __future__ import annotations

import collections
import tempfile
import traceback
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig
from torch.overrides import TorchFunctionMode

from benchmarks._common import DATASETS, HOST_BOUND, benchmark_parser, table
from finetune.builders import build, build_fit_trainer
from finetune.config import compose_config

READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.numpy,
    torch.Tensor.cpu,
    torch.Tensor.__bool__,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
    torch.Tensor.nonzero,
    torch.nonzero,
    torch.argwhere,
    torch.masked_select,
    torch.unique,
    torch.Tensor.unique,
}
NOT_THE_DEVICE = ("torch/utils/data/", "torch/optim/")  # the loader's CPU tensors, the optimizer's step counters
DATA_PATHS = {
    "defaults": [],
    "normalised-on-device": ["data.augment_on=device"],  # the JPEG files' uint8 batches (a GPU's default)
    "store-cropped-on-device": ["data.store=true", "data.augment_on=device"],
}


class HostReads(TorchFunctionMode):
    """The calls that read a tensor's value on the host (file:line of the caller), by training step (`step`, which
    `StepWindow` sets; None: not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.step: int | None = None
        self.reads: dict[int, list[str]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's signature)
        index = args[1] if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) else ()
        masks = [i for i in (index if isinstance(index, tuple) else (index,)) if isinstance(i, torch.Tensor)]
        masked = any(mask.dtype == torch.bool for mask in masks)  # the result's size is the mask's count of True
        if self.step is not None and (func in READS or masked):
            stack = traceback.extract_stack()[:-1]
            if not any(part in frame.filename for frame in stack for part in NOT_THE_DEVICE):
                name = getattr(func, "__name__", str(func))
                self.reads.setdefault(self.step, []).append(
                    f"{name} at {_short(stack[-1].filename)}:{stack[-1].lineno}"
                )
        return func(*args, **(kwargs or {}))


def _short(filename: str) -> str:
    """`lightning/...`, `finetune/...`: the path from the package on."""
    parts = Path(filename).parts
    start = max((i for i, part in enumerate(parts) if part in ("site-packages", "src")), default=len(parts) - 2)
    return "/".join(parts[start + 1 :])


class StepWindow(L.Callback):
    """Tells `reads` which training step runs. Put first among the callbacks, so that the others' hooks at a batch's
    start and at an epoch's end fall on the right side of it."""

    def __init__(self, reads: HostReads) -> None:
        self.reads, self.steps = reads, 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.reads.step, self.steps = self.steps, self.steps + 1

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.reads.step = None


def count(cfg: DictConfig) -> tuple[int, dict[int, list[str]]]:
    """Fit as train.py does and count the host reads of each training step: (steps, reads by step)."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule, model = build(cfg)
    trainer = build_fit_trainer(cfg)
    reads = HostReads()
    window = StepWindow(reads)
    trainer.callbacks.insert(0, window)
    with reads:
        trainer.fit(model, datamodule=datamodule)
    return window.steps, reads.reads


def overrides(data: Path, steps: int, extra: list[str]) -> list[str]:
    return [
        *HOST_BOUND,
        f"data.root={data}",
        "data.min_steps_per_epoch=0",
        "trainer.max_epochs=2",
        f"++trainer.limit_train_batches={steps}",
        "++trainer.limit_val_batches=1",
        "callbacks.progress_bar.every_s=1e9",  # it reads at the ends of epochs: the same steps every run
        *extra,
    ]


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--data", type=Path, default=DATASETS / "hotdog64")
    parser.add_argument("--steps", type=int, default=20, help="training steps per epoch (2 epochs)")
    parser.add_argument("--paths", nargs="+", choices=list(DATA_PATHS), default=list(DATA_PATHS))
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.paths:
            cfg = compose_config(
                overrides(args.data, args.steps, [*DATA_PATHS[path], *args.overrides]), Path(tmp) / path
            )
            steps, reads = count(cfg)
            sources = collections.Counter(where for step in reads.values() for where in step)
            rows.append(
                {
                    "data path": path,
                    "steps": steps,
                    "reads/step": sum(sources.values()) / steps,
                    "steps with reads": f"{len(reads)} ({', '.join(str(s) for s in sorted(reads))})",
                    "reads": "; ".join(f"{n} x {where}" for where, n in sources.most_common()),
                    "by_step": reads,
                }
            )
            print(f"{path}: {rows[-1]['reads/step']:.2f} reads per step", flush=True)
    headers = ["data path", "steps", "reads/step", "steps with reads", "reads"]
    print(
        f"\nHost reads of device tensors in training steps (trainer.log_every_n_steps={cfg.trainer.log_every_n_steps})\n"
    )
    print(table(headers, [[row[h] for h in headers] for row in rows]))
    return rows


if __name__ == "__main__":
    main()

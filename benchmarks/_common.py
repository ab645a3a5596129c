"""What the performance benchmarks share: the real config as train.py composes it, clocks, the machine."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, open_dict

from finetune.train import CONFIG_DIR, build

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
# No progress bar or model summary (Lightning would add its own defaults), on the CPU.
QUIET = [
    "~callbacks.progress_bar",
    "~callbacks.model_summary",
    "++trainer.enable_progress_bar=false",
    "++trainer.enable_model_summary=false",
    "trainer.accelerator=cpu",
]


def config(overrides: list[str], output_dir: Path) -> DictConfig:
    """The train config exactly as `python train.py <overrides>` composes it, writing into `output_dir`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.root_dir={output_dir}", *overrides], return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir / "run")
    return cfg


def add_run_arguments(parser: argparse.ArgumentParser, epochs: int) -> None:
    """The options of a benchmark that trains one model on one image folder."""
    parser.add_argument("--data", type=Path, default=DATASETS / "hotdog64")
    parser.add_argument("--model", nargs="+", default=["model=efficientnet_lite0"], help="model overrides")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=epochs)


def run_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides those options stand for."""
    return [
        "data=imagefolder",
        f"data.root={args.data}",
        f"data.image_size={args.image_size}",
        *args.model,
        f"trainer.max_epochs={args.epochs}",
    ]


def trainer_for(cfg: DictConfig, *extra_callbacks: Callback) -> L.Trainer:
    """The Trainer as `finetune.train.train` makes it: the config's callbacks and loggers, plus the strategy's."""
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    callbacks += [instantiate(cfg.strategy.callback), *extra_callbacks]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)


def fit(cfg: DictConfig, *extra_callbacks: Callback) -> tuple[L.Trainer, Any, Any]:
    """Seed, build and fit as train.py does; returns the trainer, datamodule and model."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule, model = build(cfg)
    trainer = trainer_for(cfg, *extra_callbacks)
    trainer.fit(model, datamodule=datamodule)
    return trainer, datamodule, model


class StepClock(Callback):
    """Wall time and this process's CPU time at the end of every training step (after the optimizer step
    and logging). CPU time hardly depends on what other jobs do on the machine; wall time does."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.tick()

    def tick(self) -> None:
        if torch.cuda.is_initialized():  # the time the step's kernels end, not when they were queued
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        self.cpu.append(time.process_time())


def images_per_s(times: list[float], warmup: int, batch_size: int) -> float:
    """Rate over the steps after `warmup` (the first `warmup` steps start workers and warm up kernels);
    with CPU times: images per CPU second of this process."""
    if len(times) <= warmup:
        raise ValueError(f"{len(times)} steps timed, need more than the {warmup} warm-up steps")
    return (len(times) - warmup) * batch_size / (times[-1] - times[warmup - 1])


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    gpus = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}, " if torch.cuda.is_available() else ""
    return (
        f"{gpus}{cpu}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads, python {sys.version.split()[0]}, load average {load:.1f} at start"
    )


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def table(headers: list[str], rows: list[list[object]]) -> str:
    """A Markdown table (what BENCHMARKS.md shows)."""
    cells = [[_cell(v) for v in row] for row in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])

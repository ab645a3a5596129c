"""What the benchmarks share: their argument parser, the fit as train.py builds it, clocks, the machine, tables."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from finetune.builders import build, build_fit_trainer

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
MODELS = {
    "resnet18": ["model=resnet18", "strategy.pretrained=false"],  # no torchvision weights offline: same speed
    "efficientnet_lite0": ["model=efficientnet_lite0"],
    "tiny": ["model=timm", "model.name=mobilenetv3_small_050", "strategy.pretrained=false"],  # smoke tests
}
DEFAULT_MODELS = ["resnet18", "efficientnet_lite0"]
# Speed is measured on steps that train every weight: the recipe's first epoch trains the head alone.
EVERY_WEIGHT_TRAINS = ["strategy=finetune"]
# No progress bar or model summary (Lightning would add its own defaults), on the CPU.
QUIET = [
    "~callbacks.progress_bar",
    "~callbacks.model_summary",
    "++trainer.enable_progress_bar=false",
    "++trainer.enable_model_summary=false",
    "trainer.accelerator=cpu",
]

# A fit whose step is mostly the host's own work (Lightning's loop, callbacks, the optimizer's Python, launches):
# a tiny random-init ResNet at 32 px, batch 4, no workers, on the CPU
HOST_BOUND = [
    "data=imagefolder",
    "data.image_size=32",
    "data.batch_size=4",
    "data.num_workers=0",
    "model=timm",
    "model.name=test_resnet",
    "strategy.pretrained=false",
    "trainer.accelerator=cpu",
]


def add_run_arguments(parser: argparse.ArgumentParser, epochs: int) -> None:
    """The options of a benchmark that trains one model on one image folder."""
    parser.add_argument("--data", type=Path, default=DATASETS / "hotdog64")
    parser.add_argument("--model", nargs="+", default=["model=efficientnet_lite0"], help="model overrides")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=epochs)


def add_speed_arguments(parser: argparse.ArgumentParser, sizes: list[int], steps: int, rounds: int) -> None:
    """The options of a benchmark that times training steps: which models at which sizes, and how long."""
    parser.add_argument("--data", type=Path, default=DATASETS / "hotdog64")
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS))
    parser.add_argument("--sizes", nargs="+", type=int, default=sizes)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=steps, help="timed steps per measurement (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=rounds)


def run_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides those options stand for."""
    return [
        "data=imagefolder",
        f"data.root={args.data}",
        f"data.image_size={args.image_size}",
        *args.model,
        f"trainer.max_epochs={args.epochs}",
    ]


def benchmark_parser(
    description: str, overrides: str | None = "extra config overrides for every run"
) -> argparse.ArgumentParser:
    """Every benchmark's argument parser: its docstring as the help, and (unless None) trailing config overrides."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if overrides:
        parser.add_argument("overrides", nargs="*", help=f"{overrides}, e.g. data.batch_size=64")
    return parser


def fit(cfg: DictConfig, *extra_callbacks: Callback) -> tuple[L.Trainer, Any, Any]:
    """Seed, build and fit as train.py does; returns the trainer, datamodule and model."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule, model = build(cfg)
    trainer = build_fit_trainer(cfg, *extra_callbacks)
    trainer.fit(model, datamodule=datamodule)
    return trainer, datamodule, model


class StepClock(Callback):
    """Wall time and this process's CPU time at the end of every training step (after the optimizer step
    and logging). CPU time hardly depends on what other jobs do on the machine; wall time does. On a GPU also its
    utilisation then (`gpu`: the share of the last NVML sample period, 1/6 to 1 s, that a kernel ran, as
    nvidia-smi reads it), where NVML answers.

    On a GPU a time is when the step's kernels have finished, not when they were queued: the clock waits for them.
    `synchronize_at` (the steps' indices) makes it wait at those steps only, e.g. where a timed window starts and
    ends, so that the host queues the steps in between while the GPU runs, as in training (None: at every step)."""

    def __init__(self, synchronize_at: Collection[int] | None = None) -> None:
        self.times: list[float] = []
        self.cpu: list[float] = []
        self.gpu: list[float] = []
        self.synchronize_at = synchronize_at
        self._nvml = True

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.tick()

    def tick(self) -> None:
        if torch.cuda.is_initialized() and (self.synchronize_at is None or len(self.times) in self.synchronize_at):
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        self.cpu.append(time.process_time())
        if torch.cuda.is_initialized() and self._nvml:
            try:
                self.gpu.append(float(torch.cuda.utilization()))
            except Exception:  # no NVML (pynvml) here: no utilisation
                self._nvml = False


def images_per_s(times: list[float], warmup: int, batch_size: int) -> float:
    """Rate over the steps after `warmup` (the first `warmup` steps start workers and warm up kernels);
    with CPU times: images per CPU second of this process."""
    if len(times) <= warmup:
        raise ValueError(f"{len(times)} steps timed, need more than the {warmup} warm-up steps")
    return (len(times) - warmup) * batch_size / (times[-1] - times[warmup - 1])


def in_turn(names: list[str] | tuple[str, ...], round_: int) -> list[str] | tuple[str, ...]:
    """The names in the order of round `round_`: each starts a round in turn, so that none always runs first."""
    shift = round_ % len(names)
    return names[shift:] + names[:shift]


def at_once(function: Callable[..., object], *args: object, runs: int) -> None:
    """`function(*args)` in `runs` processes forked together, as DDP ranks or a parallel sweep's jobs start; an
    error if any of them fails."""
    processes = [multiprocessing.get_context("fork").Process(target=function, args=args) for _ in range(runs)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    if any(process.exitcode for process in processes):
        raise RuntimeError(f"a run failed: exit codes {[process.exitcode for process in processes]}")


def median(values: list[float]) -> float:
    return statistics.median(values)


def mean(values: list[float]) -> float:
    return statistics.fmean(values)


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


_NOISE: dict[tuple[int, int, float], Any] = {}  # per process: a noise field, larger than a photo


def _photo(job: tuple[Path, Path, tuple[int, int], int, float, int]) -> None:
    import numpy as np
    from PIL import Image

    source, target, (width, height), quality, noise, seed = job
    with Image.open(source) as image:
        pixels = np.asarray(image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    if noise:  # a window of one field at a seeded offset: cheaper than new noise for every photo
        key = (width, height, noise)
        if key not in _NOISE:
            field = np.random.default_rng(0).standard_normal((height + 64, width + 64, 3), dtype=np.float32)
            _NOISE[key] = field * noise
        y, x = np.random.default_rng(seed).integers(0, 64, 2)
        pixels += _NOISE[key][y : y + height, x : x + width]
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(target, quality=quality)


def make_photos(
    source: Path,
    target: Path,
    counts: dict[str, int],
    size: tuple[int, int] = (512, 384),
    quality: int = 90,
    noise: float = 6.0,
) -> None:
    """Photo-sized JPEGs for measuring the data path: `counts[split]` images of `source/<split>/<class>/*`, taken
    in turn from each class (again from the first when a class runs out), resized to `size` (bicubic), with
    Gaussian noise of std `noise` (seeded) and saved as JPEG `quality` in `target/<split>/<class>/`, in a process
    per core. Upscaled small images hold less detail than photos and decode faster: the noise gives them the file
    size and decoding time of real photos (512x384 from CIFAR-10: about 45 KB and 0.9 ms, as seefood512's photos;
    without noise 15 KB and 0.6 ms)."""
    jobs = []
    for split, count in counts.items():
        classes = sorted(folder for folder in (source / split).iterdir() if folder.is_dir())
        files = [sorted(folder.iterdir()) for folder in classes]
        for index in range(count):
            folder, files_of_class = classes[index % len(classes)], files[index % len(classes)]
            file = files_of_class[(index // len(classes)) % len(files_of_class)]
            (target / split / folder.name).mkdir(parents=True, exist_ok=True)
            jobs.append((file, target / split / folder.name / f"{index:06d}.jpg", size, quality, noise, index))
    with multiprocessing.get_context("fork").Pool(len(os.sched_getaffinity(0))) as pool:
        pool.map(_photo, jobs, chunksize=64)


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

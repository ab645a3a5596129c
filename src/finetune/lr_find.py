"""`python lr_find.py [train.py's overrides]`: a learning-rate range test (Smith 2017, "Cyclical Learning Rates for
Training Neural Networks"; fastai's `lr_find`) on what train.py would train with the same overrides.

For `lr_find.steps` optimizer steps the lr grows exponentially from `lr_find.min_lr` to `lr_find.max_lr`, every
param group at that lr x its multiplier (the head at 10x), and the training loss of each step is recorded; the
test stops early once the smoothed loss exceeds `lr_find.stop_factor` x its lowest (the loss diverged). It runs
the run's own model, data, param groups, loss terms, accumulation, precision and clipping, and what trains is
the strategy's first phase (`StageUnfreezing` at epoch 0: for `freeze_unfreeze`, the head alone). The run's lr
schedule is left out: a warmup would scale the lrs under test. The suggestion is fastai's `valley` (`valley`).
Afterwards the model is as it was (weights, buffers, frozen stages, train/eval modes), and so is the random
state: a fit that follows is the fit it would have been without the test.

Not Lightning's `Tuner.lr_find`: it sets every param group to the same lr (the head's multiplier is lost), runs
with its own callback alone (the strategy's callback never freezes the backbone; with `BackboneFinetuning` it
breaks, lightning #14674), and restores the weights through a checkpoint file (lightning #6675).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter

from finetune.analysis import render
from finetune.builders import build, build_trainer, build_unfreezing, instantiate_callbacks
from finetune.config import CONFIG_DIR
from finetune.data.datamodule import ImageFolderDataModule
from finetune.errors import ConfigError, exit_on_user_error
from finetune.models.module import FineTuneModule
from finetune.run_status import command_line
from finetune.validation import config_problems, number, validate

# fastai leaves the last 5 steps out of the suggestion (the loss shooting up) and the first tenth (not moving yet)
SKIP_END = 5


class RangeTest(Callback):
    """Sets every param group's lr before each batch (optimizer.lr grows exponentially from `min_lr` to `max_lr`
    over `steps` optimizer steps; each group at that lr x its `lr_mult`) and records each step's loss, its
    exponential moving average (`smoothing`, debiased as fastai's) and every group's lr. Stops the fit once the
    loss is not finite or the smoothed loss exceeds `stop_factor` x its lowest (None: never)."""

    def __init__(
        self, min_lr: float, max_lr: float, steps: int, smoothing: float = 0.98, stop_factor: float | None = 4.0
    ):
        self.min_lr, self.max_lr, self.steps = min_lr, max_lr, steps
        self.smoothing, self.stop_factor = smoothing, stop_factor
        self.lrs: list[float] = []  # optimizer.lr of each step
        self.losses: list[float] = []
        self.smoothed: list[float] = []
        self.group_lrs: list[dict[str, float]] = []  # each param group's lr in each step, by name
        self.trainable_stages = self.num_stages = 0  # what trained: the strategy's first phase
        self._batch_losses: list[float] = []
        self._average = 0.0
        self._lowest = math.inf

    def lr_at(self, step: int) -> float:
        return self.min_lr * (self.max_lr / self.min_lr) ** (step / max(1, self.steps - 1))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        backbone = pl_module.backbone
        self.trainable_stages, self.num_stages = backbone.num_stages - backbone.frozen_stages, backbone.num_stages

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        lr = self.lr_at(trainer.global_step)
        for group in trainer.optimizers[0].param_groups:
            group["lr"] = lr * group["lr_mult"]

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Lightning divides each batch's loss by accumulate_grad_batches (what backward sees): summed over the
        # batches of a step, the step's mean loss
        self._batch_losses.append(float(outputs["loss"]))
        if trainer.global_step == len(self.losses):  # accumulating: no optimizer step yet
            return
        loss, self._batch_losses = sum(self._batch_losses), []
        self.lrs.append(self.lr_at(len(self.losses)))
        self.group_lrs.append({group["name"]: group["lr"] for group in trainer.optimizers[0].param_groups})
        self.losses.append(loss)
        self._average = self.smoothing * self._average + (1 - self.smoothing) * loss
        smoothed = self._average / (1 - self.smoothing ** len(self.losses))
        self.smoothed.append(smoothed)
        self._lowest = min(self._lowest, smoothed)
        if not math.isfinite(smoothed) or (self.stop_factor and smoothed > self.stop_factor * self._lowest):
            trainer.should_stop = True

    @property
    def trained(self) -> str:
        """What trained in the test, in words."""
        if self.trainable_stages == 0:
            return "the head alone"
        if self.trainable_stages == self.num_stages:
            return "the head and every backbone stage"
        return f"the head and the top {self.trainable_stages} of {self.num_stages} backbone stages"


def valley(losses: Sequence[float]) -> int:
    """fastai's `valley` rule (`fastai.callback.schedule`, its default since fastai 2.5): the longest stretch over
    which the loss keeps falling (a longest strictly decreasing subsequence, O(n^2)), and the point halfway into it
    (fastai's index: a third plus a sixth of its length from its start). Not the steepest descent: the slope of a
    noisy curve peaks at whichever step happened to fall most, anywhere along the curve, while the longest fall
    stands where the loss falls steadily, below the lrs where it turns."""
    longest = [1] * len(losses)
    end = 0
    for i in range(1, len(losses)):
        for j in range(i):
            if losses[i] < losses[j]:
                longest[i] = max(longest[i], longest[j] + 1)
        if longest[i] > longest[end]:
            end = i
    if longest[end] == 1:
        raise ConfigError(
            "the loss never fell during the range test: raise lr_find.max_lr or lr_find.steps (or check the data)"
        )
    start = max(0, end - longest[end])
    third = (end - start) / 3
    return start + int(third) + int(third / 2)


def suggestion(test: RangeTest) -> int:
    """The step whose lr is suggested: `valley` of the smoothed losses, without the first tenth of the steps and
    the last `SKIP_END` (as fastai)."""
    skip = test.steps // 10
    kept = test.smoothed[skip : len(test.smoothed) - SKIP_END]
    if len(kept) < 3:
        raise ConfigError(
            f"the range test stopped after {len(test.smoothed)} of {test.steps} steps, too few to suggest an lr: "
            f"the loss diverged early (lower lr_find.min_lr) or an epoch is shorter (trainer.limit_train_batches)"
        )
    return skip + valley(kept)


def random_state() -> tuple[Any, ...]:
    return (
        random.getstate(),
        np.random.get_state(),
        torch.get_rng_state(),
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    )


def set_random_state(state: tuple[Any, ...]) -> None:
    python, numpy, torch_cpu, cuda = state
    random.setstate(python)
    np.random.set_state(numpy)
    torch.set_rng_state(torch_cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


@contextmanager
def unchanged(model: FineTuneModule, datamodule: ImageFolderDataModule) -> Iterator[None]:
    """The model (weights, buffers, frozen stages, every module's train/eval mode, its lr schedule), the data's step
    budget and the random state as they were before the block, whatever the block trained. The optimizer is the
    block's own, and the data's batches depend only on (seed, epoch, sample): a fit after the block starts as it
    would have."""
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    modes = [(module, module.training) for module in model.modules()]
    frozen, scheduler = model.backbone.frozen_stages, model.hparams.scheduler
    min_steps, state = datamodule.min_steps_per_epoch, random_state()
    try:
        yield
    finally:
        model.load_state_dict(weights)
        model.backbone.frozen_stages, model.hparams.scheduler = frozen, scheduler
        for module, training in modes:
            module.training = training
        datamodule.min_steps_per_epoch = min_steps
        set_random_state(state)


def range_test(
    cfg: DictConfig, datamodule: ImageFolderDataModule, model: FineTuneModule, *extra_callbacks: Callback
) -> RangeTest:
    """The range test of `cfg.lr_find` on `model` and `datamodule` (built from `cfg`), in one epoch of the run's
    trainer: the strategy's callback, the feature cache and the progress bar of the run's callbacks (no
    checkpoints, loggers or validation), the run's lr schedule left out; then everything as it was (`unchanged`)."""
    options = cfg.lr_find
    test = RangeTest(options.min_lr, options.max_lr, options.steps, options.smoothing, options.stop_factor)
    callbacks = [
        build_unfreezing(cfg),  # first: the strategy decides what is frozen before the feature cache looks
        *instantiate_callbacks({name: cfg.callbacks.get(name) for name in ("feature_cache", "progress_bar")}),
        test,
        *extra_callbacks,
    ]
    one_epoch = {
        "max_epochs": 1,
        "max_steps": options.steps,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        "enable_checkpointing": False,
        "enable_model_summary": False,
    }
    trainer = build_trainer(
        OmegaConf.create({**OmegaConf.to_container(cfg.trainer, resolve=True), **one_epoch}), callbacks
    )
    with unchanged(model, datamodule):
        model.hparams.scheduler = None  # every lr is the test's
        # one epoch of at least `steps` optimizer steps, so the strategy's first phase trains throughout
        datamodule.min_steps_per_epoch = max(datamodule.min_steps_per_epoch, options.steps)
        trainer.fit(model, datamodule=datamodule)
    return test


def plot(test: RangeTest, index: int, title: str) -> Figure:
    """The loss of each step and the smoothed loss against optimizer.lr (log scale), the suggestion marked."""
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    ax = figure.add_subplot()
    ax.plot(test.lrs, test.losses, color="0.7", linewidth=0.8, label="loss of each step")
    ax.plot(test.lrs, test.smoothed, color="C0", label=f"smoothed (moving average, {test.smoothing})")
    lr = test.lrs[index]
    ax.axvline(lr, color="C3", linewidth=0.8, linestyle="--")
    ax.scatter([lr], [test.smoothed[index]], color="C3", zorder=3, label=f"suggestion (valley): {lr:.2g}")
    finite = [value for value in test.smoothed if math.isfinite(value)]
    ax.set_ylim(0.9 * min(min(finite), *(v for v in test.losses if math.isfinite(v))), 1.1 * max(finite))
    ax.set_xscale("log")
    ax.set_xlabel("optimizer.lr (each param group at its multiplier)")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=10)
    ax.legend()
    return figure


def write_outputs(test: RangeTest, index: int, title: str, folder: Path, events: Path) -> Path:
    """`lr_find.png` in `folder`, and the curve (per step: lr, loss, smoothed loss) and the plot as TensorBoard
    events in `events`; returns the plot's path."""
    figure = plot(test, index, title)
    path = folder / "lr_find.png"
    folder.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    with SummaryWriter(str(events)) as writer:
        for step, (lr, loss, smoothed) in enumerate(zip(test.lrs, test.losses, test.smoothed, strict=True)):
            writer.add_scalar("lr_find/lr", lr, step)
            writer.add_scalar("lr_find/loss", loss, step)
            writer.add_scalar("lr_find/smoothed_loss", smoothed, step)
        writer.add_scalar("lr_find/suggested_lr", test.lrs[index], index)
        writer.add_image("lr_find/plot", render(figure), dataformats="HWC")
    return path


def range_test_problems(cfg: DictConfig) -> list[str]:
    """What is wrong with the `lr_find` keys, and with a trainer of more than one device."""
    options, problems = cfg.lr_find, []
    low, high = options.min_lr, options.max_lr
    if not (number(low) and number(high) and 0 < low < high):
        problems.append(f"lr_find.min_lr={low} and lr_find.max_lr={high} must be numbers with 0 < min_lr < max_lr")
    if isinstance(options.steps, bool) or not isinstance(options.steps, int) or options.steps < 2 * SKIP_END:
        problems.append(f"lr_find.steps={options.steps} must be an integer >= {2 * SKIP_END}")
    if not (number(options.smoothing) and 0 <= options.smoothing < 1):
        problems.append(f"lr_find.smoothing={options.smoothing} must be in [0, 1) (0: no smoothing)")
    if options.stop_factor is not None and not (number(options.stop_factor) and options.stop_factor > 1):
        problems.append(f"lr_find.stop_factor={options.stop_factor} must be a number > 1, or null (never stop)")
    if cfg.trainer.get("devices") != 1 or cfg.trainer.get("num_nodes", 1) != 1:
        problems.append(
            "lr_find.py runs on one device (trainer.devices=1): for a run on N devices of data.batch_size=B each, "
            "find the lr on one with data.batch_size=N*B (or trainer.accumulate_grad_batches=N)"
        )
    if cfg.get("ckpt_path"):
        problems.append(f"ckpt_path={cfg.ckpt_path}: lr_find.py tests the initial weights, it resumes nothing")
    return problems


def find_lr(cfg: DictConfig) -> float:
    """Builds the run of `cfg` as train.py does, runs the range test, writes the plot and the TensorBoard events
    into the run folder, prints the override to train with; returns the suggested optimizer.lr."""
    validate(cfg, lambda config: config_problems(config) + range_test_problems(config))
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule, model = build(cfg)
    test = range_test(cfg, datamodule, model)
    index = suggestion(test)
    lr = float(f"{test.lrs[index]:.2g}")
    strategy = cfg.strategy.name
    title = f"strategy={strategy}: {test.trained} trained, the head at {cfg.strategy.head_lr_mult:g}x optimizer.lr"
    folder = Path(cfg.paths.output_dir)
    path = write_outputs(test, index, title, folder, folder / "tensorboard" / cfg.run_name)
    stopped = f", stopped after {len(test.losses)} (the loss diverged)" if len(test.losses) < test.steps else ""
    print(f"Range test: {test.steps} steps of lr {test.min_lr:g} to {test.max_lr:g}{stopped}; {title}")
    print(f"Suggested lr (fastai's valley of the smoothed loss): optimizer.lr={lr:g}")
    print(f"  {command_line(f'optimizer.lr={lr:g}', script='train.py', own_keys='lr_find.')}")
    print(f"Plot: {path}  (and in TensorBoard: tensorboard --logdir {folder})")
    if test.trainable_stages < test.num_stages and cfg.strategy.unfreeze_at:
        print(
            f"strategy={strategy} trains {test.trained} first, as here, and unfreezes the backbone later. The lr at "
            "which every weight trains (the backbone at optimizer.lr, the head at its multiplier), as after the "
            f"unfreeze:\n  {command_line('strategy=finetune', script='lr_find.py')}\n"
            "One optimizer.lr drives both phases: sweep a few lrs from the lower of the two suggestions to about 3x "
            "the higher (the best lr of a sweep lay there on the data measured; docs/training.md)."
        )
    return lr


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="lr_find")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(find_lr, cfg)

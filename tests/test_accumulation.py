"""Gradient accumulation (`trainer.accumulate_grad_batches`, issue 24): every count of steps is of optimizer steps
(the per-step schedule's total, `data.min_steps_per_epoch`), and a mid-epoch checkpoint never falls between the
batches of a step. Its exact resume: tests/test_resume.py."""

from __future__ import annotations

import logging
import shlex
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from finetune.builders import build, build_fit_trainer
from finetune.validation import config_problems
from tests.helpers import SMALL_MODEL, TINY, compose_train, doc_commands


class Batches(Callback):
    """The number of training batches of each epoch."""

    def __init__(self) -> None:
        self.per_epoch: list[int] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.per_epoch.append(0)

    def on_train_batch_end(self, *args: Any) -> None:
        self.per_epoch[-1] += 1


def test_accumulation_as_the_docs_type_it_counts_optimizer_steps(tmp_path, image_folder, one_thread, caplog):
    """The documented command with the default recipe (warmup + cosine per step), 2 epochs, a budget of 3 steps an
    epoch: 22 training images in batches of 8 are passed over again until each epoch has 3 steps of 4 batches, and
    the schedule's cosine ends exactly at the last of the 6 steps."""
    (line,) = doc_commands("docs/training.md", "## Gradient accumulation")
    words = shlex.split(line)
    assert words[:2] == ["python", "train.py"] and "trainer.accumulate_grad_batches=4" in words
    args = [f"data.root={image_folder}" if word.startswith("data.root=") else word for word in words[2:]]
    tiny = ["debug=tiny", *SMALL_MODEL, "trainer.max_epochs=2", "data.min_steps_per_epoch=3"]
    cfg = compose_train(tmp_path, [*args, *tiny])
    assert (cfg.data.batch_size, cfg.scheduler.interval) == (8, "step")
    datamodule, model = build(cfg)
    batches = Batches()
    trainer = build_fit_trainer(cfg, batches)
    with caplog.at_level(logging.INFO, logger="finetune.data.datamodule"):
        trainer.fit(model, datamodule=datamodule)
    assert len(datamodule.datasets["train"]) == 22
    assert "each epoch draws 96 (data.min_steps_per_epoch=3 steps of 4 batches of 8 images)" in caplog.text
    assert batches.per_epoch == [12, 12] and trainer.global_step == 6
    (scheduler,) = trainer.lr_scheduler_configs
    assert scheduler.scheduler.lr_lambdas[0].keywords["total_steps"] == 6
    assert all(group["lr"] == 0.0 for group in trainer.optimizers[0].param_groups)  # the end of the cosine


class Throttle(Callback):
    """Slows down the first batch of every step of 2 batches, so that a time-based checkpoint falls due there."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if batch_idx % 2 == 0:
            time.sleep(0.3)


class SavedAt(Callback):
    """The number of batches of the epoch at each checkpoint saved."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.batches.append(trainer.fit_loop.epoch_loop.batch_progress.current.ready)


def test_a_mid_epoch_checkpoint_due_between_the_batches_of_a_step_waits_for_its_end(tmp_path, image_folder, one_thread):
    """The mid-epoch checkpoint every 0.2 s, due after the first batch of each step (0.3 s): it is written after the
    second, where the step ends (Lightning's ModelCheckpoint would write it between them). 22 images in batches of 2:
    11 batches, steps ending after batches 2, 4, ..., 10 and 11."""
    run = [
        "data=imagefolder",
        f"data.root={image_folder}",
        *TINY,
        *SMALL_MODEL,
        "data.batch_size=2",
        "trainer.accumulate_grad_batches=2",
        "callbacks.mid_epoch_checkpoint.train_time_interval.minutes=0",
        "+callbacks.mid_epoch_checkpoint.train_time_interval.seconds=0.2",
        "trainer.log_every_n_steps=1",  # the clock asked at every step (StepCheckpoint)
    ]
    cfg = compose_train(tmp_path, run)
    datamodule, model = build(cfg)
    saved = SavedAt()
    trainer = build_fit_trainer(cfg, Throttle(), saved)
    trainer.fit(model, datamodule=datamodule)
    assert trainer.num_training_batches == 11 and trainer.global_step == 6
    mid_epoch = [batches for batches in saved.batches if batches < 11]
    assert len(mid_epoch) >= 3 and all(batches % 2 == 0 for batches in mid_epoch), saved.batches


def test_accumulate_grad_batches_is_a_whole_number_of_batches(tmp_path):
    (problem,) = config_problems(compose_train(tmp_path, ["trainer.accumulate_grad_batches=0"]))
    assert problem == "trainer.accumulate_grad_batches=0 must be an integer >= 1"

"""train.py's training steps queue work for the device without waiting for it, except where Lightning logs (issue 23).

The calls that would make the host wait for a GPU are counted on the CPU by `benchmarks.host_reads` (a
TorchFunctionMode sees every call on a tensor); what reads the device on purpose reads it rarely: the finite-loss
flag, the progress bar, the mid-epoch checkpoint's clock (a collective under DDP).
"""

from __future__ import annotations

import re
from datetime import timedelta
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from benchmarks import host_reads
from benchmarks.host_reads import DATA_PATHS
from finetune.callbacks import ProgressBar
from finetune.checkpoint import StepCheckpoint
from finetune.train import train
from tests.helpers import SMALL_MODEL, compose_train, make_image_folder

STEPS_PER_EPOCH, LOG_EVERY = 10, 5


@pytest.mark.parametrize("data", list(DATA_PATHS))
def test_training_steps_wait_for_the_device_only_where_lightning_logs(tmp_path, data):
    """The defaults (progress bar, finite-loss check, metrics, per-step schedule) and the paths that finish batches
    on the device read no device tensor in a training step, but in those where Lightning writes the step's metrics
    to the loggers (every `trainer.log_every_n_steps`; the finite-loss check reads its flag there too)."""
    root = make_image_folder(tmp_path / "images", train=25, test=2)  # 45 training images: 12 batches of 4, 10 run
    extra = [*DATA_PATHS[data], f"trainer.log_every_n_steps={LOG_EVERY}"]
    steps, reads = host_reads.count(compose_train(tmp_path, host_reads.overrides(root, STEPS_PER_EPOCH, extra)))
    assert steps == 2 * STEPS_PER_EPOCH
    logging_steps = set(range(LOG_EVERY - 1, steps, LOG_EVERY))
    assert set(reads) == logging_steps, {step: reads[step] for step in set(reads) - logging_steps}
    ours = [where for step in reads.values() for where in step if " at finetune/" in where]
    assert len(ours) == len(logging_steps), ours  # the finite-loss flag, once each; the rest are Lightning's logging


class NanLoss(L.Callback):
    """Makes the third training batch's images NaN (its loss then is NaN), and records the steps that ran."""

    ran: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        NanLoss.ran.append(trainer.global_step)
        if trainer.global_step == 2:
            batch[0].fill_(float("nan"))


def test_a_nan_loss_stops_the_run_where_the_flag_is_read_next(tmp_path):
    """With no checkpoint in between, the run stops at the first step that reads the flag after the NaN (every
    `trainer.log_every_n_steps` batches), naming the step whose loss was NaN, not at the end of training."""
    root = make_image_folder(tmp_path / "images", train=2 * STEPS_PER_EPOCH, test=2)
    overrides = [
        "data=imagefolder",
        f"data.root={root}",
        *SMALL_MODEL,
        "data.image_size=32",
        "data.batch_size=4",
        "data.num_workers=0",
        "trainer.log_every_n_steps=4",
        "+callbacks.nan._target_=tests.test_host_syncs.NanLoss",
    ]
    NanLoss.ran = []
    with pytest.raises(FloatingPointError, match=r"training loss is not finite \(nan on this process\)") as err:
        train(compose_train(tmp_path, overrides))
    assert re.search(r"at epoch 0, step 3: training diverged", str(err.value))  # the step that made the NaN
    assert NanLoss.ran == [0, 1, 2, 3]  # the fourth batch read the flag


def test_the_progress_bar_reads_the_training_metrics_at_most_every_every_s():
    bar = ProgressBar(every_s=3600)
    trainer = SimpleNamespace(
        loggers=[],
        progress_bar_metrics={"val/acc": 0.5},
        callback_metrics={"train/loss": torch.tensor(2.0), "train/loss_step": torch.tensor(2.0)},
    )
    assert bar.get_metrics(trainer, None) == {"val/acc": 0.5, "train/loss_step": 2.0}
    trainer.callback_metrics = {"train/loss_step": torch.tensor(1.0), "train/loss_epoch": torch.tensor(1.5)}
    assert bar.get_metrics(trainer, None)["train/loss_step"] == 2.0  # not read again within the hour
    bar.on_train_epoch_end(SimpleNamespace(**vars(trainer), is_global_zero=True), None)  # the epoch's values
    shown = bar.get_metrics(trainer, None)
    assert shown["train/loss_step"] == 1.0 and shown["train/loss_epoch"] == 1.5
    assert all(type(value) is float for value in shown.values())


def test_the_progress_bar_leaves_out_lightnings_v_num():
    """Lightning shows the last 4 characters of the run's name ("hs=1" of `trainer.max_epochs=1`), which say nothing."""
    trainer = SimpleNamespace(loggers=[SimpleNamespace(version="trainer.max_epochs=1")], callback_metrics={})
    trainer.progress_bar_metrics = {"val/acc": 0.5}
    assert ProgressBar().get_metrics(trainer, None) == {"val/acc": 0.5}


@pytest.mark.parametrize(("interval", "asked"), [(timedelta(minutes=30), [5, 10, 15]), (None, list(range(1, 16)))])
def test_the_mid_epoch_checkpoint_asks_the_clock_every_log_every_n_steps(monkeypatch, interval, asked):
    """Lightning's ModelCheckpoint asks its clock after every batch, under DDP with a broadcast from rank 0 (every rank
    waits for its GPU): with a time interval StepCheckpoint asks it where Lightning logs. A step count
    (`every_n_train_steps`) is Lightning's to check at every step: it needs no collective."""
    calls = []
    monkeypatch.setattr(
        ModelCheckpoint, "on_train_batch_end", lambda self, trainer, *args: calls.append(trainer.global_step)
    )
    checkpoint = StepCheckpoint(train_time_interval=interval, every_n_train_steps=None if interval else 7)
    for step in range(1, 16):
        trainer = SimpleNamespace(
            global_step=step, accumulate_grad_batches=1, num_training_batches=100, log_every_n_steps=5
        )
        checkpoint.on_train_batch_end(trainer, None, None, None, step - 1)
    assert calls == asked

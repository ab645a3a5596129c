"""A kill during a checkpoint save never tears the checkpoint; a NaN loss stops the run, the good checkpoint stays."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback

from finetune.checkpoint import AtomicCheckpointIO
from finetune.train import PROJECT_ROOT, train
from tests.helpers import TINY, compose_train

# Saves a checkpoint, then dies by SIGKILL half-way through writing the next one to the same path.
KILLED_MID_SAVE = """
import io, os, signal, sys, torch
from finetune.checkpoint import AtomicCheckpointIO

path, save = sys.argv[1], torch.save
AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.ones(256, 256)}, path)

def half_then_kill(obj, file):
    buffer = io.BytesIO()
    save(obj, buffer)
    file.write(buffer.getvalue()[: buffer.tell() // 2])
    file.flush()
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = half_then_kill
AtomicCheckpointIO().save_checkpoint({"step": 2, "w": torch.zeros(256, 256)}, path)
"""


def test_a_kill_mid_save_leaves_the_previous_checkpoint_whole(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    result = subprocess.run(
        [sys.executable, "-c", KILLED_MID_SAVE, str(path)], cwd=PROJECT_ROOT, capture_output=True, text=True
    )
    assert result.returncode == -9, result.stderr
    partial = path.with_name(".last.ckpt.partial")
    assert 0 < partial.stat().st_size < path.stat().st_size  # the kill really came mid-write
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["step"] == 1 and torch.equal(checkpoint["w"], torch.ones(256, 256))

    AtomicCheckpointIO().save_checkpoint({"step": 3}, path)  # the next save replaces the leftover
    assert torch.load(path, weights_only=True) == {"step": 3} and not partial.exists()


@pytest.mark.parametrize("trainer", ["default", "ddp_cpu"])
def test_every_trainer_saves_atomically(tmp_path, trainer):
    cfg = compose_train(tmp_path, [f"trainer={trainer}"])
    assert isinstance(instantiate(cfg.trainer).strategy.checkpoint_io, AtomicCheckpointIO)


class NanBatch(Callback):
    """Turns the images of the third training batch into NaN: the loss of that step is NaN."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 2:
            batch[0].fill_(float("nan"))


@pytest.mark.parametrize(
    ("cause", "message"),
    [
        ("optimizer.lr=1e4", r"Not saving a checkpoint at epoch 0, step (\d+): \d+ weight tensors are not finite"),
        (
            "+callbacks.nan._target_=tests.test_crash_safety.NanBatch",
            r"training loss is not finite \(nan.* step (\d+):",
        ),
    ],
    ids=["diverging-lr", "nan-batch"],
)
def test_a_nan_stops_the_run_and_the_last_good_checkpoint_stays(tmp_path, image_folder, cause, message):
    overrides = [
        "data=imagefolder",
        f"data.root={image_folder}",
        *TINY,
        "strategy.pretrained=false",
        "trainer.max_epochs=3",
        "callbacks.mid_epoch_checkpoint.train_time_interval=null",
        "callbacks.mid_epoch_checkpoint.every_n_train_steps=1",
        cause,
    ]
    with pytest.raises(FloatingPointError, match=message) as err:
        train(compose_train(tmp_path, overrides))
    assert "training diverged. Lower optimizer.lr" in str(err.value)
    failed_at = int(re.search(message, str(err.value))[1])
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == failed_at - 1  # the step before the one that diverged
    assert all(v.isfinite().all() for v in last["state_dict"].values() if v.is_floating_point())

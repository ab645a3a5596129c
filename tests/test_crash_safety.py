"""A kill or a full disk during a checkpoint save never tears the checkpoint; a NaN loss stops the run, the good
checkpoint stays."""

from __future__ import annotations

import errno
import io
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback

import finetune.checkpoint
from finetune.checkpoint import AtomicCheckpointIO
from finetune.errors import DiskFullError, UserError
from finetune.train import train
from tests.helpers import SMALL_MODEL, TINY, compose_train, run_cli

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
    result = run_cli(["-c", KILLED_MID_SAVE, str(path)], tmp_path)
    assert result.returncode == -9, result.output
    partial = path.with_name(".last.ckpt.partial")
    assert 0 < partial.stat().st_size < path.stat().st_size  # the kill really came mid-write
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["step"] == 1 and torch.equal(checkpoint["w"], torch.ones(256, 256))

    AtomicCheckpointIO().save_checkpoint({"step": 3}, path)  # the next save replaces the leftover
    assert torch.load(path, weights_only=True) == {"step": 3} and not partial.exists()


class FullDisk(io.FileIO):
    """A file on a disk with 1000 bytes left: a write that does not fit fails as on a full disk (inside torch.save,
    which then reports a RuntimeError of its own)."""

    def write(self, data) -> int:
        if self.tell() + memoryview(data).nbytes > 1000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def no_space(*args) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fill_disk_once(monkeypatch, folder: Path) -> dict[str, bytes]:
    """From the moment `folder` holds a last.ckpt, every checkpoint written there finds the disk full.
    Returns {"last.ckpt": its bytes when the disk filled up}."""
    before = {}

    def checkpoint_open(path, mode="r", *args, **kwargs):
        last = folder / "last.ckpt"
        if not last.is_file():
            return open(path, mode, *args, **kwargs)
        before.setdefault("last.ckpt", last.read_bytes())
        return FullDisk(path, mode)

    monkeypatch.setattr(finetune.checkpoint, "open", checkpoint_open, raising=False)
    return before


# where a full disk shows: a write (local disks), or only the sync of the written file (NFS and other network disks)
@pytest.mark.parametrize("fails", ["write", "fsync"])
def test_a_full_disk_stops_the_save_with_the_space_needed_and_keeps_the_previous_checkpoint(
    tmp_path, monkeypatch, fails
):
    path = tmp_path / "checkpoints" / "last.ckpt"
    previous = {"step": 1, "w": torch.ones(1024, 1024)}
    AtomicCheckpointIO().save_checkpoint(previous, path)
    before = path.read_bytes()
    if fails == "write":
        monkeypatch.setattr(finetune.checkpoint, "open", FullDisk, raising=False)
    else:
        monkeypatch.setattr(os, "fsync", no_space)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9 - 300_000, 300_000))
    checkpoint = {"step": 2, "w": torch.zeros(1024, 1024)}
    with pytest.raises(DiskFullError) as error:
        AtomicCheckpointIO().save_checkpoint(checkpoint, path)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    assert f"{len(buffer.getvalue()) / 1e6:.1f} MB" == "4.2 MB"  # what the message must name
    assert str(error.value) == (
        f"No space left on device: cannot save the checkpoint last.ckpt in {path.parent}: it needs about 4.2 MB "
        "and 0.3 MB are free there. The checkpoints already there are whole: make room (or write the runs to "
        "another disk with paths.log_dir=...), then resume with ckpt_path=last or ckpt_path=<the run folder>."
    )
    assert isinstance(error.value, UserError) and isinstance(error.value, OSError)
    assert path.read_bytes() == before  # byte for byte
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 1 and torch.equal(loaded["w"], previous["w"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no .partial left


def test_a_run_whose_disk_fills_up_stops_naming_the_folder_and_its_last_checkpoint_stays(
    tmp_path, image_folder, monkeypatch
):
    before = fill_disk_once(monkeypatch, tmp_path / "run" / "checkpoints")
    overrides = ["data=imagefolder", f"data.root={image_folder}", *TINY, *SMALL_MODEL]
    cfg = compose_train(tmp_path, [*overrides, "trainer.max_epochs=3"])
    with pytest.raises(
        DiskFullError, match=r"cannot save the checkpoint (last|epoch_001)\.ckpt in (\S+): it needs"
    ) as error:
        train(cfg)
    folder = tmp_path / "run" / "checkpoints"
    assert f" in {folder}: it needs about " in str(error.value)
    last = folder / "last.ckpt"
    assert last.read_bytes() == before["last.ckpt"]
    assert torch.load(last, weights_only=True)["epoch"] == 0  # the checkpoint of the first epoch, whole
    assert sorted(p.name for p in folder.iterdir()) == ["epoch_000.ckpt", "last.ckpt"]  # no .partial left


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
        "strategy.pretrained=false",  # ResNet-18: lr 1e6 overflows it (the small backbone stays finite)
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

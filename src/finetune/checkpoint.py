"""Checkpoint files: written so that a kill never tears them, and found again to resume a run."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import Callback

from finetune.errors import DataError, DiskFullError, MissingFileError
from finetune.models.backbones import load_checkpoint_file

LAST = "last.ckpt"
RUN_SETTINGS = "run_settings"  # the checkpoint key of the run's resolved settings (plain containers)


class RunSettings(Callback):
    """Stores the run's resolved settings (data, model, strategy, optimizer, ...) in every checkpoint, so
    `eval.py` rebuilds the run's data from the checkpoint alone, whatever `conf/` says today."""

    def __init__(self, settings: dict[str, Any]):
        self.settings = settings

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[RUN_SETTINGS] = self.settings


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves to a hidden `.<name>.partial` beside the target, syncs it to disk and renames it over the
    target, so a kill or power loss at any moment leaves the old checkpoint or the new one whole.

    Lightning's own save stages the file in $TMPDIR and moves it; when $TMPDIR is another filesystem
    (node-local /tmp, checkpoints on shared storage) the move is a copy onto the target, and a kill
    mid-copy leaves the only last.ckpt truncated. Remote URLs (s3://...) keep Lightning's save.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")  # a leftover of a killed save is overwritten next time
        try:  # a full disk: measured once the partial file is gone
            try:
                with open(partial, "wb") as file:
                    torch.save(checkpoint, file)
                    file.flush()
                    os.fsync(file.fileno())
                os.replace(partial, path)
            finally:
                partial.unlink(missing_ok=True)
        except Exception as err:
            if (full := _no_space(err)) is None:
                raise
            raise _disk_full(full, checkpoint, path) from err
        folder = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def _no_space(err: BaseException | None) -> OSError | None:
    """The full-disk error behind `err`: torch.save reports a failed write as a RuntimeError of its own."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return err
        err = err.__cause__ or err.__context__
    return None


class _ByteCounter:
    """A file that only counts what is written to it."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: bytes) -> int:
        self.size += memoryview(data).nbytes
        return memoryview(data).nbytes

    def flush(self) -> None:
        pass


def _disk_full(err: OSError, checkpoint: dict[str, Any], path: Path) -> DiskFullError:
    """The error a user can act on: where, how much is needed (the checkpoint serialized again, counted) and free."""
    needed = _ByteCounter()
    torch.save(checkpoint, needed)
    free = shutil.disk_usage(path.parent).free
    return DiskFullError(
        f"{os.strerror(err.errno)}: cannot save the checkpoint {path.name} in {path.parent}: it needs about "
        f"{needed.size / 1e6:.1f} MB and {free / 1e6:.1f} MB are free there. The checkpoints already there are whole: "
        "make room (or write the runs to another disk with paths.log_dir=...), then resume with ckpt_path=last or "
        "ckpt_path=<the run folder>."
    )


def check_resumable(ckpt_path: str, classes: Sequence[str]) -> None:
    """Before any work: the checkpoint to resume from reads whole (`load_checkpoint_file` says which whole one is
    beside a damaged one) and its head is for the data's classes (else torch's `size mismatch for head.bias`, or
    a head that silently maps one class's outputs onto another's). Remote URLs are Lightning's to read."""
    if not _is_local_file_protocol(ckpt_path):
        return
    checkpoint = load_checkpoint_file(ckpt_path, key="ckpt_path")
    saved = (checkpoint.get("hyper_parameters") or {}).get("classes") if isinstance(checkpoint, dict) else None
    if saved is not None and list(saved) != list(classes):
        raise DataError(
            f"ckpt_path={ckpt_path} holds a head for the {len(saved)} classes {list(saved)}, but the data "
            f"(data.root) has the {len(classes)} classes {list(classes)}: resume on the data the run was trained on, "
            "or train a new run on this data (without ckpt_path)"
        )


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str | os.PathLike, task_dir: str | os.PathLike) -> str | None:
    """The checkpoint `ckpt_path` means, None for a fresh start.

    `auto`: this run's own checkpoints/last.ckpt or, if newer, the checkpoint Lightning saved in its folder when
    SLURM signalled a requeue (`hpc_ckpt_<n>.ckpt`; a requeued job keeps its folder, see docs/scaling-out.md), else a fresh
    start. `last`: the run's own last.ckpt, or else the newest last.ckpt under the task's folder (resume a killed
    run). A run folder: its checkpoints/last.ckpt. Anything else goes to Lightning as given.
    """
    if ckpt_path is None:
        return None
    own = Path(output_dir) / "checkpoints" / LAST
    if ckpt_path == "auto":
        found = [path for path in (own, *Path(output_dir).glob("hpc_ckpt_*.ckpt")) if path.is_file()]
        newest = max(found, key=lambda p: (p.stat().st_mtime, str(p)), default=None)
        return None if newest is None else str(newest)
    if ckpt_path == "last":
        found = [own] if own.is_file() else Path(task_dir).glob(f"**/checkpoints/{LAST}")
        newest = max(found, key=lambda p: (p.stat().st_mtime, str(p)), default=None)
        if newest is None:
            raise MissingFileError(f"ckpt_path=last: no checkpoints/{LAST} under {task_dir} to resume from")
        return str(newest)
    run = Path(ckpt_path).expanduser()
    if not run.is_dir():
        return ckpt_path
    if not (run / "checkpoints" / LAST).is_file():
        raise MissingFileError(f"ckpt_path={ckpt_path}: the run folder has no checkpoints/{LAST}")
    return str(run / "checkpoints" / LAST)

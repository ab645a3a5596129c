"""Checkpoint files: written so that a kill never tears them, and found again to resume a run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import Callback

from finetune.errors import MissingFileError

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
        try:
            with open(partial, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        folder = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str | os.PathLike, task_dir: str | os.PathLike) -> str | None:
    """The checkpoint `ckpt_path` means, None for a fresh start.

    `auto`: this run's own checkpoints/last.ckpt if there is one (a requeued SLURM job keeps its folder), else
    a fresh start. `last`: the same, or else the newest last.ckpt under the task's folder (resume a killed
    run). A run folder: its checkpoints/last.ckpt. Anything else goes to Lightning as given.
    """
    if ckpt_path is None:
        return None
    own = Path(output_dir) / "checkpoints" / LAST
    if ckpt_path == "auto":
        return str(own) if own.is_file() else None
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

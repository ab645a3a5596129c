"""Checkpoint files: written so that a kill never tears them, and found again to resume a run."""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.compat.proto.event_pb2 import Event, SessionLog

from finetune.errors import DataError, DiskFullError, MissingFileError
from finetune.finetuning import StageUnfreezing
from finetune.models.backbones import load_checkpoint_file

log = logging.getLogger(__name__)

LAST = "last.ckpt"
PROBE = "probe.ckpt"
RUN_SETTINGS = "run_settings"  # the checkpoint key of the run's resolved settings (plain containers)
# What a checkpoint that is not resumed holds: the weights and the settings that rebuild its model and data
STANDALONE_KEYS = (
    "epoch",
    "global_step",
    "pytorch-lightning_version",
    "state_dict",
    "hparams_name",
    "hyper_parameters",
)


def standalone(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint without its training state (optimizer, schedulers, loops, callbacks' states, an EMA's raw
    weights): what eval.py, predict.py and export.py read, a third of a resumable one's size with AdamW."""
    return {key: value for key, value in checkpoint.items() if key in (*STANDALONE_KEYS, RUN_SETTINGS)}


class RunSettings(Callback):
    """Stores the run's resolved settings (data, model, strategy, optimizer, ...) in every checkpoint, so
    `eval.py` rebuilds the run's data from the checkpoint alone, whatever `conf/` says today."""

    def __init__(self, settings: dict[str, Any]):
        self.settings = settings

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[RUN_SETTINGS] = self.settings


class ProbeCheckpoint(Callback):
    """Saves the linear probe: the weights at the end of a head-only phase that an unfreeze ends (the first epoch of
    `strategy=freeze_unfreeze`, the default, and of `gradual`), as `<dirpath>/probe.ckpt`: the backbone as it started
    (pretrained) and a trained head, the start of WiSE-FT (`wise_ft.py`). Stand-alone (`standalone`: weights and
    settings, the size of the model), so eval.py and the others take it; a strategy that trains the backbone from
    the start, or never, writes none (a `strategy=freeze` run's last.ckpt is its probe), nor does a run that ends
    before the unfreeze (fast_dev_run, which writes nothing, included).

    Saved when that epoch ends, so a resume within it still saves the probe, and one after it keeps the saved one:
    a run resumed into a new folder links the probe beside the checkpoint it resumed from into its own.
    """

    def __init__(self, dirpath: str | os.PathLike):
        self.local = _is_local_file_protocol(str(dirpath))
        self.path = Path(dirpath) / PROBE

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        saved = _saved(PROBE, _resumed_from(trainer), self.path.parent)
        if trainer.is_global_zero and self.local and saved.is_file() and saved.resolve() != self.path.resolve():
            _link_or_copy(saved, self.path)

    @staticmethod
    def ends_head_only_phase(unfreezing: StageUnfreezing, epoch: int, num_stages: int) -> bool:
        """Whether epoch `epoch` trains the head alone and the next one unfreezes stages."""
        return unfreezing.trainable_at(epoch, num_stages) == 0 < unfreezing.trainable_at(epoch + 1, num_stages)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        unfreezing = next((c for c in trainer.callbacks if isinstance(c, StageUnfreezing)), None)
        num_stages = pl_module.backbone.num_stages
        if unfreezing is None or not self.ends_head_only_phase(unfreezing, trainer.current_epoch, num_stages):
            return
        if trainer.max_epochs is not None and 0 <= trainer.max_epochs <= trainer.current_epoch + 1:
            return  # the run ends here (fast_dev_run: its one epoch), with no unfreeze
        # what ModelCheckpoint's file holds (every callback's on_save_checkpoint: the run's settings, an EMA's
        # averaged weights), less the training state
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        trainer.strategy.save_checkpoint(standalone(checkpoint), self.path)  # rank 0 writes
        trainer.strategy.barrier("ProbeCheckpoint")


class StepCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint that saves during an epoch only after an optimizer step. With gradient
    accumulation (`trainer.accumulate_grad_batches`) a save between the batches of a step would leave out the
    gradients summed so far, and the resumed run would step on the remaining batches alone: a save that falls due
    in between (`train_time_interval`) waits for the step's last batch.

    With a `train_time_interval`, the clock is asked every `trainer.log_every_n_steps` optimizer steps, not after
    each: under DDP Lightning's ModelCheckpoint broadcasts rank 0's answer, a collective that makes every rank wait
    for its GPU at every step."""

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        batches = batch_idx + 1  # this epoch's, as Lightning counts them to decide when to step
        step_ends = batches % trainer.accumulate_grad_batches == 0 or batches == trainer.num_training_batches
        clock_asked = self._train_time_interval is None or trainer.global_step % max(trainer.log_every_n_steps, 1) == 0
        if step_ends and clock_asked:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class CarryOver(Callback):
    """A resumed run writes a new run folder; this carries into it what the interrupted run's folder held, so that
    it ends as the uninterrupted run's would, and leaves the interrupted run's folder as it was. A run resumed in
    its own folder (SLURM's requeue) and remote folders are Lightning's.

    - The checkpoints' ranking. Lightning's ModelCheckpoint keeps only the path of the best epoch's file, in the old
      folder, and warns that its dirpath changed: without the scores it saves the first epoch after the resume as
      the best, whatever the epochs before it scored. Each ModelCheckpoint's saved state is rewritten into the new
      folder before it is loaded, and the ranked files (`epoch_<n>.ckpt`) are linked there (`_link_or_copy`). If a
      ranked file is gone, that ranking is Lightning's as before (its warning, and a line that names the file).
    - The TensorBoard curves. The interrupted run's event files are linked into the new TensorBoard folder, and
      TensorBoard's restart marker (a SessionLog START, as SummaryWriter's `purge_step` writes) is written at the
      checkpoint's global step, the first step the resumed run logs (Lightning logs optimizer step k's metrics at
      step k - 1): TensorBoard (its default loader; `--load_fast=false` ignores the marker) and the sweep report
      drop what the interrupted run logged after its checkpoint.

    Rank 0 writes; every DDP rank loads the same ranking, the one rank 0 decided on (they must agree on what to save).
    """

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        beside = _resumed_from(trainer)
        self._carry_ranking(trainer, checkpoint.get("callbacks") or {}, beside)
        if trainer.is_global_zero and beside is not None:
            self._carry_curves(trainer, checkpoint["global_step"], beside.parent)

    @staticmethod
    def _carry_ranking(trainer: L.Trainer, states: dict[str, Any], beside: Path | None) -> None:
        for callback in (c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)):
            state = states.get(callback.state_key)
            old, new = (state or {}).get("dirpath"), callback.dirpath
            if not (old and new and old != new and _is_local_file_protocol(old) and _is_local_file_protocol(new)):
                continue
            moved = _moved(state, Path(new))
            ranked = [Path(path) for path in moved["best_k_models"] if Path(path).parent == Path(new)]
            sources = {target: _saved(target.name, beside, Path(old)) for target in ranked}
            missing = [str(source) for source in sources.values() if not source.is_file()]
            if trainer.strategy.broadcast(not missing, src=0):
                states[callback.state_key] = moved
                for target, source in sources.items() if trainer.is_global_zero else ():
                    _link_or_copy(source, target)
            elif trainer.is_global_zero:
                log.warning("The best checkpoints %s are gone: the resumed run ranks its epochs anew", missing)

    @staticmethod
    def _carry_curves(trainer: L.Trainer, step: int, interrupted: Path) -> None:
        for logger in (lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)):
            folder = Path(logger.log_dir).resolve()
            if not _is_local_file_protocol(logger.log_dir) or interrupted in folder.parents:
                continue
            events = sorted(interrupted.glob(f"{logger.name}/*/events.out.tfevents.*"))
            for event_file in events:
                _link_or_copy(event_file, folder / event_file.name)
            if events:
                restart = Event(step=step, session_log=SessionLog(status=SessionLog.START))
                logger.experiment._get_file_writer().add_event(restart)


def _resumed_from(trainer: L.Trainer) -> Path | None:
    """The folder of the checkpoint the run resumed from (`<run>/checkpoints`), None if it is not a local file."""
    resumed = trainer.ckpt_path
    if not resumed or not _is_local_file_protocol(str(resumed)):
        return None
    return Path(resumed).expanduser().resolve().parent


def _moved(state: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A ModelCheckpoint's state with the paths of its own folder in `folder`."""
    old = Path(state["dirpath"])

    def moved(path: str | None) -> str | None:
        return str(folder / Path(path).name) if path and Path(path).parent == old else path

    paths = {
        key: moved(state[key]) for key in ("best_model_path", "kth_best_model_path", "last_model_path") if key in state
    }
    ranked = {moved(path): score for path, score in (state.get("best_k_models") or {}).items()}
    return {**state, **paths, "dirpath": str(folder), "best_k_models": ranked}


def _saved(name: str, beside: Path | None, folder: Path) -> Path:
    """Where a checkpoint file saved into `folder` is now: `beside` the checkpoint resumed from (a run folder moved
    or copied since, from another machine too), else in `folder`."""
    return beside / name if beside is not None and (beside / name).is_file() else folder / name


def _link_or_copy(source: Path, target: Path) -> None:
    """`source` also as `target`: a hard link (no space; a later save replaces the link, `AtomicCheckpointIO`, and
    leaves `source` as it is), else (another file system) a copy renamed into place when whole; nothing if `target`
    exists."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except FileExistsError:
        pass
    except OSError:
        partial = target.with_name(f".{target.name}.partial")
        try:
            shutil.copy2(source, partial)
            os.replace(partial, target)
        except OSError as err:  # a full disk: the run goes on, ranking what it saves next
            log.warning("%s is not carried into the resumed run's folder (%s)", source, err)
        finally:
            partial.unlink(missing_ok=True)


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
    return str(checkpoint_file(ckpt_path)) if Path(ckpt_path).expanduser().is_dir() else ckpt_path


def checkpoint_file(ckpt_path: str | os.PathLike) -> Path:
    """The checkpoint file `ckpt_path` names: a file, or a run folder (the one train.py prints at its end), whose
    checkpoints/last.ckpt it means."""
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        if not (path / "checkpoints" / LAST).is_file():
            raise MissingFileError(f"ckpt_path={ckpt_path}: the run folder has no checkpoints/{LAST}")
        return path / "checkpoints" / LAST
    if not path.is_file():
        raise MissingFileError(f"ckpt_path: no such file or run folder: {path}")
    return path

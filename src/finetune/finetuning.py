"""The strategy callback: which backbone stages train in which epoch.

Unlike Lightning's `BackboneFinetuning`, nothing is added to the optimizer and no
`requires_grad` flips: all groups exist from step one with their final lr multipliers, and a
frozen stage simply runs under `no_grad` with BatchNorm in eval mode (see `Backbone`). That keeps
schedulers, DDP and resume correct. The phase is saved in the checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)

Count = int | str  # a number of stages, or "all"


@dataclass(frozen=True)
class ParameterCounts:
    """What a run trains, as a researcher reports it: the parameters that train at some epoch of the run, and all
    the parameters of the model (backbone with any adapters, head, the loss terms' own)."""

    trainable: int
    total: int

    def record(self) -> dict[str, int | float]:
        """As the run's status.json and HPARAMS hold them; `trainable_share` as a fraction of `total_params`."""
        return {
            "trainable_params": self.trainable,
            "total_params": self.total,
            "trainable_share": self.trainable / self.total,
        }

    def __str__(self) -> str:
        return f"{self.trainable:,} of {self.total:,} ({100 * self.trainable / self.total:.2f} %)"


class StageUnfreezing(Callback):
    """`trainable` top stages train from epoch 0; at each epoch in `unfreeze_at`, `unfreeze_step` more do.

    The strategy config's keys of the same names (conf/strategy/_base.yaml). scratch/finetune: trainable=all.
    freeze: trainable=0. freeze_unfreeze: trainable=0, unfreeze_at=[E], unfreeze_step=all. gradual:
    trainable=0, unfreeze_at=[e1, e2, ...], unfreeze_step=1 (ULMFiT, from the top).
    """

    def __init__(self, trainable: Count = "all", unfreeze_at: Sequence[int] = (), unfreeze_step: Count = "all"):
        self.trainable, self.unfreeze_at, self.unfreeze_step = trainable, sorted(unfreeze_at), unfreeze_step
        self.trainable_stages: int | None = None
        self._log_pending = True  # trainable_stages, at the next training batch

    @staticmethod
    def _count(value: Count, num_stages: int) -> int:
        return num_stages if value == "all" else int(value)

    def trainable_at(self, epoch: int, num_stages: int) -> int:
        steps = sum(epoch >= e for e in self.unfreeze_at)
        start, step = self._count(self.trainable, num_stages), self._count(self.unfreeze_step, num_stages)
        return min(num_stages, start + steps * step)

    def parameter_counts(self, pl_module: L.LightningModule, max_epochs: int) -> ParameterCounts:
        """The parameters that train in a run of `max_epochs` (-1: until the last unfreeze): every one that requires
        grad (a `peft` method keeps the others fixed), but those of the backbone stages still frozen in the last
        epoch."""
        backbone = pl_module.backbone
        last_epoch = max_epochs - 1 if max_epochs > 0 else max(self.unfreeze_at, default=0)
        frozen = backbone.stages[: backbone.num_stages - self.trainable_at(last_epoch, backbone.num_stages)]
        never = {id(parameter) for parameter in frozen.parameters()}
        parameters = list(pl_module.parameters())
        trainable = sum(p.numel() for p in parameters if p.requires_grad and id(p) not in never)
        return ParameterCounts(trainable, sum(p.numel() for p in parameters))

    def _apply(self, pl_module: L.LightningModule, trainable: int) -> None:
        backbone = pl_module.backbone
        if trainable != self.trainable_stages:
            log.info("Training the top %d of %d backbone stages", trainable, backbone.num_stages)
        backbone.frozen_stages = backbone.num_stages - trainable
        self.trainable_stages = trainable

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        restored = self.trainable_stages  # set by load_state_dict when resuming
        num_stages = pl_module.backbone.num_stages
        self._apply(
            pl_module, restored if restored is not None else self.trainable_at(trainer.current_epoch, num_stages)
        )
        self._log_pending = True  # a run resumed mid-epoch has no epoch start

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply(pl_module, self.trainable_at(trainer.current_epoch, pl_module.backbone.num_stages))
        self._log_pending = True

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Logged at an epoch's first batch: a run resumed mid-epoch starts there, without on_train_epoch_start."""
        if self._log_pending:
            self._log_pending = False
            # the same on every rank: sync_dist averages equal numbers (Lightning asks for it under DDP)
            pl_module.log(
                "trainable_stages", float(self.trainable_stages), on_step=False, on_epoch=True, sync_dist=True
            )

    def state_dict(self) -> dict[str, Any]:
        return {"trainable_stages": self.trainable_stages}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.trainable_stages = state_dict["trainable_stages"]

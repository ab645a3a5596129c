"""The strategy callback: which backbone stages train in which epoch.

Unlike Lightning's `BackboneFinetuning`, nothing is added to the optimizer and no
`requires_grad` flips: all groups exist from step one with their final lr multipliers, and a
frozen stage simply runs under `no_grad` with BatchNorm in eval mode (see `Backbone`). That keeps
schedulers, DDP and resume correct. The phase is saved in the checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)

Count = int | str  # a number of stages, or "all"


class StageUnfreezing(Callback):
    """`trainable` top stages train from epoch 0; at each epoch in `unfreeze_at`, `unfreeze_step` more do.

    The strategy config's keys of the same names (conf/strategy/_base.yaml). scratch/finetune: trainable=all.
    freeze: trainable=0. freeze_unfreeze: trainable=0, unfreeze_at=[E], unfreeze_step=all. gradual:
    trainable=0, unfreeze_at=[e1, e2, ...], unfreeze_step=1 (ULMFiT, from the top).
    """

    def __init__(self, trainable: Count = "all", unfreeze_at: Sequence[int] = (), unfreeze_step: Count = "all"):
        self.trainable, self.unfreeze_at, self.unfreeze_step = trainable, sorted(unfreeze_at), unfreeze_step
        self.trainable_stages: int | None = None

    @staticmethod
    def _count(value: Count, num_stages: int) -> int:
        return num_stages if value == "all" else int(value)

    def trainable_at(self, epoch: int, num_stages: int) -> int:
        steps = sum(epoch >= e for e in self.unfreeze_at)
        start, step = self._count(self.trainable, num_stages), self._count(self.unfreeze_step, num_stages)
        return min(num_stages, start + steps * step)

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

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply(pl_module, self.trainable_at(trainer.current_epoch, pl_module.backbone.num_stages))
        pl_module.log("trainable_stages", float(self.trainable_stages), on_step=False, on_epoch=True)

    def state_dict(self) -> dict[str, Any]:
        return {"trainable_stages": self.trainable_stages}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.trainable_stages = state_dict["trainable_stages"]

"""Callbacks the default config adds to every run."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from hydra.utils import get_class
from lightning.pytorch.callbacks import Callback


def optional(callback: str, enabled: bool = False, **kwargs: Any) -> Callback | None:
    """The callback class named `callback` made with `kwargs`, or None (left out of the run) unless `enabled`:
    a config entry that a user switches on with `callbacks.<name>.enabled=true`."""
    return get_class(callback)(**kwargs) if enabled else None


class FiniteLoss(Callback):
    """Stops the run with a clear error as soon as the training loss is NaN or infinite.

    A diverged run would otherwise go on for its remaining epochs and report chance accuracy as if
    it had finished; raising before the next checkpoint keeps the last good one. Every rank takes
    the same decision (DDP), so no rank is left waiting for the others. A step can also turn the
    weights non-finite while its loss was still finite: no checkpoint is written with such weights.
    """

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        value = 0.0 if loss is None else float(loss.detach().float().mean())  # None: the step was skipped
        if trainer.strategy.reduce_boolean_decision(not math.isfinite(value), all=False):
            raise FloatingPointError(
                f"The training loss is not finite ({value} on this process) at epoch {trainer.current_epoch}, "
                f"step {trainer.global_step}: training diverged. Lower optimizer.lr or the lr multipliers."
            )

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        # One norm per tensor first (inf or NaN anywhere makes the norm of the norms non-finite): one cheap
        # reduction per tensor in the usual all-finite case; the per-tensor search only when something is off.
        norms = [torch.linalg.vector_norm(value) for value in state.values() if value.is_floating_point()]
        if not norms or torch.linalg.vector_norm(torch.stack(norms)).isfinite():
            return
        bad = [name for name, value in state.items() if value.is_floating_point() and not value.isfinite().all()]
        if bad:  # weights are the same on every rank, so every rank stops here
            raise FloatingPointError(
                f"Not saving a checkpoint at epoch {trainer.current_epoch}, step {trainer.global_step}: "
                f"{len(bad)} weight tensors are not finite ({', '.join(bad[:3])}): training diverged. "
                "Lower optimizer.lr or the lr multipliers; the checkpoints saved before are intact."
            )

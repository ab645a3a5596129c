"""Callbacks the default config adds to every run."""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import get_class
from lightning.pytorch.callbacks import Callback, RichModelSummary, RichProgressBar
from lightning.pytorch.loggers import TensorBoardLogger

from finetune.analysis import collapse, write_multilabel_report, write_report
from finetune.models.tasks import tune_thresholds

log = logging.getLogger(__name__)


def optional(callback: str, enabled: bool = False, **kwargs: Any) -> Callback | None:
    """The callback class named `callback` made with `kwargs`, or None (left out of the run) unless `enabled`:
    a config entry that a user switches on with `callbacks.<name>.enabled=true`."""
    return get_class(callback)(**kwargs) if enabled else None


class FiniteLoss(Callback):
    """Stops the run with a clear error when the training loss turns NaN or infinite.

    A diverged run would otherwise go on for its remaining epochs and report chance accuracy as if it had finished.
    Reading the loss each step would make the host wait for the GPU at every step (and the GPU wait while the next
    step is launched), so the first non-finite loss and its step stay on the device, and are read every
    `trainer.log_every_n_steps` batches (where Lightning's logging waits for the GPU anyway), at the end of each
    epoch and before every checkpoint: none is written after the loss diverged, so the last good one stays. Every
    rank takes the same decision (DDP), so no rank is left waiting for the others. A step can also turn the weights
    non-finite while its loss was still finite: no checkpoint is written with such weights either.
    """

    def __init__(self) -> None:
        self._first: tuple[torch.Tensor, torch.Tensor] | None = None  # (step, loss) of the first non-finite loss

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:  # None: the step was skipped
            value = loss.detach().float().mean()
            step, first = self._first or (torch.full_like(value, -1), value)
            new = ~value.isfinite() & (step < 0)  # tensor ops only: nothing here waits for the device
            self._first = torch.where(new, float(trainer.global_step), step), torch.where(new, value, first)
        if (batch_idx + 1) % max(trainer.log_every_n_steps, 1) == 0:
            self._stop_if_diverged(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if_diverged(trainer)

    def _stop_if_diverged(self, trainer: L.Trainer) -> None:
        step = -1 if self._first is None else int(self._first[0])
        if trainer.strategy.reduce_boolean_decision(step >= 0, all=False):
            where = f"{float(self._first[1])} on this process" if step >= 0 else "on another process"
            raise FloatingPointError(
                f"The training loss is not finite ({where}) at epoch {trainer.current_epoch}, "
                f"step {step if step >= 0 else trainer.global_step}: training diverged. "
                "Lower optimizer.lr or the lr multipliers."
            )

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._stop_if_diverged(trainer)
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


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar, with the training metrics of the latest step read at most every `every_s` seconds.

    Lightning turns every metric logged with `prog_bar=True` on each step into a Python number after every batch: the
    host would wait for the GPU at every step, and the GPU for the host while it launches the next one. The module
    logs its training metrics for the loggers alone, and this bar reads them (`trainer.callback_metrics`, as
    `train/<name>_step` and, once the epoch ends, `train/<name>_epoch`) twice a second and at the end of each epoch.
    """

    def __init__(self, every_s: float = 0.5, **kwargs: Any):
        super().__init__(**kwargs)
        self.every_s = every_s
        self._read_at = -math.inf
        self._training: dict[str, float] = {}

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        if time.monotonic() - self._read_at >= self.every_s:
            metrics = trainer.callback_metrics.items()
            suffixes = ("_step", "_epoch")
            self._training = {k: float(v) for k, v in metrics if k.startswith("train/") and k.endswith(suffixes)}
            self._read_at = time.monotonic()
        shown = {**super().get_metrics(trainer, pl_module), **self._training}
        shown.pop("v_num", None)  # the last 4 characters of the run's name ("hs=1"), which say nothing
        return shown

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The first read of the epoch's values reduces those logged with sync_dist across the ranks: every rank
        # makes it here, together, not only rank 0 (the bar's) while the others are in another collective.
        trainer.callback_metrics  # noqa: B018
        self._read_at = -math.inf  # the epoch's own values, however soon after the last read
        super().on_train_epoch_end(trainer, pl_module)


class ModelSummary(RichModelSummary):
    """Lightning's summary table, whose "Trainable params" are those that train from the first step: the frozen
    backbone stages keep `requires_grad` (they run under no_grad, `finetune.models.backbones.Backbone`), which
    Lightning alone would count as trainable (`strategy=freeze`: every parameter). Its FLOPs are those of one image
    at the model's input size (Lightning counts them in a forward pass of an `example_input_array`, in eval mode),
    on rank 0 and without `model.compile=true`."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        backbone = pl_module.backbone  # its frozen stages are set: the strategy's callback comes first
        frozen = [p for p in backbone.stages[: backbone.frozen_stages].parameters() if p.requires_grad]
        for parameter in frozen:
            parameter.requires_grad_(False)
        # the FLOPs on the rank that prints the table; not with compiled stages, which would compile again for the
        # one image (47 s more for Lite0 on a CPU)
        if trainer.is_global_zero and not pl_module.options.compile:
            size = pl_module.input_config.image_size  # images: a feature cache attaches after this callback
            pl_module.example_input_array = torch.zeros(1, 3, size, size)
        try:
            super().on_fit_start(trainer, pl_module)
        finally:
            pl_module.example_input_array = None
            for parameter in frozen:
                parameter.requires_grad_(True)

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], *args: Any, **kwargs: Any) -> None:
        sizes = ("In sizes", "Out sizes")  # of the example image: known, and the table then fits 80 columns
        RichModelSummary.summarize([column for column in summary_data if column[0] not in sizes], *args, **kwargs)


class SplitOutputs(Callback):
    """Gathers what a split's steps return (the logits) and its targets, batch by batch: `add` in a batch hook, then
    `take` once at the epoch's end gives them from every rank, in the split's order."""

    def __init__(self) -> None:
        self.logits: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []

    def add(self, outputs: torch.Tensor, batch: Any) -> None:
        self.logits.append(outputs.float())
        self.targets.append(batch[1])

    def take(self, trainer: L.Trainer, pl_module: L.LightningModule, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, targets) of the split's `size` samples; the lists start empty again. Under DDP Lightning's
        DistributedSampler without shuffling gives rank r the samples r, r + W, ..., padded to equal shares."""
        tensors = torch.cat(self.logits), torch.cat(self.targets)
        self.logits, self.targets = [], []
        if trainer.world_size == 1:
            return tensors
        logits, targets = (pl_module.all_gather(t).transpose(0, 1).flatten(0, 1)[:size] for t in tensors)
        return logits, targets


class TuneThresholds(SplitOutputs):
    """Multi-label models: after each validation, the probability threshold per class that maximises its F1 on the
    validation images (`finetune.models.tasks.tune_thresholds`), into the model's `thresholds`; so every checkpoint
    saved after it holds the thresholds of its weights, and the test at the end of train.py, prediction and export
    use them. Single-label models: nothing. The sanity check's few batches tune nothing."""

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.logits, self.targets = [], []

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if pl_module.task.multilabel and not trainer.sanity_checking:
            self.add(outputs, batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.logits:
            return
        logits, targets = self.take(trainer, pl_module, len(trainer.val_dataloaders.dataset))
        probs = pl_module.task.probabilities(logits)
        pl_module.hparams.thresholds = tune_thresholds(probs.cpu(), targets.cpu(), pl_module.task.threshold)


class ErrorAnalysis(SplitOutputs):
    """After `trainer.test` (the end of train.py): `finetune.analysis.write_report` of the test logits into
    `output_dir` (eval.md, confusion matrix, reliability diagram, most confidently wrong images), its macro-F1,
    balanced accuracy and ECE logged beside test/acc (so they reach the HPARAMS tab), its figures to TensorBoard.
    A multi-label model's: `write_multilabel_report` (AP, threshold, precision, recall, F1 per class, precision-recall
    curves), the macro F1 at the tuned thresholds (`test/tuned_f1`) and each class's AP (`test/ap/<class>`).

    The logits are those `test_step` returns, so this costs no second pass over the test split. Predictions that
    collapsed (one class for nearly everything, or chance accuracy) are a warning, `test/collapsed` = 1 and, through
    `finetune.train`, a note in the run's status.json and the sweep report.
    """

    def __init__(self, output_dir: str | os.PathLike):
        super().__init__()
        self.output_dir = Path(output_dir)
        self.collapse: str | None = None  # `finetune.analysis.collapse` of the last test

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.logits, self.targets = [], []

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.add(outputs, batch)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dataset = trainer.test_dataloaders.dataset
        logits, labels = self.take(trainer, pl_module, len(dataset))
        if not trainer.is_global_zero:
            return
        if pl_module.task.multilabel:  # the scores per class at the tuned thresholds (no confusion, no top-1)
            thresholds = pl_module.meta["thresholds"]
            report = write_multilabel_report(self.output_dir, logits.cpu(), labels.cpu(), pl_module.classes, thresholds)
            scalars = report.scalars
        else:
            # `image` is there unless the split is cached features (finetune.caching): then no grid of images
            image = getattr(dataset, "image", None)
            report = write_report(self.output_dir, logits.cpu(), labels.cpu(), pl_module.classes, image=image)
            self.collapse = collapse(report.metrics)
            if self.collapse:
                log.warning(
                    "%s: the run completed, but its model is no classifier (lower optimizer.lr?)", self.collapse
                )
            scalars = report.scalars | {"collapsed": float(self.collapse is not None)}
        # of every rank's logits, on rank 0: nothing to reduce (with rank_zero_only, sync_dist runs no collective;
        # it tells Lightning the values are whole, which it otherwise asks for under DDP)
        scalars = {f"test/{name}": value for name, value in scalars.items()}
        pl_module.log_dict(scalars, rank_zero_only=True, sync_dist=True)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                report.add_figures(logger.experiment, "test", trainer.global_step)

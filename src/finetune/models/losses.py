"""What a training step minimises: the loss of the logits (`loss` in conf/, `CrossEntropy` by default) plus any
extra terms (`loss_terms`: none by default), each logged as `train/loss_<name>`.

Both are objects the config instantiates, so a transfer method that changes the objective is a class here or in
its own file, not a branch in the LightningModule:
- a loss is any `(logits, targets) -> scalar` module (torch's own losses fit);
- a term is built once from the module it trains (`_partial_: true`: called with the `FineTuneModule` once its
  backbone and head exist, e.g. to keep a copy of the source weights) and then called at each training step with
  that module and the step's `StepOutput`; its tensors (`register_buffer`) go into the checkpoint with the model's,
  and its parameters (a head of its own) train in the optimizer's `loss_terms` group. A term that needs a pass
  over the training data first has `prepare`. The regularisers toward the source (`regularizer` in conf/) are
  terms: `finetune.methods`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lightning import LightningDataModule, LightningModule
from torch import nn


@dataclass(frozen=True)
class StepOutput:
    """What a training step computed, for the terms: the backbone's pooled features (N, D), the head's logits
    (N, C) and the targets (class indices (N,), or (N, C) probabilities from MixUp/CutMix)."""

    features: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor


class LossTerm(nn.Module):
    """A term added to the training loss (`loss_terms.<name>` in conf/): a scalar from the module it trains and
    the step's output. A module, so that what it keeps (source weights, a relationship matrix) moves to the
    device and into the checkpoint with the model."""

    def forward(self, model: LightningModule, output: StepOutput) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, model: LightningModule, data: LightningDataModule) -> None:
        """Called once when a fit starts (`FineTuneModule.on_fit_start`), after a resumed run's weights and buffers
        are loaded, with the run's data: for a term that learns something of the training data before the first
        step (Co-Tuning's relationship). It must keep what it learns in buffers and skip when they hold it already,
        so that a resumed run goes on with what the interrupted one learned. Nothing by default."""


class SmoothedWeightedLoss(nn.Module):
    """What both losses keep: a label smoothing and a weight per class (None: all 1), the weights a buffer outside
    the state dict (the settings rebuild it)."""

    def __init__(self, label_smoothing: float = 0.0, class_weights: Sequence[float] | None = None):
        super().__init__()
        self.label_smoothing = label_smoothing
        weights = None if class_weights is None else torch.tensor(list(class_weights), dtype=torch.float32)
        self.register_buffer("class_weights", weights, persistent=False)


class CrossEntropy(SmoothedWeightedLoss):
    """Cross-entropy with label smoothing and a weight per class (`conf/loss/default.yaml`); `targets` are class
    indices or (N, C) probabilities (as MixUp/CutMix make them).

    `class_weights`: one per class in label order, or None (all 1); `loss.class_weights=balanced` is resolved
    from the training split by the builder (`balanced_weights`)."""

    @staticmethod
    def balanced_weights(counts: Sequence[int], images: int) -> list[float]:
        """n_samples / (n_classes * count_c), as scikit-learn's `class_weight="balanced"`: each class weighs the same
        in the loss as a whole."""
        return [images / (len(counts) * count) for count in counts]

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets, weight=self.class_weights, label_smoothing=self.label_smoothing)


class BCEWithLogits(SmoothedWeightedLoss):
    """Binary cross-entropy of a sigmoid per class against multi-hot targets (N, C), any number of classes per
    image (`conf/loss/multilabel.yaml`, `data=multilabel`).

    `label_smoothing` e: each binary target y becomes y (1 - e) + e / 2, as the cross-entropy's smoothing does for
    two classes (so a recipe's `loss.label_smoothing` means the same with `data=multilabel`).
    `class_weights`: a weight on each class's positives (PyTorch's `pos_weight`), or None (all 1);
    `loss.class_weights=balanced`: a class's negatives over its positives in the training split
    (`balanced_weights`), so a rare label's few positives weigh as much as its many negatives."""

    @staticmethod
    def balanced_weights(counts: Sequence[int], images: int) -> list[float]:
        """Each class's negatives over its positives (`counts`: the images that have the class)."""
        return [(images - count) / count for count in counts]

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = targets.to(logits.dtype) * (1 - self.label_smoothing) + self.label_smoothing / 2
        return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=self.class_weights)

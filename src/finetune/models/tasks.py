"""What kind of classification a model does (`task` in conf/): how its logits become probabilities, and its metrics.

- `SingleLabel` (the default): one class per image, a softmax over the classes; accuracy, logged as `<split>/acc`.
- `MultiLabel` (`data=multilabel` chooses it): any number of classes per image, a sigmoid per class; the macro mean
  average precision (`<split>/map`, the headline: it needs no threshold) and the macro F1 at `threshold`
  (`<split>/f1`). After each validation `finetune.callbacks.TuneThresholds` tunes a threshold per class on it
  (`tune_thresholds`); they are stored with the model and used by prediction, export and the error analysis.

A task is a small object the config instantiates, so the LightningModule logs whatever its metrics return and
does not branch on the kind of task; the commands after training read `multilabel` and `probabilities`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy, MultilabelAveragePrecision, MultilabelF1Score

# A training batch often holds no image of a class: its AP is then 0 (as the docstrings say), not a warning per step
warnings.filterwarnings("ignore", message="No positive samples found in target")


class Accuracy(nn.Module):
    """A split's accuracy against the label, or against the argmax of MixUp/CutMix's soft labels (N, C)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, Metric]:
        self.acc(logits, targets.argmax(1) if targets.ndim == 2 else targets)
        return {"acc": self.acc}


class MultiLabelMetrics(nn.Module):
    """A split's macro mAP and macro F1 at `threshold` of multi-hot targets (N, C). torchmetrics counts the AP of a
    class without a positive in the split as 0."""

    def __init__(self, num_classes: int, threshold: float):
        super().__init__()
        self.map = MultilabelAveragePrecision(num_classes, average="macro")
        self.f1 = MultilabelF1Score(num_classes, threshold=threshold, average="macro")

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, Metric]:
        targets = targets.int()
        self.map(logits, targets)
        self.f1(logits, targets)
        return {"map": self.map, "f1": self.f1}


@dataclass(frozen=True)
class SingleLabel:
    """One class per image (`conf/task/single_label.yaml`)."""

    multilabel: ClassVar[bool] = False
    headline: ClassVar[tuple[str, str]] = ("acc", "accuracy")  # the test metric train.py prints, and its name

    def metrics(self, num_classes: int) -> nn.Module:
        """A split's metrics: called with (logits, targets), it updates them and returns them by name."""
        return Accuracy(num_classes)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().softmax(dim=1)

    def meta(self, num_classes: int, thresholds: list[float] | None) -> dict[str, Any]:
        """What a client needs of the task besides the classes (`FineTuneModule.meta`, export's sidecar): nothing."""
        return {}


@dataclass(frozen=True)
class MultiLabel:
    """Any number of classes per image (`conf/task/multilabel.yaml`); `threshold`: F1's before thresholds are tuned,
    and a class's when its validation images hold no positive to tune on."""

    threshold: float = 0.5
    multilabel: ClassVar[bool] = True
    headline: ClassVar[tuple[str, str]] = ("map", "mAP")

    def metrics(self, num_classes: int) -> nn.Module:
        return MultiLabelMetrics(num_classes, self.threshold)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().sigmoid()

    def meta(self, num_classes: int, thresholds: list[float] | None) -> dict[str, Any]:
        """`multilabel: true` and the threshold of each class (the tuned ones, else `threshold` for every class)."""
        return {"multilabel": True, "thresholds": list(thresholds or [self.threshold] * num_classes)}


def tune_thresholds(probs: torch.Tensor, targets: torch.Tensor, default: float) -> list[float]:
    """Per class, the threshold on its probability (an image has the class when `p >= threshold`) that maximises the
    class's F1 on `probs` and multi-hot `targets` (N, C) of held-out images: halfway between the lowest probability
    it takes and the next lower one (the highest threshold among equal F1s); `default` for a class with no positive."""
    thresholds = []
    for p, y in zip(probs.double().T, targets.double().T, strict=True):
        positives = y.sum()
        if positives == 0:
            thresholds.append(default)
            continue
        p, order = p.sort(descending=True)
        true_positives = y[order].cumsum(0)
        predicted = torch.arange(1, len(p) + 1, dtype=p.dtype)
        f1 = 2 * true_positives / (predicted + positives)
        f1[:-1][p[:-1] == p[1:]] = -1  # a cut inside equal probabilities: a threshold cannot make it
        best = int(f1.argmax())
        below = p[best + 1] if best + 1 < len(p) else p[best]
        thresholds.append(float((p[best] + below) / 2))
    return thresholds

"""Co-Tuning (You, Kou, Jiang & Long 2020, "Co-Tuning for Transfer Learning"): the pretrained classifier h_s stays
and trains beside the new head h_t, on the target labels translated into source labels,

    L = CE(h_t(f(x)), y) + lambda * CE(h_s(f(x)), p(y_s | y))

p(y_s | y_t), the relationship of the source and target classes, is learned once before training with the
paper's direct approach: the mean of the source model's softmax h_s(f(x)) over the training images of each target
class (eval transform, as TLlib's `Relationship`). The second CE is against soft labels:
-sum_s p(s | y) log softmax(h_s(f(x)))_s; with MixUp/CutMix's soft targets t (N, C) the labels mix the same way,
t @ relationship. TLlib (`CoTuningLoss`, examples/task_adaptation/image_classification/co_tuning.py): lambda = 2.3,
the source head at the backbone's lr (here the optimizer's `loss_terms` group, at `strategy.backbone_lr_mult`).

The relationship is a buffer that `prepare` fills when the fit starts, unless it holds one already: a resumed run
goes on with the interrupted run's (of the source model, not of the fine-tuned one it resumes); `eval.py` and
`FineTuneModule.from_checkpoint` load it with the source head.
"""

from __future__ import annotations

import torch
from torch import nn

from finetune.data.datamodule import ImageFolderDataModule
from finetune.errors import ConfigError
from finetune.models.head_init import source_classifier
from finetune.models.losses import LossTerm, StepOutput
from finetune.models.module import FineTuneModule


def class_relationship(probabilities: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """p(source class | target class) (C, S): the mean of the source probabilities (N, S) over the samples of each
    target class (labels (N,)); a class without samples gets a row of zeros (it is never a target)."""
    sums = probabilities.new_zeros(num_classes, probabilities.shape[1]).index_add_(0, labels, probabilities)
    counts = torch.bincount(labels, minlength=num_classes).clamp(min=1)
    return sums / counts[:, None]


class CoTuning(LossTerm):
    """`trade_off * CE(h_s(features), p(y_s | y))` with the pretrained classifier as h_s (module docstring).

    A model without pretrained weights (`strategy.pretrained=false`: how `from_checkpoint` rebuilds one) gets a
    source head of `source_classes` rows to load from its checkpoint; with pretrained weights and no classifier to
    copy, a ConfigError."""

    def __init__(self, model: FineTuneModule, trade_off: float = 2.3, source_classes: int = 1000):
        super().__init__()
        self.trade_off = trade_off
        self.source_head = nn.Linear(model.backbone.num_features, source_classes)
        if model.backbone.classifier is not None or model.strategy.pretrained:
            weight, bias = source_classifier(
                model.backbone.classifier,
                model.backbone.num_features,
                "regularizer=co_tuning",
                "regularizer=l2sp or bss",
            )
            if len(weight) != source_classes:
                raise ConfigError(
                    f"regularizer=co_tuning: the pretrained classifier has {len(weight)} classes, not "
                    f"regularizer.source_classes={source_classes}: set regularizer.source_classes={len(weight)}"
                )
            with torch.no_grad():
                self.source_head.weight.copy_(weight)
                self.source_head.bias.copy_(bias)
        self.register_buffer("relationship", torch.zeros(len(model.classes), source_classes))

    def prepare(self, model: FineTuneModule, data: ImageFolderDataModule) -> None:
        """The relationship of the source model on the training images, unless it holds one (a resumed run)."""
        if self.relationship.any():
            return
        probabilities, labels = [], []
        training = model.training
        model.eval()
        with torch.no_grad():
            for images, targets in data.train_eval_dataloader():
                logits = self.source_head(model.backbone(images.to(model.device, model.dtype)))
                probabilities.append(logits.float().softmax(1))
                labels.append(targets.to(model.device))
        model.train(training)
        self.relationship.copy_(class_relationship(torch.cat(probabilities), torch.cat(labels), len(self.relationship)))

    def forward(self, model: FineTuneModule, output: StepOutput) -> torch.Tensor:
        targets = output.targets
        labels = targets @ self.relationship if targets.ndim == 2 else self.relationship[targets]
        log_probabilities = self.source_head(output.features).float().log_softmax(1)
        return self.trade_off * -(labels * log_probabilities).sum(1).mean()

"""L2-SP (Li, Grandvalet & Davoine 2018, "Explicit Inductive Bias for Transfer Learning with Convolutional
Networks"): weight decay toward the starting point instead of toward 0,

    Omega(w) = alpha / 2 * ||w_S - w_S^0||^2 + beta / 2 * ||w_new||^2

w_S: the backbone's weights, w_S^0: its pretrained ones (the source), w_new: the new head's weights. As TLlib's
`SPRegularization` + `L2Regularization` (examples/task_adaptation/image_classification/delta.py: alpha = beta =
0.01, SGD without weight decay).

The source weights are buffers copied when the term is built, right after the backbone loaded its pretrained
weights; they go into every checkpoint. A resumed run, `FineTuneModule.from_checkpoint` and `eval.py` load them from
there: the term built on the rebuilt model copies whatever weights it has, and the checkpoint's source replaces them.

Frozen stages are left out of the sum: they are still at the source (their penalty is 0), and a gradient of 0 would
still let AdamW's decay and momentum move weights that must not move.

Weight decay: `regularizer=l2sp` sets `optimizer.weight_decay=0` (conf/regularizer/l2sp.yaml), as the paper and TLlib
do: decoupled decay (AdamW) pulls every weight toward 0 while L2-SP pulls the backbone toward the source, and beta
takes decay's place on the head. Under Adam(W) the penalty's gradient is rescaled per weight as any gradient is (the
paper used SGD), so the best alpha there may differ from the paper's.
"""

from __future__ import annotations

import torch

from finetune.models.losses import LossTerm, StepOutput
from finetune.models.module import FineTuneModule


def _source_name(parameter: str) -> str:
    """The buffer of a backbone parameter's source weights (`3.0.conv1.weight` -> `source:3:0:conv1:weight`: a
    buffer's name holds no dot)."""
    return "source:" + parameter.replace(".", ":")


class L2SP(LossTerm):
    """`alpha / 2 * ||w_S - w_S^0||^2 + beta / 2 * ||w_new||^2` over the training stages of the backbone and the head
    (module docstring)."""

    def __init__(self, model: FineTuneModule, alpha: float = 0.01, beta: float = 0.01):
        super().__init__()
        self.alpha, self.beta = alpha, beta
        for name, weight in model.backbone.stages.named_parameters():
            self.register_buffer(_source_name(name), weight.detach().clone())

    def forward(self, model: FineTuneModule, output: StepOutput) -> torch.Tensor:
        backbone = model.backbone
        training = (
            backbone.stages[index].named_parameters(prefix=str(index))
            for index in range(backbone.frozen_stages, backbone.num_stages)
        )
        distance = sum(
            (weight - getattr(self, _source_name(name))).pow(2).sum() for stage in training for name, weight in stage
        )
        size = sum(weight.pow(2).sum() for weight in model.head.parameters())
        return self.alpha / 2 * distance + self.beta / 2 * size

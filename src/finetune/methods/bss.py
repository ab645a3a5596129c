"""BSS, Batch Spectral Shrinkage (Chen, Wang, Fu, Long & Wang 2019, "Catastrophic Forgetting Meets Negative
Transfer: Batch Spectral Shrinkage for Safe Transfer Learning"): the directions of a batch's features with the
smallest singular values carry what of the source does not transfer (negative transfer); BSS shrinks them,

    L_bss(F) = eta * sum_{i=1..k} sigma_{-i}(F)^2

F: the batch's pooled backbone features (N, D), sigma_{-i}: its i-th smallest singular value (of min(N, D)). The
paper and TLlib (`BatchSpectralShrinkage`, examples/task_adaptation/image_classification/bss.py): k = 1, eta = 0.001.
"""

from __future__ import annotations

import torch

from finetune.models.losses import LossTerm, StepOutput
from finetune.models.module import FineTuneModule


class BSS(LossTerm):
    """`eta * sum of the k smallest squared singular values` of the step's features (module docstring)."""

    def __init__(self, model: FineTuneModule, eta: float = 0.001, k: int = 1):
        super().__init__()
        self.eta, self.k = eta, k

    def forward(self, model: FineTuneModule, output: StepOutput) -> torch.Tensor:
        singular = torch.linalg.svdvals(output.features.float())  # descending; no SVD kernel in half precision
        return self.eta * singular[-self.k :].pow(2).sum()

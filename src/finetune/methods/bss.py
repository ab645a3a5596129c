"""BSS, Batch Spectral Shrinkage (Chen, Wang, Fu, Long & Wang 2019, "Catastrophic Forgetting Meets Negative
Transfer: Batch Spectral Shrinkage for Safe Transfer Learning"): the directions of a batch's features with the
smallest singular values carry what of the source does not transfer (negative transfer); BSS shrinks them,

    L_bss(F) = eta * sum_{i=1..k} sigma_{-i}(F)^2

F: the batch's pooled backbone features (N, D), sigma_{-i}: its i-th smallest singular value (of min(N, D)). The
paper and TLlib (`BatchSpectralShrinkage`, examples/task_adaptation/image_classification/bss.py): k = 1, eta = 0.001.

Under DDP, F is the global batch: every rank's features gathered with their gradients (a spectrum is not a mean over
samples, so per-rank spectra of N / world rows would penalise something else), and 2 ranks x batch B train what one
process x batch 2B does. Each rank computes the same penalty; the gather's backward sums the ranks' gradients and DDP
averages them, which gives the global batch's gradient.
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
        features = output.features
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            features = model.all_gather(features, sync_grads=True).flatten(0, 1)
        singular = torch.linalg.svdvals(features.float())  # descending; no SVD kernel in half precision
        return self.eta * singular[-self.k :].pow(2).sum()

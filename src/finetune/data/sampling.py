"""Training batches that depend only on (seed, epoch, sample): the same on 1 or N devices, with any
number of workers, and after a resume from the middle of an epoch.

`SeededSampler` shuffles like `DistributedSampler` (one permutation per seed and epoch, rank r takes
every r-th index) and gives each index its own augmentation seed; `Seeded` draws the sample's
random transform under that seed. `ResumableLoader` counts the batches it has yielded: Lightning
stores that count in every checkpoint and, when it resumes mid-epoch, the epoch goes on with the
next batch instead of restarting a new shuffle.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def augmentation_seeds(seed: int, epoch: int, count: int) -> np.ndarray:
    """The augmentation seed of each of `count` samples in an epoch (also what a feature cache's view uses)."""
    return np.random.SeedSequence([seed, epoch]).generate_state(count, np.uint64)


class SeededSampler(DistributedSampler):
    """Yields `(index, augmentation seed)`: this rank's share of the (seed, epoch) permutation.

    Lightning calls `set_epoch` each epoch and keeps this sampler under DDP (it is a DistributedSampler
    already), so 2 ranks with batch B/2 see together what one process sees with batch B.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0  # this rank's samples to leave out at the start of the epoch (a mid-epoch resume)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        seeds = augmentation_seeds(self.seed, self.epoch, len(self.dataset))
        indices = list(super().__iter__())[self.start :]
        return iter([(index, int(seeds[index])) for index in indices])


class Seeded(Dataset):
    """`dataset[index]` drawn under its own seed, so its augmentation does not depend on which worker,
    rank or process loads it; the caller's random state is left as it was."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int] | int) -> Any:
        if not isinstance(item, tuple):  # a plain sampler (Lightning's overfit_batches): the global random state
            return self.dataset[item]
        index, seed = item
        generator = torch.default_generator  # what torchvision's transforms draw from (fork_rng costs 30x more)
        state = generator.get_state()
        generator.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            generator.set_state(state)


class ResumableLoader(DataLoader):
    """A DataLoader over a `SeededSampler` that Lightning checkpoints: `state_dict` says how many batches of
    which epoch were yielded, and after `load_state_dict` that epoch resumes with the next batch."""

    _resume: dict[str, int] | None = None
    batches = 0

    def __iter__(self) -> Iterator[Any]:
        # A generator: nothing runs until the first batch is asked for, after Lightning's set_epoch.
        resume, self._resume = self._resume, None
        same_epoch = resume is not None and resume["epoch"] == self._epoch
        self.batches = resume["batches"] if same_epoch else 0
        if isinstance(self.sampler, SeededSampler):  # Lightning's overfit_batches swaps in a plain sampler
            self.sampler.start = self.batches * self.batch_size
        for batch in super().__iter__():
            self.batches += 1
            yield batch

    @property
    def _epoch(self) -> int:
        return getattr(self.sampler, "epoch", 0)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self.batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = dict(state)

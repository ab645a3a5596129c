"""Training batches that depend only on (seed, epoch, sample): the same on 1 or N devices, with any
number of workers, and after a resume from the middle of an epoch.

`SeededSampler` shuffles like `DistributedSampler` (one permutation per seed and epoch, rank r takes
every r-th index) and gives each index its own augmentation seed; `BalancedSampler` instead draws
indices with class-balanced probabilities, each draw with its own seed. `Seeded` draws the sample's
random transform under that seed, and `SeededCollate` a batch's MixUp/CutMix under a seed made of its
samples' seeds. `ResumableLoader` counts the batches it has yielded: Lightning stores that count in
every checkpoint and, when it resumes mid-epoch, the epoch goes on with the next batch instead of
restarting a new shuffle.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate


def augmentation_seeds(seed: int, epoch: int, count: int) -> np.ndarray:
    """The augmentation seed of each of `count` samples in an epoch (also what a feature cache's view uses)."""
    return np.random.SeedSequence([seed, epoch]).generate_state(count, np.uint64)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Torch's default generator (what torchvision's transforms draw from) seeded with `seed` inside the block;
    the caller's random state is left as it was (fork_rng costs 30x more)."""
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(state)


class SeededSampler(DistributedSampler):
    """Yields `(index, augmentation seed)`: this rank's share of the (seed, epoch) permutation.

    Lightning calls `set_epoch` each epoch and keeps this sampler under DDP (it is a DistributedSampler
    already), so 2 ranks with batch B/2 see together what one process sees with batch B.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0, min_draws: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0  # this rank's samples to leave out at the start of the epoch (a mid-epoch resume)
        # An epoch of at least `min_draws` samples (all ranks together): a small training split is passed over
        # several times per epoch, so the number of optimizer steps does not shrink with the data
        self.min_draws = min_draws
        if min_draws > len(dataset):
            self.num_samples = math.ceil(min_draws / num_replicas)
            self.total_size = self.num_samples * num_replicas

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.draws()[self.start :])

    def draws(self) -> list[tuple[int, int]]:
        """This rank's whole share of the epoch, as `(index, augmentation seed)`. The first pass over the data is
        DistributedSampler's permutation, padded as it pads; further passes (`min_draws`) have their own
        permutations and seeds."""
        size = len(self.dataset)
        seeds = augmentation_seeds(self.seed, self.epoch, size)
        generator = torch.Generator().manual_seed(self.seed + self.epoch)  # as DistributedSampler's shuffle
        order = [(index, int(seeds[index])) for index in torch.randperm(size, generator=generator).tolist()]
        passes = math.ceil(self.total_size / size) if self.min_draws > size else 1
        for again in range(1, passes):
            state = np.random.SeedSequence([self.seed, self.epoch, again]).generate_state(2, np.uint64)
            generator.manual_seed(int(state[0]))
            more = np.random.SeedSequence([self.seed, self.epoch, again, 1]).generate_state(size, np.uint64)
            order += [(index, int(more[index])) for index in torch.randperm(size, generator=generator).tolist()]
        order = (order * math.ceil(self.total_size / len(order)))[: self.total_size]  # DistributedSampler's padding
        return order[self.rank :: self.num_replicas]


class BalancedSampler(SeededSampler):
    """Each epoch, `total_size` (= len(dataset) on one process) indices drawn with replacement so that every
    class is equally likely, from a generator seeded by (seed, epoch); rank r takes every r-th draw, and each
    draw has its own augmentation seed (an image drawn twice is augmented twice, differently)."""

    def __init__(
        self,
        dataset: Dataset,
        labels: Sequence[int],
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        min_draws: int = 0,
    ):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, seed=seed, min_draws=min_draws)
        labels = torch.as_tensor(labels)
        self.weights = 1.0 / torch.bincount(labels).double()[labels]

    def draws(self) -> list[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)  # as DistributedSampler's shuffle
        indices = torch.multinomial(self.weights, self.total_size, replacement=True, generator=generator).tolist()
        seeds = augmentation_seeds(self.seed, self.epoch, self.total_size)
        return [(indices[draw], int(seeds[draw])) for draw in range(self.rank, self.total_size, self.num_replicas)]


class Seeded(Dataset):
    """`dataset[index]` drawn under its own seed, so its augmentation does not depend on which worker,
    rank or process loads it; the caller's random state is left as it was. With `with_seed`, items are
    `(sample, seed)` for a `SeededCollate`."""

    def __init__(self, dataset: Dataset, with_seed: bool = False):
        self.dataset, self.with_seed = dataset, with_seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int] | int) -> Any:
        if isinstance(item, tuple):
            index, seed = item
            with seeded(seed):
                sample = self.dataset[index]
        else:  # a plain sampler (Lightning's overfit_batches): the global random state
            sample, seed = self.dataset[item], None
        return (sample, seed) if self.with_seed else sample


def batch_seed(seeds: Sequence[int]) -> int:
    """One seed from the batch's sample seeds, that is from (seed, epoch, rank, batch index)."""
    return int(np.random.SeedSequence(list(seeds)).generate_state(1, np.uint64)[0])


class SeededCollate:
    """Collates `(sample, seed)` items (`Seeded(..., with_seed=True)`) and applies `transform` (MixUp/CutMix) to
    the batch under `batch_seed`: in the worker that collates it, yet the same with any number of workers,
    and after a mid-epoch resume."""

    def __init__(self, transform: Callable[..., Any]):
        self.transform = transform

    def __call__(self, items: list[tuple[Any, int | None]]) -> Any:
        samples, seeds = zip(*items, strict=True)
        batch = default_collate(list(samples))
        if None in seeds:  # a plain sampler (overfit_batches): the global random state
            return self.transform(*batch)
        with seeded(batch_seed(seeds)):
            return self.transform(*batch)


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

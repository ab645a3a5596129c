"""Feature caching for a frozen backbone: it runs once per split and the head trains on its output.

With `strategy=freeze callbacks.feature_cache.enabled=true` the whole backbone stays frozen for the whole run, so
it is a pure function of the transformed image (`Backbone.forward_frozen`). Its output on every split is
computed once and stored in `cache_dir` under a key that hashes everything it depends on: the frozen
stages' architecture and weights, the transform, the images' bytes and labels, and the precision. A
changed backbone, weights, transform or image gives a new key, so a stale cache is never read, and a
later run on the same data and backbone (a sweep over the head's lr) skips the backbone entirely.

With augmentation on (any `data.augment` but `none`, or `data.random_erasing`) the training split is cached as `views` augmented views:
view v holds exactly the augmentation that the uncached run draws in epoch v (the same per-sample
seeds, see `finetune.data.sampling`), and every time a sample is drawn it comes from one of its views
at random. Validation and test use the deterministic eval transform: one view. MixUp and CutMix mix
images, not features: `finetune.validation` refuses them with the cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset

from finetune.data.datamodule import ImageFolderDataModule, Transformed
from finetune.data.images import ImageFolder
from finetune.data.sampling import Seeded, augmentation_seeds
from finetune.data.store import StoredImages
from finetune.errors import ConfigError
from finetune.models.backbones import Backbone
from finetune.models.fusion import fold_batchnorm

log = logging.getLogger(__name__)

FORMAT = "finetune-features-v1"  # part of every key: a changed file layout never reads an old file


class CachedFeatures(Dataset):
    """`(features, label)` from `views x N` stored features; with several views each access picks one at random."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        view = int(torch.randint(len(self.features), ())) if len(self.features) > 1 else 0
        return self.features[view, index], self.labels[index]  # a class index, or a multi-label vector


def backbone_key(backbone: Backbone) -> str:
    """The frozen stages' architecture and every weight and buffer (BatchNorm statistics included)."""
    frozen = backbone.stages[: backbone.frozen_stages]
    digest = hashlib.sha256(repr(frozen).encode())
    for name, tensor in frozen.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _sample_bytes(dataset: Dataset, index: int) -> bytes:
    """One sample: an image folder's file bytes and label, or else the decoded pixels and label."""
    samples = getattr(dataset, "samples", None)
    if samples is not None:
        path, label = samples[index]
        return Path(path).read_bytes() + f"|{label}".encode()
    image, label = dataset[index]
    return image.tobytes() + f"|{image.mode}|{image.size}|{label}".encode()


def split_key(backbone: str, split: Transformed, extra: str = "") -> str:
    """The key of one cached split: the backbone's key, the transform, the decoded store the images come from
    (its square differs from the file) or the size the files are decoded to, every sample in order, and `extra`."""
    store = split.dataset.file.stem if isinstance(split.dataset, StoredImages) else ""
    decoded = split.dataset.at_least if isinstance(split.dataset, ImageFolder) else None
    digest = hashlib.sha256(f"{FORMAT}|{backbone}|{split.transform!r}|{store}|{decoded}|{extra}".encode())
    for index in split.indices:
        digest.update(hashlib.sha256(_sample_bytes(split.dataset, index)).digest())
    return digest.hexdigest()


class FoldedBackbone:
    """`backbone.forward_frozen` with every BatchNorm folded into its convolution (the same function with
    fewer passes over the activations, see `finetune.models.fusion`), folded once, on the first batch."""

    def __init__(self, backbone: Backbone):
        self.backbone, self.folded = backbone, None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.folded is None:  # checked in full precision, outside the caller's autocast or inference mode
            with torch.inference_mode(False), torch.autocast(images.device.type, enabled=False):
                self.folded = fold_batchnorm(self.backbone, images[:1].clone())
        return self.folded.forward_frozen(images)


class FeatureCache(Callback):
    """Turns every split of the datamodule into the frozen backbone's output on it (see the module docstring),
    and has the backbone take those features instead of images. It runs after the strategy callback, which
    decides what is frozen (`finetune.builders` puts that first).

    `views`: augmented views of the training split to cache when the data is augmented (1 = one fixed
    augmentation per image); `cache_dir`: where the features live (`<key>.pt`, read with weights_only=True).
    """

    def __init__(self, enabled: bool = False, views: int = 1, cache_dir: str | os.PathLike = "data/features"):
        if views < 1:
            raise ConfigError(f"callbacks.feature_cache.views={views} must be >= 1")
        self.enabled, self.views, self.cache_dir = enabled, views, Path(cache_dir).expanduser()

    @staticmethod
    def require_frozen(backbone: Backbone) -> None:
        """Cached features stay right only while no backbone stage trains."""
        if backbone.frozen_stages != backbone.num_stages:
            trainable = backbone.num_stages - backbone.frozen_stages
            raise ConfigError(
                "callbacks.feature_cache.enabled=true needs a backbone frozen for the whole run (strategy=freeze), "
                f"but {trainable} of its {backbone.num_stages} stages train: set callbacks.feature_cache.enabled=false"
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled:
            # The fit loop builds the training loader after this hook, on the features (a per-step schedule that
            # counted the batches before it dropped the loader it built: `FineTuneModule.configure_optimizers`)
            self.attach(trainer, pl_module.backbone)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.backbone.prefix_precomputed:
            self.require_frozen(pl_module.backbone)  # no stage whose output is cached may unfreeze

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """`trainer.test` after the fit reads the cached test split too."""
        datasets = getattr(trainer.datamodule, "datasets", {})
        pl_module.backbone.prefix_precomputed = isinstance(datasets.get("test"), CachedFeatures)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pl_module.backbone.prefix_precomputed = False  # the model takes images again outside the trainer

    def attach(self, trainer: L.Trainer, backbone: Backbone) -> None:
        """Replaces the trainer's datamodule splits by their cached features, computing the missing ones."""
        self.require_frozen(backbone)
        datamodule = trainer.datamodule
        if not isinstance(datamodule, ImageFolderDataModule):
            raise ConfigError("callbacks.feature_cache.enabled=true needs the data from a finetune DataModule")
        weights = backbone_key(backbone)
        folded = FoldedBackbone(backbone)
        for split, dataset in datamodule.datasets.items():
            if isinstance(dataset, CachedFeatures):  # a second fit on the same datamodule
                continue
            augmented = split == "train" and datamodule.augmented
            views = [
                self._view(trainer, folded, dataset, weights, (datamodule.seed, epoch) if augmented else None)
                for epoch in range(self.views if augmented else 1)
            ]
            features = torch.stack([features for features, _ in views])
            datamodule.datasets[split] = CachedFeatures(features, views[0][1])
        # The splits are tensors in memory now: worker processes would only add start-up time and copies.
        datamodule.num_workers, datamodule.persistent_workers = 0, False
        backbone.prefix_precomputed = True

    def _view(
        self,
        trainer: L.Trainer,
        backbone: FoldedBackbone,
        dataset: Transformed,
        weights: str,
        seed: tuple[int, int] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, labels) of one view of a split: read from the cache, or computed and stored."""
        extra = f"precision={trainer.precision}|augmentation seed, epoch={seed}"
        path = self.cache_dir / f"{split_key(weights, dataset, extra)}.pt"
        if path.is_file():
            stored = torch.load(path, map_location="cpu", weights_only=True)
            log.info("Features of %d images read from %s", len(stored["labels"]), path)
            return stored["features"], stored["labels"]
        start = time.perf_counter()
        sampler = (
            range(len(dataset)) if seed is None else list(enumerate(augmentation_seeds(*seed, len(dataset)).tolist()))
        )
        datamodule = trainer.datamodule
        loader = DataLoader(
            Seeded(dataset),
            batch_size=datamodule.batch_size,
            sampler=sampler,
            num_workers=datamodule.num_workers,
            pin_memory=datamodule.pin_memory,
        )
        features, labels = [], []
        with trainer.precision_plugin.forward_context(), torch.inference_mode():  # autocast as in training
            for images, targets in loader:
                features.append(backbone(images.to(trainer.strategy.root_device)).float().cpu())
                labels.append(targets)
        stored = {"features": torch.cat(features), "labels": torch.cat(labels)}
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.part")  # a reader never sees half a file
        torch.save(stored, partial)
        partial.replace(path)
        log.info(
            "Features of %d images computed in %.2f s, stored in %s", len(dataset), time.perf_counter() - start, path
        )
        return stored["features"], stored["labels"]

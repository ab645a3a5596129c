"""The LightningModule: a pretrained backbone, a new linear head, named param groups."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from finetune.errors import ConfigError
from finetune.models.backbones import Backbone

if TYPE_CHECKING:  # finetune.caching imports finetune.data, which imports this package
    from finetune.caching import FeatureCache

BackboneFactory = Callable[..., Backbone]


class FineTuneModule(L.LightningModule):
    """Backbone + head; every parameter sits in the optimizer from the first step.

    Group lr = optimizer lr x multiplier: the head gets `head_lr_mult`, the backbone
    `backbone_lr_mult` (and, with `group_by_stage`, stage k of K also `layer_decay ** (K - k)`).
    Which stages actually train is decided by the strategy callback (frozen stages get no grad).
    """

    def __init__(
        self,
        backbone: BackboneFactory,
        name: str,
        num_classes: int,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        pretrained: bool = True,
        weights_path: str | None = None,
        head_lr_mult: float = 10.0,
        backbone_lr_mult: float = 1.0,
        layer_decay: float = 1.0,
        group_by_stage: bool = False,
        sync_batchnorm: bool = False,
        channels_last: bool = True,
        compile: bool = False,
        feature_cache: FeatureCache | None = None,
    ):
        super().__init__()  # the multipliers are checked with the config (finetune.validation)
        self.backbone = backbone(name, pretrained=pretrained, weights_path=weights_path)
        self.head = nn.Linear(self.backbone.num_features, num_classes)
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.lr_mults = {"head": head_lr_mult, "backbone": backbone_lr_mult, "layer_decay": layer_decay}
        self.group_by_stage = group_by_stage
        self.sync_batchnorm = sync_batchnorm
        self.feature_cache = feature_cache
        self.features_cached = False  # True once the feature cache has replaced every split's images
        if channels_last:  # NHWC weights: convolutions then run (and return) channels-last, inputs need no change
            self.backbone.to(memory_format=torch.channels_last)
        if compile:  # stage by stage, so a frozen prefix still runs under no_grad (see Backbone)
            for stage in self.backbone.stages:
                stage.compile()
        self.train_acc, self.val_acc, self.test_acc = (
            MulticlassAccuracy(num_classes, average="micro") for _ in range(3)
        )

    def configure_model(self) -> None:
        """`sync_batchnorm` under DDP: BatchNorm statistics of the global batch, not of each rank's share.

        Frozen stages keep their BatchNorm in eval mode, so only the training stages synchronise. A no-op on
        one device; PyTorch's SyncBatchNorm does not train on the CPU, so CPU DDP stops here with a clear error.
        """
        if not self.sync_batchnorm or self.trainer.world_size == 1:
            return
        if self.trainer.strategy.root_device.type == "cpu":
            raise ConfigError("model.sync_batchnorm=true needs GPUs: PyTorch's SyncBatchNorm does not train on the CPU")
        if not any(isinstance(m, nn.SyncBatchNorm) for m in self.modules()):  # configure_model runs for test too
            self.backbone = nn.SyncBatchNorm.convert_sync_batchnorm(self.backbone)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

    def param_groups(self) -> list[dict[str, Any]]:
        """Named groups with their lr multiplier: `backbone` (or `stage0..stageK-1`) and `head`."""
        stages = self.backbone.stages
        if self.group_by_stage:
            count = len(stages)
            groups = [
                (
                    f"stage{k}",
                    stage.parameters(),
                    self.lr_mults["backbone"] * self.lr_mults["layer_decay"] ** (count - k),
                )
                for k, stage in enumerate(stages)
            ]
        else:
            groups = [("backbone", stages.parameters(), self.lr_mults["backbone"])]
        groups.append(("head", self.head.parameters(), self.lr_mults["head"]))
        return [
            {"name": name, "params": params, "lr_mult": mult}
            for name, params, mult in ((n, list(p), m) for n, p, m in groups)
            if params
        ]

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(self.param_groups())
        for group in optimizer.param_groups:  # before the scheduler records them as its base_lrs
            group["lr"] *= group["lr_mult"]
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "epoch"},
        }

    def on_fit_start(self) -> None:
        """With `strategy.cache_features=true` the splits become the frozen backbone's output (finetune.caching)."""
        if self.feature_cache is not None and self.feature_cache.enabled:
            self.feature_cache.attach(self.trainer, self)
            self.features_cached = True

    def on_train_epoch_start(self) -> None:
        if self.features_cached:
            self.feature_cache.require_frozen(self.backbone)  # no stage whose output is cached may unfreeze

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        inputs, labels = batch  # images, or the backbone's features of them once cached
        logits = self.head(inputs) if self.features_cached else self(inputs)
        loss = F.cross_entropy(logits, labels)
        accuracy = getattr(self, f"{stage}_acc")
        accuracy(logits, labels)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log(f"{stage}/acc", accuracy, on_step=on_step, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

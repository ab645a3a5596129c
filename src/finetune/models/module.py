"""The LightningModule: a pretrained backbone, a new linear head, named param groups."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from finetune.models.backbones import Backbone

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
    ):
        super().__init__()
        for key, value in (
            ("head_lr_mult", head_lr_mult),
            ("backbone_lr_mult", backbone_lr_mult),
            ("layer_decay", layer_decay),
        ):
            if value <= 0:
                raise ValueError(f"{key} must be > 0, got {value}")
        self.backbone = backbone(name, pretrained=pretrained, weights_path=weights_path)
        self.head = nn.Linear(self.backbone.num_features, num_classes)
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.lr_mults = {"head": head_lr_mult, "backbone": backbone_lr_mult, "layer_decay": layer_decay}
        self.group_by_stage = group_by_stage
        self.train_acc, self.val_acc, self.test_acc = (
            MulticlassAccuracy(num_classes, average="micro") for _ in range(3)
        )

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

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
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

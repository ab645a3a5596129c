"""The LightningModule: a pretrained backbone, a new linear head, named param groups."""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from finetune.errors import ConfigError, instantiate_unwrapped
from finetune.models.backbones import InputConfig, load_checkpoint_file


class FineTuneModule(L.LightningModule):
    """Backbone + head; every parameter sits in the optimizer from the first step.

    Every argument is a plain value or container (Hydra configs converted), saved as the checkpoint's
    `hyper_parameters`: a checkpoint rebuilds its model alone (`from_checkpoint`), loading with
    `weights_only=True`.

    - `backbone`: the backbone's config (`_target_` a `finetune.models` factory, its name and weights);
    - `classes`: the class names in label order; `input_config`: what the model expects of an image
      (`InputConfig.to_dict`), kept for prediction and export;
    - `strategy`: `pretrained`, and the lr multipliers of the groups: the head gets `head_lr_mult`, the
      backbone `backbone_lr_mult` (and, with `group_by_stage`, stage k of K also `layer_decay ** (K - k)`).
      Which stages actually train is decided by the strategy callback (frozen stages get no grad);
    - `optimizer`, `scheduler`: partial configs (`_partial_: true`) that take the param groups / the optimizer;
    - `temperature`: what prediction divides the logits by (fitted by `eval.py eval.calibrate=true`).
    """

    def __init__(
        self,
        backbone: dict[str, Any],
        classes: list[str],
        input_config: dict[str, Any],
        strategy: dict[str, Any],
        optimizer: dict[str, Any],
        scheduler: dict[str, Any] | None = None,
        sync_batchnorm: bool = False,
        channels_last: bool = True,
        compile: bool = False,
        temperature: float = 1.0,
    ):
        super().__init__()  # the multipliers are checked with the config (finetune.validation)
        self.save_hyperparameters(logger=False)  # train.py logs the settings that tell runs apart
        self.backbone = instantiate_unwrapped(backbone, pretrained=strategy["pretrained"])
        self.head = nn.Linear(self.backbone.num_features, len(classes))
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        if channels_last:  # NHWC weights: convolutions then run (and return) channels-last, inputs need no change
            self.backbone.to(memory_format=torch.channels_last)
        if compile:  # stage by stage, so a frozen prefix still runs under no_grad (see Backbone)
            for stage in self.backbone.stages:
                stage.compile()
        self.train_acc, self.val_acc, self.test_acc = (
            MulticlassAccuracy(len(classes), average="micro") for _ in range(3)
        )

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike) -> FineTuneModule:
        """The model a checkpoint holds, rebuilt from its stored settings alone (no config, no download)."""
        checkpoint = load_checkpoint_file(path, key="ckpt_path")
        settings = checkpoint.get("hyper_parameters")
        if not isinstance(settings, dict) or "backbone" not in settings:
            raise ConfigError(f"ckpt_path: {path} was written by an older version: it does not hold its settings")
        settings = {
            **settings,
            "backbone": {**settings["backbone"], "weights_path": None},  # the weights are in the checkpoint
            "strategy": {**settings["strategy"], "pretrained": False},
        }
        model = cls(**settings)
        model.load_state_dict(checkpoint["state_dict"])
        return model.eval()

    @property
    def classes(self) -> list[str]:
        return list(self.hparams.classes)

    @property
    def input_config(self) -> InputConfig:
        return InputConfig.from_dict(self.hparams.input_config)

    @property
    def meta(self) -> dict[str, Any]:
        """What a client needs besides the weights: classes, the input config and the temperature (plain values)."""
        return {"classes": self.classes, **self.input_config.to_dict(), "temperature": float(self.hparams.temperature)}

    def network(self) -> nn.Sequential:
        """Backbone and head as a plain module, sharing these weights: what is exported (tracing a LightningModule
        trips over its `trainer` property)."""
        return nn.Sequential(self.backbone, self.head)

    def configure_model(self) -> None:
        """`sync_batchnorm` under DDP: BatchNorm statistics of the global batch, not of each rank's share.

        Frozen stages keep their BatchNorm in eval mode, so only the training stages synchronise. A no-op on
        one device; PyTorch's SyncBatchNorm does not train on the CPU, so CPU DDP stops here with a clear error.
        """
        if not self.hparams.sync_batchnorm or self.trainer.world_size == 1:
            return
        if self.trainer.strategy.root_device.type == "cpu":
            raise ConfigError("model.sync_batchnorm=true needs GPUs: PyTorch's SyncBatchNorm does not train on the CPU")
        if not any(isinstance(m, nn.SyncBatchNorm) for m in self.modules()):  # configure_model runs for test too
            self.backbone = nn.SyncBatchNorm.convert_sync_batchnorm(self.backbone)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

    def param_groups(self) -> list[dict[str, Any]]:
        """Named groups with their lr multiplier: `backbone` (or `stage0..stageK-1`) and `head`."""
        strategy, stages = self.hparams.strategy, self.backbone.stages
        if strategy["group_by_stage"]:
            count = len(stages)
            groups = [
                (f"stage{k}", stage.parameters(), strategy["backbone_lr_mult"] * strategy["layer_decay"] ** (count - k))
                for k, stage in enumerate(stages)
            ]
        else:
            groups = [("backbone", stages.parameters(), strategy["backbone_lr_mult"])]
        groups.append(("head", self.head.parameters(), strategy["head_lr_mult"]))
        return [
            {"name": name, "params": params, "lr_mult": mult}
            for name, params, mult in ((n, list(p), m) for n, p, m in groups)
            if params
        ]

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = instantiate(self.hparams.optimizer)(self.param_groups())
        for group in optimizer.param_groups:  # before the scheduler records them as its base_lrs
            group["lr"] *= group["lr_mult"]
        if self.hparams.scheduler is None:
            return {"optimizer": optimizer}
        scheduler = instantiate(self.hparams.scheduler)(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, labels = batch  # images, or the frozen backbone's features of them (finetune.caching)
        logits = self(inputs)
        loss = F.cross_entropy(logits, labels)
        accuracy = getattr(self, f"{stage}_acc")
        accuracy(logits, labels.argmax(1) if labels.ndim == 2 else labels)  # MixUp/CutMix: soft labels (N, C)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log(f"{stage}/acc", accuracy, on_step=on_step, on_epoch=True, prog_bar=True)
        return loss, logits

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")[0]

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The logits, for the error analysis of the test (`finetune.callbacks.ErrorAnalysis`)."""
        return self._step(batch, "test")[1]

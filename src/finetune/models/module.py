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
from finetune.models.head_init import init_head_from_source


def decay_split(named_params: list[tuple[str, nn.Parameter]]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decayed, not decayed) as timm's `param_groups_weight_decay`: biases and 1-D params (normalisation
    weights) get no weight decay."""
    decay = [p for n, p in named_params if p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in named_params if p.ndim <= 1 or n.endswith(".bias")]
    return decay, no_decay


class FineTuneModule(L.LightningModule):
    """Backbone + head; every parameter sits in the optimizer from the first step.

    Every argument is a plain value or container (Hydra configs converted), saved as the checkpoint's
    `hyper_parameters`: a checkpoint rebuilds its model alone (`from_checkpoint`), loading with
    `weights_only=True`.

    - `backbone`: the backbone's config (`_target_` a `finetune.models` factory, its name and weights);
    - `classes`: the class names in label order; `input_config`: what the model expects of an image
      (`InputConfig.to_dict`), kept for prediction and export;
    - `strategy`: `pretrained`, and the lr multipliers of the groups: the head gets `head_lr_mult`, the
      backbone `backbone_lr_mult` (and, with `group_by_stage`, stage k of K also `layer_decay ** (K - k)`);
      `bn`: `train`, or `eval` to keep BatchNorm statistics fixed also in training stages.
      Which stages actually train is decided by the strategy callback (frozen stages get no grad);
    - `optimizer`, `scheduler`: partial configs (`_partial_: true`) that take the param groups / the optimizer;
      `optimizer.filter_bias_and_bn`: no weight decay on biases and 1-D params (groups `<name>_no_decay`);
      `scheduler.interval`: `epoch` (default) or `step` (then the schedule also takes `total_steps`);
    - `loss`: `label_smoothing` and `class_weights` (a weight per class, or None) of the cross-entropy;
    - `head_init`: `default` (Xavier) or `source` (rows of the pretrained classifier, `head_init_map`: see
      `finetune.models.head_init`);
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
        loss: dict[str, Any] | None = None,
        head_init: str = "default",
        head_init_map: dict[str, list[int]] | None = None,
        temperature: float = 1.0,
    ):
        super().__init__()  # the multipliers are checked with the config (finetune.validation)
        self.save_hyperparameters(logger=False)  # train.py logs the settings that tell runs apart
        self.backbone = instantiate_unwrapped(backbone, pretrained=strategy["pretrained"])
        # `bn=eval` keeps pretrained statistics; a random init has none worth keeping (checkpoints before `bn` lack it)
        self.backbone.bn_eval = strategy["pretrained"] and strategy.get("bn", "train") == "eval"
        self.head = nn.Linear(self.backbone.num_features, len(classes))
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        if head_init == "source":
            init_head_from_source(self.head, classes, self.backbone.classifier, head_init_map)
        loss = loss or {}
        self.label_smoothing = loss.get("label_smoothing", 0.0)
        weights = loss.get("class_weights")
        self.register_buffer("class_weights", None if weights is None else torch.tensor(weights), persistent=False)
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
        """The model a checkpoint file holds, rebuilt from its stored settings alone (no config, no download)."""
        return cls.from_saved(load_checkpoint_file(path, key="ckpt_path"), path)

    @classmethod
    def from_saved(cls, checkpoint: dict[str, Any], source: str | os.PathLike) -> FineTuneModule:
        """`from_checkpoint` of a checkpoint already loaded (with `weights_only=True`) from `source`."""
        settings = checkpoint.get("hyper_parameters")
        if not isinstance(settings, dict) or "backbone" not in settings:
            raise ConfigError(f"ckpt_path: {source} was written by an older version: it does not hold its settings")
        settings = {
            **settings,
            "backbone": {**settings["backbone"], "weights_path": None},  # the weights are in the checkpoint
            "strategy": {**settings["strategy"], "pretrained": False},
            "head_init": "default",  # the head is in the checkpoint too
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

    def param_groups(self, filter_bias_and_bn: bool = False) -> list[dict[str, Any]]:
        """Named groups with their lr multiplier: `backbone` (or `stage0..stageK-1`) and `head`; with
        `filter_bias_and_bn`, each also as `<name>_no_decay` with its biases and 1-D params at weight_decay 0."""
        strategy, stages = self.hparams.strategy, self.backbone.stages
        if strategy["group_by_stage"]:
            count = len(stages)
            groups = [
                (f"stage{k}", stage, strategy["backbone_lr_mult"] * strategy["layer_decay"] ** (count - k))
                for k, stage in enumerate(stages)
            ]
        else:
            groups = [("backbone", stages, strategy["backbone_lr_mult"])]
        groups.append(("head", self.head, strategy["head_lr_mult"]))
        result = []
        for name, module, mult in groups:
            named = list(module.named_parameters())
            if filter_bias_and_bn:
                decay, no_decay = decay_split(named)
                result += [
                    {"name": name, "params": decay, "lr_mult": mult},
                    {"name": f"{name}_no_decay", "params": no_decay, "lr_mult": mult, "weight_decay": 0.0},
                ]
            else:
                result.append({"name": name, "params": [p for _, p in named], "lr_mult": mult})
        return [group for group in result if group["params"]]

    def configure_optimizers(self) -> dict[str, Any]:
        settings = dict(self.hparams.optimizer)
        filter_bias_and_bn = settings.pop("filter_bias_and_bn", False)
        optimizer = instantiate(settings)(self.param_groups(filter_bias_and_bn))
        for group in optimizer.param_groups:  # before the scheduler records them as its base_lrs
            group["lr"] *= group["lr_mult"]
        if self.hparams.scheduler is None:
            return {"optimizer": optimizer}
        schedule = dict(self.hparams.scheduler)
        interval = schedule.pop("interval", "epoch")
        steps = {"total_steps": int(self.trainer.estimated_stepping_batches)} if interval == "step" else {}
        scheduler = instantiate(schedule)(optimizer, **steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy with `loss.class_weights` and `loss.label_smoothing`; `targets` are class indices or
        (N, C) probabilities (as MixUp/CutMix make them)."""
        return F.cross_entropy(logits, targets, weight=self.class_weights, label_smoothing=self.label_smoothing)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = batch  # images, or the frozen backbone's features of them (finetune.caching)
        logits = self(inputs)
        loss = self.loss(logits, targets)
        labels = targets.argmax(1) if targets.ndim == 2 else targets  # MixUp/CutMix: soft labels (N, C)
        accuracy = getattr(self, f"{stage}_acc")
        accuracy(logits, labels)
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

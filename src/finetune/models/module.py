"""The LightningModule: a backbone, a new linear head and their metrics; what a transfer method adds plugs in.

The module holds the network and runs the steps. What a method changes is an object or function the config
instantiates, so the module does not grow with the methods:
- the loss of the logits (`loss`, `finetune.models.losses.CrossEntropy` by default) and extra loss terms
  (`loss_terms` and the `regularizer`, each logged as `train/loss_<name>`), `finetune.models.losses`;
- the rule that puts the parameters into named param groups with their lr multipliers (`strategy.param_groups`),
  `finetune.models.param_groups`;
- which of the backbone's parameters can train, or adapters beside its layers (`peft`: BitFit, norm-only, LoRA),
  a function applied to the backbone once it is built, `finetune.models.parameter_efficient`;
- the kind of classification: how logits become probabilities, and the metrics of each split (`task`),
  `finetune.models.tasks`;
- which stages train when (`finetune.finetuning.StageUnfreezing`) and steps after training (the feature cache,
  weight averaging, the error analysis): callbacks, `callbacks` in conf/.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from torch import nn

from finetune.errors import ConfigError, instantiate_unwrapped
from finetune.models.backbones import InputConfig, load_checkpoint_file
from finetune.models.head_init import init_head_from_source
from finetune.models.losses import CrossEntropy, StepOutput
from finetune.models.param_groups import LrMultipliers, named_groups, stage_groups
from finetune.models.tasks import SingleLabel

# The loss of checkpoints that stored its settings without a `_target_` (before losses were plug-ins), and the
# param-group rule of those that stored none
DEFAULT_LOSS = f"{CrossEntropy.__module__}.{CrossEntropy.__name__}"
DEFAULT_RULE = f"{stage_groups.__module__}.{stage_groups.__name__}"


@dataclass(frozen=True)
class StrategySettings(LrMultipliers):
    """What the module takes of `strategy` (conf/strategy/_base.yaml): the lr multipliers, the rule that makes the
    param groups of them (`param_groups`, a partial config), `pretrained`, and `bn`: `train`, or `eval` to keep
    BatchNorm statistics fixed also in training stages. Which stages train when is the strategy callback's."""

    pretrained: bool = True
    bn: str = "train"  # checkpoints written before `bn` existed trained their BatchNorm statistics
    param_groups: dict[str, Any] = field(default_factory=lambda: {"_target_": DEFAULT_RULE, "_partial_": True})

    @classmethod
    def from_dict(cls, strategy: Mapping[str, Any]) -> StrategySettings:
        """From the strategy config, or a checkpoint's: its other keys (name, the unfreeze schedule) are not the
        module's."""
        return cls(**{f.name: strategy[f.name] for f in fields(cls) if f.name in strategy})


@dataclass(frozen=True)
class ModelOptions:
    """The `model.*` switches the module applies (conf/model/_module.yaml): SyncBatchNorm under DDP, NHWC weights,
    `torch.compile` of each stage, and the new head's init (`default`, or `source`: rows of the pretrained
    classifier, `head_init_map` as in `finetune.models.head_init`)."""

    sync_batchnorm: bool = False
    channels_last: bool = True
    compile: bool = False
    head_init: str = "default"
    head_init_map: dict[str, list[int]] | None = None


def _current_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's `hyper_parameters` as this version names them: those written before the loss and the
    param-group rule became plug-ins kept the model options beside the other settings and the loss settings
    without their `_target_`."""
    if "options" in settings:
        return dict(settings)
    loss = settings.get("loss")
    return {
        **settings,
        "options": {f.name: settings[f.name] for f in fields(ModelOptions) if f.name in settings},
        "loss": None if loss is None else {"_target_": DEFAULT_LOSS, **loss},
        "loss_terms": {},
    }


class FineTuneModule(L.LightningModule):
    """Backbone + head; every parameter that requires grad sits in the optimizer from the first step.

    The settings are saved as the checkpoint's `hyper_parameters`, as plain values (dataclasses as dicts): a
    checkpoint rebuilds its model alone (`from_checkpoint`), loading with `weights_only=True`.

    - `backbone`: the backbone's config (`_target_` a `finetune.models` factory, its name and weights);
    - `classes`: the class names in label order; `input_config`: what the model expects of an image, kept for
      prediction and export;
    - `strategy`: the lr multipliers, the param-group rule, `pretrained` and `bn` (`StrategySettings`);
    - `optimizer`, `scheduler`: partial configs (`_partial_: true`) that take the param groups / the optimizer;
      `optimizer.filter_bias_and_bn`: no weight decay on biases and 1-D params (groups `<name>_no_decay`);
      `scheduler.interval`: `epoch` (default) or `step` (then the schedule also takes `total_steps`);
    - `loss`: the config of the loss of the logits (None: plain cross-entropy); `loss_terms`: name -> the partial
      config of an extra term, built with this module (`finetune.models.losses`; the builder adds the
      `regularizer` here), its parameters, if any, in the param group `loss_terms`;
    - `peft`: the partial config of a backbone adapter (`finetune.models.parameter_efficient`), applied before
      anything else sees the backbone (None: every backbone parameter can train);
    - `task`: the config of the kind of classification (`finetune.models.tasks`; None: single-label), which makes
      the metrics logged as `<split>/<name>`;
    - `options`: the `model.*` switches (`ModelOptions`);
    - `temperature`: what prediction divides the logits by (fitted by `eval.py eval.calibrate=true`);
    - `thresholds`: multi-label, a probability threshold per class (tuned on validation by
      `finetune.callbacks.TuneThresholds`; None: the task's `threshold`).
    """

    def __init__(
        self,
        backbone: dict[str, Any],
        classes: Sequence[str],
        input_config: InputConfig,
        strategy: StrategySettings,
        optimizer: dict[str, Any],
        scheduler: dict[str, Any] | None = None,
        loss: dict[str, Any] | None = None,
        loss_terms: dict[str, dict[str, Any]] | None = None,
        peft: dict[str, Any] | None = None,
        task: dict[str, Any] | None = None,
        options: ModelOptions | None = None,
        temperature: float = 1.0,
        thresholds: list[float] | None = None,
    ):
        super().__init__()  # the multipliers are checked with the config (finetune.validation)
        options = options or ModelOptions()
        loss_terms = loss_terms or {}
        settings = {
            "backbone": backbone,
            "classes": list(classes),
            "input_config": input_config.to_dict(),
            "strategy": asdict(strategy),
            "optimizer": optimizer,
            "scheduler": scheduler,
            "loss": loss,
            "loss_terms": loss_terms,
            "peft": peft,
            "task": task,
            "options": asdict(options),
            "temperature": temperature,
            "thresholds": thresholds,
        }
        self.save_hyperparameters(settings, logger=False)  # train.py logs the settings that tell runs apart
        self.strategy, self.options = strategy, options
        self.backbone = instantiate_unwrapped(backbone, pretrained=strategy.pretrained)
        if peft is not None:  # before channels_last and compile, so that they apply to any adapters too
            self.backbone = instantiate(peft, _convert_="all")(self.backbone)
        # `bn=eval` keeps pretrained statistics; a random init has none worth keeping
        self.backbone.bn_eval = strategy.pretrained and strategy.bn == "eval"
        self.head = nn.Linear(self.backbone.num_features, len(classes))
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        if options.head_init == "source":
            init_head_from_source(self.head, classes, self.backbone.classifier, options.head_init_map)
        self.criterion = CrossEntropy() if loss is None else instantiate(loss, _convert_="all")
        if (
            options.channels_last
        ):  # NHWC weights: convolutions then run (and return) channels-last, inputs need no change
            self.backbone.to(memory_format=torch.channels_last)
        if options.compile:  # stage by stage, so a frozen prefix still runs under no_grad (see Backbone)
            for stage in self.backbone.stages:
                stage.compile()
        self.task = SingleLabel() if task is None else instantiate(task, _convert_="all")
        self.train_metrics, self.val_metrics, self.test_metrics = (self.task.metrics(len(classes)) for _ in range(3))
        # last: a term may keep what it needs of the finished model (e.g. a copy of the source weights)
        self.loss_terms = nn.ModuleDict(
            {name: instantiate(term, _convert_="all")(self) for name, term in loss_terms.items() if term is not None}
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
        settings = _current_settings(settings)
        model = cls(
            backbone={**settings["backbone"], "weights_path": None},  # the weights are in the checkpoint
            classes=settings["classes"],
            input_config=InputConfig.from_dict(settings["input_config"]),
            strategy=replace(StrategySettings.from_dict(settings["strategy"]), pretrained=False),
            optimizer=settings["optimizer"],
            scheduler=settings["scheduler"],
            loss=settings["loss"],
            loss_terms=settings["loss_terms"],
            peft=settings.get("peft"),  # the adapters exist before the state dict loads
            task=settings.get("task"),
            options=replace(ModelOptions(**settings["options"]), head_init="default"),  # the head is in it too
            temperature=settings["temperature"],
            thresholds=settings.get("thresholds"),
        )
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
        """What a client needs besides the weights: classes, the input config and the temperature (plain values), and
        what the task adds (multi-label: `multilabel` and a threshold per class)."""
        return {
            "classes": self.classes,
            **self.input_config.to_dict(),
            "temperature": float(self.hparams.temperature),
            **self.task.meta(len(self.classes), self.hparams.get("thresholds")),
        }

    def network(self) -> nn.Sequential:
        """Backbone and head as a plain module, sharing these weights: what is exported (tracing a LightningModule
        trips over its `trainer` property)."""
        return nn.Sequential(self.backbone, self.head)

    def configure_model(self) -> None:
        """`sync_batchnorm` under DDP: BatchNorm statistics of the global batch, not of each rank's share.

        Frozen stages keep their BatchNorm in eval mode, so only the training stages synchronise. A no-op on
        one device; PyTorch's SyncBatchNorm does not train on the CPU, so CPU DDP stops here with a clear error.
        """
        if not self.options.sync_batchnorm or self.trainer.world_size == 1:
            return
        if self.trainer.strategy.root_device.type == "cpu":
            raise ConfigError("model.sync_batchnorm=true needs GPUs: PyTorch's SyncBatchNorm does not train on the CPU")
        if not any(isinstance(m, nn.SyncBatchNorm) for m in self.modules()):  # configure_model runs for test too
            self.backbone = nn.SyncBatchNorm.convert_sync_batchnorm(self.backbone)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

    def on_fit_start(self) -> None:
        """Each loss term sees the training data once before the first step (`LossTerm.prepare`)."""
        for term in self.loss_terms.values():
            term.prepare(self, self.trainer.datamodule)

    def configure_optimizers(self) -> dict[str, Any]:
        settings = dict(self.hparams.optimizer)
        rule = instantiate(self.strategy.param_groups)  # finetune.models.param_groups
        filter_bias_and_bn = settings.pop("filter_bias_and_bn", False)
        groups = rule(self.backbone.stages, self.head, self.strategy, filter_bias_and_bn)
        # a term's own parameters (Co-Tuning's source head) train beside the backbone, at its lr
        groups += named_groups("loss_terms", self.loss_terms, self.strategy.backbone_lr_mult, filter_bias_and_bn)
        optimizer = instantiate(settings)(groups)
        for group in optimizer.param_groups:  # before the scheduler records them as its base_lrs
            group["lr"] *= group["lr_mult"]
        if self.hparams.scheduler is None:
            return {"optimizer": optimizer}
        schedule = dict(self.hparams.scheduler)
        interval = schedule.pop("interval", "epoch")
        steps = {}
        if interval == "step":  # optimizer steps: Lightning divides the batches by trainer.accumulate_grad_batches
            steps["total_steps"] = int(self.trainer.estimated_stepping_batches)
            # Counting them built the training loader, before a resume restores its position and before the feature
            # cache swaps the images for features (`on_fit_start`): dropped, the fit loop builds it again after both
            # (else a mid-epoch resume would start the epoch's batches over)
            self.trainer.fit_loop._combined_loader = None
        scheduler = instantiate(schedule)(optimizer, **steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss and logits of a batch; in training, plus each loss term (validation and test losses stay the
        loss of the logits alone, comparable between methods)."""
        inputs, targets = batch  # images, or the frozen backbone's features of them (finetune.caching)
        features = self.backbone(inputs)
        logits = self.head(features)
        loss = self.criterion(logits, targets)
        on_step = stage == "train"
        if on_step and self.loss_terms:
            self.log("train/loss_cls", loss, on_step=True, on_epoch=True, sync_dist=True)
            output = StepOutput(features, logits, targets)
            for name, term in self.loss_terms.items():
                value = term(self, output)
                self.log(f"train/loss_{name}", value, on_step=True, on_epoch=True, sync_dist=True)
                loss = loss + value
        # not on the progress bar each step: Lightning would wait for the device to read them (finetune.callbacks.ProgressBar)
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=not on_step, sync_dist=True)
        for name, metric in getattr(self, f"{stage}_metrics")(logits, targets).items():  # finetune.models.tasks
            self.log(f"{stage}/{name}", metric, on_step=on_step, on_epoch=True, prog_bar=not on_step)
        return loss, logits

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")[0]

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The logits, for the thresholds tuned on validation (`finetune.callbacks.TuneThresholds`)."""
        return self._step(batch, "val")[1]

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The logits, for the error analysis of the test (`finetune.callbacks.ErrorAnalysis`)."""
        return self._step(batch, "test")[1]

"""The seam transfer methods plug into, without changes to the LightningModule: a loss term the config names is
built with the module, added to the training loss and logged on its own, and its checkpoint loads alone; the
param-group rule is the one the config names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from finetune.builders import build
from finetune.models.losses import LossTerm, StepOutput
from finetune.models.module import FineTuneModule
from finetune.models.param_groups import LrMultipliers
from finetune.train import train
from tests.helpers import SMALL_MODEL, TINY, compose_train


class HeadDrift(LossTerm):
    """`strength` x the squared distance of the head's weights from where they started: L2-SP's form (Li et al.
    2018), on the head alone. Its start is a buffer: in the checkpoint with the weights."""

    def __init__(self, model: FineTuneModule, strength: float):
        super().__init__()
        self.strength = strength
        self.register_buffer("start", model.head.weight.detach().clone())

    def forward(self, model: FineTuneModule, output: StepOutput) -> torch.Tensor:
        return self.strength * (model.head.weight - self.start).pow(2).sum()


def head_alone(
    stages: nn.ModuleList, head: nn.Module, lr: LrMultipliers, filter_bias_and_bn: bool = False
) -> list[dict[str, Any]]:
    """A param-group rule that trains the head alone."""
    return [{"name": "head", "params": list(head.parameters()), "lr_mult": lr.head_lr_mult}]


def test_a_loss_term_is_added_logged_and_checkpointed(tmp_path: Path, image_folder: Path):
    term = "+loss_terms.drift={_target_:tests.test_method_seam.HeadDrift,_partial_:true,strength:10.0}"
    data = ["data=imagefolder", f"data.root={image_folder}"]
    metrics = train(compose_train(tmp_path, [*data, *TINY, *SMALL_MODEL, term]))
    assert metrics["train/loss_drift_epoch"] > 0  # the head moved from its start
    assert metrics["train/loss_epoch"] == pytest.approx(
        metrics["train/loss_cls_epoch"] + metrics["train/loss_drift_epoch"]
    )
    assert not any(key.startswith(("val/loss_", "test/loss_")) for key in metrics)  # the loss of the logits only
    model = FineTuneModule.from_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert isinstance(model.loss_terms["drift"], HeadDrift) and model.loss_terms["drift"].strength == 10.0
    assert not torch.equal(model.loss_terms["drift"].start, model.head.weight)  # the start, from the checkpoint


def test_the_param_group_rule_is_the_configs(tmp_path: Path, image_folder: Path):
    rule = "strategy.param_groups._target_=tests.test_method_seam.head_alone"
    _, model = build(
        compose_train(tmp_path, ["data=imagefolder", f"data.root={image_folder}", *TINY, *SMALL_MODEL, rule])
    )
    model.hparams.scheduler = None  # configure_optimizers without a trainer: no schedule
    (group,) = model.configure_optimizers()["optimizer"].param_groups
    assert group["name"] == "head" and group["params"] == list(model.head.parameters())

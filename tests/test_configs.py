"""Every option of every config group composes and instantiates what it names."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import get_method
from omegaconf import OmegaConf

from finetune.config import CONFIG_DIR
from tests.helpers import compose_train

GROUPS = [
    "data",
    "model",
    "strategy",
    "optimizer",
    "scheduler",
    "loss",
    "regularizer",
    "peft",
    "trainer",
    "logger",
    "callbacks",
    "experiment",
    "debug",
]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml") if not p.stem.startswith("_"))


ALL_OPTIONS = [(group, option) for group in GROUPS for option in options(group)]


def test_every_group_has_options():
    assert {g for g, _ in ALL_OPTIONS} == set(GROUPS)
    assert set(options("strategy")) >= {"scratch", "freeze", "finetune", "freeze_unfreeze"}
    assert set(options("model")) >= {"resnet18", "resnet50", "mobilenet_v2", "efficientnet_lite0", "timm"}


@pytest.mark.parametrize(("group", "option"), ALL_OPTIONS)
def test_option_composes_and_targets_resolve(tmp_path, group, option):
    cfg = compose_train(tmp_path, [f"{group}={option}"])
    del cfg.hydra  # resolved by Hydra at run time, not here
    resolved = OmegaConf.to_container(cfg, resolve=True)  # every other interpolation resolves

    def targets(node):
        if isinstance(node, dict):
            if node.get("_target_"):
                yield node["_target_"]
            for value in node.values():
                yield from targets(value)
        elif isinstance(node, list):
            for value in node:
                yield from targets(value)

    for target in targets(resolved):
        assert callable(get_method(target)), target


def test_defaults_are_the_recommended_recipe(tmp_path):
    cfg = compose_train(tmp_path, [])
    assert cfg.data._target_.endswith("HotdogDataModule") and cfg.model.name == "resnet18"
    # the head alone for 1 epoch, then everything (benchmarks/peers.py)
    assert (cfg.strategy.name, cfg.strategy.unfreeze_at, cfg.strategy.head_lr_mult) == ("freeze_unfreeze", [1], 10)
    assert cfg.optimizer._target_ == "torch.optim.AdamW" and cfg.optimizer.filter_bias_and_bn is True
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.loss.label_smoothing) == (3e-4, 0.05, 0.1)
    assert cfg.scheduler._target_.endswith("warmup_cosine") and cfg.scheduler.interval == "step"
    assert (cfg.data.batch_size, cfg.data.val_fraction, cfg.trainer.max_epochs) == (32, 0.1, 5)
    # BatchNorm statistics as pretrained: measured better for every pretrained strategy (BENCHMARKS.md)
    assert cfg.strategy.bn == "eval"


def test_experiments_pin_their_recipes(tmp_path):
    d2l = compose_train(tmp_path, ["experiment=d2l_hotdog"])
    scratch = compose_train(tmp_path, ["experiment=d2l_hotdog_scratch"])
    mobilenet = compose_train(tmp_path, ["experiment=mobilenetv2_cifar10"])
    # d2l sums the loss over 128 images: 5e-5 summed = 6.4e-3 mean; scratch uses 10x for all weights.
    assert d2l.optimizer.lr == pytest.approx(5e-5 * 128) and d2l.strategy.head_lr_mult == 10
    assert d2l.data.val_fraction == 0 and d2l.optimizer._target_ == "torch.optim.SGD"
    assert d2l.optimizer.momentum == 0 and d2l.scheduler is None and d2l.data.batch_size == 128
    assert d2l.optimizer.filter_bias_and_bn is False  # d2l decays every weight, biases and BatchNorm included
    assert (d2l.loss.label_smoothing, d2l.loss.class_weights) == (0.0, None)
    assert (d2l.strategy.bn, d2l.model.head_init) == ("train", "default")
    assert scratch.optimizer.lr == pytest.approx(10 * d2l.optimizer.lr)
    assert scratch.strategy.pretrained is False and scratch.strategy.head_lr_mult == 1
    assert mobilenet.model.name == "mobilenet_v2" and mobilenet.data.image_size == 224
    assert mobilenet.strategy.unfreeze_at == [2] and mobilenet.strategy.backbone_lr_mult == 0.1
    assert (mobilenet.scheduler.step_size, mobilenet.scheduler.gamma, mobilenet.trainer.max_epochs) == (3, 0.1, 5)
    assert mobilenet.optimizer._target_ == "torch.optim.Adam" and mobilenet.optimizer.lr == 1e-3
    assert mobilenet.loss.label_smoothing == 0.0
    lp_ft = compose_train(tmp_path, ["experiment=lp_ft"])
    assert (lp_ft.strategy.unfreeze_at, lp_ft.strategy.bn, lp_ft.scheduler.gamma) == ([2], "eval", 0.1)
    bn = {name: compose_train(tmp_path, [f"strategy={name}"]).strategy.bn for name in ("gradual", "llrd", "scratch")}
    assert bn == {"gradual": "eval", "llrd": "eval", "scratch": "train"}

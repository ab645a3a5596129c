"""Config validation: every rule fires before any work starts and names the key; the CLI shows it cleanly."""

from __future__ import annotations

import pytest

import finetune.train
from finetune.errors import ConfigError, exit_on_user_error
from finetune.train import train
from finetune.validation import config_problems, validate
from tests.helpers import SMALL_MODEL, TINY, compose_train

BAD = {
    "optimizer.lr=0": "optimizer.lr=0 must be > 0",
    "optimizer.lr=-0.01": "optimizer.lr=-0.01 must be > 0",
    "strategy.head_lr_mult=0": "strategy.head_lr_mult=0 must be > 0",
    "strategy.backbone_lr_mult=-1": "strategy.backbone_lr_mult=-1 must be > 0",
    "strategy.layer_decay=0": "strategy.layer_decay=0 must be > 0",
    "data.batch_size=0": "data.batch_size=0 must be an integer >= 1",
    "trainer.max_epochs=0": (
        "trainer.max_epochs=0 must be an integer >= 1: 0 epochs train nothing; to test a checkpoint without training: "
        "python eval.py ckpt_path=..."
    ),
    "strategy.bn=frozen": "strategy.bn=frozen must be one of train, eval",
    "model.head_init=imagenet": "model.head_init=imagenet must be one of default, source",
    "loss.label_smoothing=1.0": "loss.label_smoothing=1.0 must be in [0, 1)",
    "data.image_size=16": "data.image_size=16 must be an integer >= 32 (pixels): the backbones shrink images 32x",
    "data.val_fraction=1.0": "data.val_fraction=1.0 must be in [0, 1) (0 = validate on the test split)",
    "data.augment=autoaugment": "data.augment=autoaugment must be one of d2l, trivialaugment, randaugment, none",
    "data.random_erasing=1.5": "data.random_erasing=1.5 must be a probability in [0, 1] (0 = off)",
    "data.mixup=-0.2": "data.mixup=-0.2 must be >= 0 (0 = off)",
    "data.sampler=weighted": "data.sampler=weighted must be one of shuffle, balanced",
    "data.folds=1": "data.folds=1 must be an integer >= 2 (null = no cross-validation)",
    "data.folds=2.5": "data.folds=2.5 must be an integer >= 2 (null = no cross-validation)",
    "data.folds=5 data.fold=5": "data.fold=5 must be one of 0..4 (data.folds=5; folds count from 0)",
    "data.folds=5 data.fold=-1": "data.fold=-1 must be one of 0..4 (data.folds=5; folds count from 0)",
    "data.fold=2": "data.fold=2 needs data.folds, the number of folds (e.g. data.folds=5 data.fold=2)",
    "strategy=freeze callbacks.feature_cache.enabled=true data.mixup=0.2 data.cutmix=1.0": (
        "data.mixup=0.2 and data.cutmix=1.0: MixUp and CutMix mix images, but callbacks.feature_cache.enabled=true "
        "trains on cached features: set the mix to 0 or callbacks.feature_cache.enabled=false"
    ),
}


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if train() gets as far as building the data or the model."""

    def build(cfg):
        raise AssertionError("work started before the config was validated")

    monkeypatch.setattr(finetune.train, "build", build)


@pytest.mark.parametrize("overrides", BAD)
def test_each_rule_stops_the_run_before_any_work_naming_the_key(tmp_path, no_work, overrides):
    cfg = compose_train(tmp_path, overrides.split())  # hotdog: a download if anything started
    with pytest.raises(ConfigError) as error:
        train(cfg)
    assert str(error.value) == f"Invalid config:\n  {BAD[overrides]}"
    assert not (tmp_path / "data").exists()


def test_stages_unfrozen_after_the_last_epoch_are_a_warning(tmp_path, caplog):
    # a short run of the default strategy (the head alone in epoch 0) is a probe, not a mistake
    validate(compose_train(tmp_path, ["strategy=gradual", "trainer.max_epochs=3"]))
    assert "strategy.unfreeze_at=[1, 2, 3, 4] with trainer.max_epochs=3" in caplog.text
    assert "unfrozen at epoch [3, 4] never train" in caplog.text
    caplog.clear()
    validate(compose_train(tmp_path, ["strategy=gradual", "trainer.max_epochs=5"]))
    assert "never train" not in caplog.text


def test_all_problems_are_listed_at_once(tmp_path):
    cfg = compose_train(tmp_path, ["optimizer.lr=-1", "strategy.head_lr_mult=0", "data.image_size=8"])
    assert [problem.split("=")[0] for problem in config_problems(cfg)] == [
        "optimizer.lr",
        "strategy.head_lr_mult",
        "data.image_size",
    ]


@pytest.mark.parametrize(
    "overrides",
    [[f"strategy={s}"] for s in ("scratch", "freeze", "finetune", "freeze_unfreeze", "gradual", "llrd")]
    + [[f"experiment={e}"] for e in ("d2l_hotdog", "d2l_hotdog_scratch", "mobilenetv2_cifar10")]
    + [["data=synthetic", "model=efficientnet_lite0"], ["data.image_size=32"]],
)
def test_the_shipped_configs_are_valid(tmp_path, overrides):
    assert config_problems(compose_train(tmp_path, overrides)) == []


def test_a_batch_larger_than_the_training_set_with_drop_last_stops_before_training(tmp_path, image_folder):
    # 24 training images, 10% of them for validation: 22 left to train on
    overrides = ["data=imagefolder", f"data.root={image_folder}", *TINY, *SMALL_MODEL]
    cfg = compose_train(tmp_path, [*overrides, "data.batch_size=64", "data.drop_last=true"])
    with pytest.raises(ConfigError, match=r"data.batch_size=64 is larger than the 22 training images and data.drop_l"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_problem_is_one_error_line_before_any_work(tmp_path):
    """What train.py prints (its `main` runs `train` under `exit_on_user_error`; the CLI's own Error lines are
    tested in tests/test_errors.py)."""
    cfg = compose_train(tmp_path, ["data=synthetic", "strategy.pretrained=false", "optimizer.lr=-1"])
    with pytest.raises(SystemExit) as stopped:
        exit_on_user_error(train, cfg)
    assert str(stopped.value.code).startswith("Error: Invalid config:\n  optimizer.lr=-1 must be > 0")
    assert not (tmp_path / "data").exists()  # the synthetic images were not generated

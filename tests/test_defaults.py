"""Every documented feature, switched on over the defaults a user gets: the recommended recipe (freeze_unfreeze,
AdamW, the per-step warmup_cosine schedule, label smoothing) and, where the feature needs one, a pretrained
backbone (EfficientNet-Lite0, whose ImageNet weights ship as a package).

`tests/helpers.py`'s TINY pins d2l's plain recipe (SGD, no schedule), which the mechanisms were written against;
a feature tested only there can break with the defaults unseen, as the feature cache did (issue 26: the per-step
schedule's step count built the training loader before the cache replaced the images by features). Only
`debug=tiny`'s size and speed settings are added here.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from finetune.builders import build, build_fit_trainer
from finetune.caching import CachedFeatures
from finetune.checkpoint import LAST, PROBE
from finetune.config import CONFIG_DIR
from finetune.report import _event_scalars
from finetune.train import train
from tests.helpers import compose_train

pytestmark = pytest.mark.usefixtures("one_thread")

# freeze_unfreeze unfreezes at epoch 1: both phases run; debug=tiny's one pass per epoch undone (the step budget a
# user gets: a small split is passed over again)
MIN_STEPS = OmegaConf.load(Path(CONFIG_DIR) / "data" / "_loader.yaml").min_steps_per_epoch
DEFAULTS = ["debug=tiny", "trainer.max_epochs=2", f"data.min_steps_per_epoch={MIN_STEPS}"]
SMALL = ["model=timm", "model.name=mobilenetv3_small_050", "strategy.pretrained=false"]  # no weights needed
PRETRAINED = ["model=efficientnet_lite0"]  # ImageNet weights, offline

# Each documented feature's overrides over the defaults; the model where the feature needs pretrained weights.
FEATURES = {
    "feature_cache": [*PRETRAINED, "strategy=freeze", "callbacks.feature_cache.enabled=true"],
    "feature_cache_views": [*PRETRAINED, "strategy=freeze", "callbacks.feature_cache.enabled=true"]
    + ["callbacks.feature_cache.views=2"],
    "ema": [*SMALL, "callbacks.ema.enabled=true"],
    "early_stopping": [*SMALL, "callbacks.early_stopping.enabled=true", "callbacks.early_stopping.patience=1"],
    "head_init_source": [*PRETRAINED, "model.head_init=source", "model.head_init_map={red: [1], blue: [2]}"],
    "balanced_sampler": [*SMALL, "data.sampler=balanced"],
    "balanced_class_weights": [*SMALL, "loss.class_weights=balanced"],
    "mixup_cutmix": [*SMALL, "data.mixup=0.2", "data.cutmix=1.0"],
    "trivialaugment_erasing": [*SMALL, "data.augment=trivialaugment", "data.random_erasing=0.25"],
    "cross_validation": [*SMALL, "data.folds=2", "data.fold=1"],
    "gradual": [*SMALL, "strategy=gradual", "strategy.unfreeze_at=[1]"],
    "llrd": [*SMALL, "strategy=llrd"],
    "no_validate_first": [*SMALL, "validate_first=false"],
}


def defaults_config(tmp_path: Path, image_folder: Path, *overrides: str):
    return compose_train(
        tmp_path,
        ["data=imagefolder", f"data.root={image_folder}", f"paths.data_dir={tmp_path / 'data'}", *DEFAULTS, *overrides],
    )


def test_defaults_are_the_recommended_recipe(tmp_path, image_folder):
    cfg = defaults_config(tmp_path, image_folder)
    assert cfg.strategy.name == "freeze_unfreeze" and cfg.optimizer._target_.endswith("AdamW")
    assert cfg.scheduler.interval == "step" and cfg.loss.label_smoothing > 0


def test_every_optional_callback_is_in_the_features():
    """A new `callbacks.<name>.enabled` switch gets its run with the defaults here."""
    callbacks = OmegaConf.load(Path(CONFIG_DIR) / "callbacks" / "default.yaml")
    switches = [name for name, entry in callbacks.items() if isinstance(entry, DictConfig) and "enabled" in entry]
    overrides = " ".join(" ".join(o) for o in FEATURES.values())
    assert switches and all(f"callbacks.{name}.enabled=true" in overrides for name in switches)


@pytest.mark.parametrize("feature", list(FEATURES))
def test_feature_runs_with_the_defaults(tmp_path, image_folder, feature):
    metrics = train(defaults_config(tmp_path, image_folder, *FEATURES[feature]))
    assert 0.0 <= metrics["test/acc"] <= 1.0 and torch.isfinite(torch.tensor(metrics["train/loss_epoch"]))
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def _probe(tmp_path: Path, image_folder: Path, *overrides: str):
    cfg = defaults_config(tmp_path, image_folder, *PRETRAINED, "strategy=freeze", "data.augment=none", *overrides)
    L.seed_everything(cfg.seed, workers=True)
    datamodule, model = build(cfg)
    build_fit_trainer(cfg).fit(model, datamodule=datamodule)
    return model, datamodule


def test_cached_probe_with_the_defaults_trains_the_same_head(tmp_path, image_folder):
    """The head trains on the features at every step of the per-step schedule, and to the same weights."""
    plain, _ = _probe(tmp_path / "plain", image_folder)
    cached, datamodule = _probe(tmp_path / "cached", image_folder, "callbacks.feature_cache.enabled=true")
    assert isinstance(datamodule.datasets["train"], CachedFeatures)
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(cached.head, name), getattr(plain.head, name), atol=1e-5, rtol=1e-4)


def test_a_resume_with_the_defaults_carries_the_folder_over(tmp_path, image_folder):
    """The recommended recipe on pretrained Lite0, 2 epochs, resumed into a new folder for a third: the probe and the
    best epoch's file are the interrupted run's (linked), the ranking goes on from its best score, and the curves
    from its points (finetune.checkpoint.CarryOver)."""
    train(defaults_config(tmp_path / "a", image_folder, *PRETRAINED))
    interrupted = tmp_path / "a" / "run"
    train(
        defaults_config(tmp_path / "b", image_folder, *PRETRAINED, "trainer.max_epochs=3", f"ckpt_path={interrupted}")
    )
    resumed = tmp_path / "b" / "run"
    assert (resumed / "checkpoints" / PROBE).samefile(interrupted / "checkpoints" / PROBE)
    old, new = (_event_scalars(run)["val/acc"] for run in (interrupted, resumed))
    assert {step: new[step] for step in old} == old and max(new) > max(old)
    (before, after) = (ranking(run / "checkpoints" / LAST) for run in (interrupted, resumed))
    third = new[max(new)]  # the resumed epoch's val/acc
    assert float(after["best_model_score"]) == pytest.approx(max(float(before["best_model_score"]), third))
    best = Path(after["best_model_path"])
    assert best.parent == resumed / "checkpoints" and best.is_file()
    if best.name == Path(before["best_model_path"]).name:  # the third epoch did not beat it
        assert best.samefile(before["best_model_path"])


def ranking(path: Path) -> dict:
    """The state of the checkpoint's ModelCheckpoint that ranks the epochs by val/acc."""
    states = torch.load(path, map_location="cpu", weights_only=True)["callbacks"]
    (key,) = (key for key in states if key.startswith("ModelCheckpoint{'monitor': 'val/acc'"))
    return states[key]

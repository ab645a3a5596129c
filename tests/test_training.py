"""Real tiny fits on generated images: strategies, model families, param groups, freezing, resume."""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import open_dict

from finetune.builders import build
from finetune.callbacks import ModelSummary
from finetune.finetuning import StageUnfreezing
from finetune.train import train
from tests.helpers import SMALL_MODEL, TINY, compose_train


def checkpoint(run_dir: Path, name: str = "last.ckpt") -> dict:
    return torch.load(run_dir / "run" / "checkpoints" / name, map_location="cpu", weights_only=True)


def params(state: dict, prefix: str, buffers: bool = True) -> dict[str, torch.Tensor]:
    is_buffer = ("running_mean", "running_var", "num_batches_tracked")
    return {k: v for k, v in state.items() if k.startswith(prefix) and (buffers or not k.endswith(is_buffer))}


def fresh_model(cfg):
    """The model exactly as train() builds it before fitting (same seed, same init)."""
    L.seed_everything(cfg.seed, workers=True)
    return build(cfg)[1]


def fit(tmp_path: Path, image_folder: Path, *overrides: str):
    cfg = compose_train(tmp_path, ["data=imagefolder", f"data.root={image_folder}", *TINY, *overrides])
    return cfg, train(cfg)


@pytest.mark.parametrize("strategy", ["scratch", "freeze", "finetune", "freeze_unfreeze", "gradual", "llrd"])
def test_every_strategy_fits(tmp_path, image_folder, strategy):
    extra = ["strategy.unfreeze_at=[1]"] if strategy == "freeze_unfreeze" else []
    extra += ["strategy.unfreeze_at=[1]"] if strategy == "gradual" else []
    cfg, metrics = fit(tmp_path, image_folder, f"strategy={strategy}", *SMALL_MODEL, "trainer.max_epochs=2", *extra)
    assert 0.0 <= metrics["test/acc"] <= 1.0 and np.isfinite(metrics["train/loss_epoch"])
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize(
    "model",
    [
        ["model=resnet18", "strategy.pretrained=false"],
        ["model=resnet50", "strategy.pretrained=false"],
        ["model=mobilenet_v2", "strategy.pretrained=false"],
        ["model=efficientnet_lite0"],
        ["model=timm", "model.name=mobilenetv3_small_050", "strategy.pretrained=false"],
    ],
    ids=lambda m: m[0].split("=")[1],
)
def test_every_model_family_finetunes(tmp_path, image_folder, model):
    cfg, metrics = fit(tmp_path, image_folder, *model)
    before, after = fresh_model(cfg).state_dict(), checkpoint(tmp_path)["state_dict"]
    assert before.keys() == after.keys()
    changed = [k for k, v in params(after, "backbone.", buffers=False).items() if not torch.equal(v, before[k])]
    assert changed, "finetune must train the backbone"
    assert cfg and metrics["test/acc"] >= 0.0


def test_optimizer_has_named_groups_with_head_at_10x(tmp_path):
    cfg = compose_train(tmp_path, ["strategy.pretrained=false", "optimizer=sgd", "scheduler=none", "optimizer.lr=0.01"])
    model = build(cfg)[1]
    optimizer = model.configure_optimizers()["optimizer"]
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert list(groups) == ["backbone", "head"]
    assert groups["backbone"]["lr"] == pytest.approx(0.01) and groups["head"]["lr"] == pytest.approx(0.1)
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each parameter exactly once


def test_freeze_changes_neither_backbone_weights_nor_bn_stats(tmp_path, image_folder):
    cfg, _ = fit(tmp_path, image_folder, "model=efficientnet_lite0", "strategy=freeze", "trainer.max_epochs=2")
    before, after = fresh_model(cfg).state_dict(), checkpoint(tmp_path)["state_dict"]
    backbone = params(after, "backbone.")
    assert any("running_mean" in k for k in backbone)
    assert all(torch.equal(v, before[k]) for k, v in backbone.items()), "a frozen backbone changed"
    assert not torch.equal(after["head.weight"], before["head.weight"]), "the head must train"


def _backbone_delta(tmp_path: Path, image_folder: Path, backbone_lr_mult: float) -> torch.Tensor:
    """Backbone change of freeze_unfreeze: frozen in epoch 0, one SGD step in epoch 1."""
    cfg, _ = fit(
        tmp_path,
        image_folder,
        "strategy=freeze_unfreeze",
        "strategy.unfreeze_at=[1]",
        f"strategy.backbone_lr_mult={backbone_lr_mult}",
        *SMALL_MODEL,
        "optimizer.weight_decay=0",
        "trainer.max_epochs=2",
        "+trainer.limit_train_batches=1",
        "trainer.deterministic=true",
        "callbacks.model_checkpoint.save_top_k=-1",
    )
    initial = params(fresh_model(cfg).state_dict(), "backbone.", buffers=False)
    epoch0 = params(checkpoint(tmp_path, "epoch_000.ckpt")["state_dict"], "backbone.", buffers=False)
    final = checkpoint(tmp_path)
    assert all(torch.equal(v, initial[k]) for k, v in epoch0.items()), "backbone trained before the unfreeze epoch"
    lrs = {g["name"]: g["lr"] for g in final["optimizer_states"][0]["param_groups"]}
    assert lrs["backbone"] == pytest.approx(cfg.optimizer.lr * backbone_lr_mult)
    assert final["callbacks"]["StageUnfreezing"]["trainable_stages"] == 5  # all stages of resnet18
    last = params(final["state_dict"], "backbone.", buffers=False)
    return torch.cat([(last[k] - epoch0[k]).flatten() for k in sorted(last)])


def test_freeze_unfreeze_flips_at_the_epoch_and_trains_at_the_scaled_lr(tmp_path, image_folder):
    delta_1 = _backbone_delta(tmp_path / "a", image_folder, 0.1)
    delta_2 = _backbone_delta(tmp_path / "b", image_folder, 0.2)
    assert delta_1.abs().max() > 0, "the backbone did not train after the unfreeze epoch"
    # Same gradient, twice the lr (up to float32 rounding of the weights themselves).
    assert (delta_2.norm() / delta_1.norm()).item() == pytest.approx(2.0, rel=1e-3)
    torch.testing.assert_close(delta_2, 2 * delta_1, rtol=1e-3, atol=1e-6)


def test_resumed_run_after_the_unfreeze_epoch_is_still_unfrozen(tmp_path, image_folder):
    common = [
        "strategy=freeze_unfreeze",
        "strategy.unfreeze_at=[1]",
        *SMALL_MODEL,
        "callbacks.model_checkpoint.save_top_k=-1",
    ]
    fit(tmp_path, image_folder, *common, "trainer.max_epochs=2")
    resume_from = tmp_path / "run" / "checkpoints" / "epoch_001.ckpt"
    assert torch.load(resume_from, weights_only=True)["callbacks"]["StageUnfreezing"]["trainable_stages"] == 5

    cfg = compose_train(
        tmp_path / "resumed",
        ["data=imagefolder", f"data.root={image_folder}", *TINY, *common, "trainer.max_epochs=3"],
    )
    with open_dict(cfg):
        cfg.ckpt_path = str(resume_from)
        cfg.callbacks.spy = {"_target_": f"{__name__}.StageSpy"}
    StageSpy.seen = seen = []
    train(cfg)
    assert seen and all(s == (0, True) for s in seen), f"resumed run trained with frozen stages: {seen}"


class StageSpy(L.Callback):
    """Records how many backbone stages are frozen at every training step."""

    seen: list[tuple[int, bool]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((pl_module.backbone.frozen_stages, pl_module.backbone.stages[0].training))


def test_stage_unfreezing_schedules():
    assert [StageUnfreezing(trainable=0).trainable_at(e, 5) for e in range(3)] == [0, 0, 0]
    assert [StageUnfreezing(trainable="all").trainable_at(e, 5) for e in range(3)] == [5, 5, 5]
    flip = StageUnfreezing(trainable=0, unfreeze_at=[2], unfreeze_step="all")
    assert [flip.trainable_at(e, 5) for e in range(4)] == [0, 0, 5, 5]
    gradual = StageUnfreezing(trainable=0, unfreeze_at=[1, 2, 3], unfreeze_step=1)
    assert [gradual.trainable_at(e, 5) for e in range(5)] == [0, 1, 2, 3, 3]


def _write_fake_cifar10(root: Path) -> None:
    """torchvision's on-disk CIFAR-10 format (pickled batches of 32x32 uint8 rows), tiny."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        labels = list(range(10)) * 2
        data = rng.integers(0, 256, (len(labels), 3 * 32 * 32), dtype=np.uint8)
        with open(folder / name, "wb") as file:
            pickle.dump({"data": data, "labels": labels}, file)
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as file:
        pickle.dump({"label_names": classes}, file)


def test_fake_cifar10_in_torchvision_format(tmp_path, monkeypatch):
    from torchvision.datasets import cifar

    _write_fake_cifar10(tmp_path / "cifar")
    monkeypatch.setattr(cifar, "check_integrity", lambda *args: True)  # the fake has other md5 sums
    cfg = compose_train(
        tmp_path, ["data=cifar10", f"data.root={tmp_path / 'cifar'}", "strategy.pretrained=false", *TINY]
    )
    metrics = train(cfg)
    assert cfg.data.root.endswith("cifar") and 0.0 <= metrics["test/acc"] <= 1.0
    datamodule = build(cfg)[0]
    datamodule.setup("fit")
    assert len(datamodule.datasets["train"]) == 90 and len(datamodule.datasets["test"]) == 20
    assert datamodule.num_classes == 10


def test_csv_logger_records_the_final_metrics(tmp_path, image_folder):
    _, metrics = fit(tmp_path, image_folder, "logger=csv", *SMALL_MODEL)
    header = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"test/acc", "val/acc", "train/loss_epoch", "lr-SGD/head"} <= set(header)
    assert "optimizer" in (tmp_path / "run" / "csv" / "hparams.yaml").read_text()
    assert metrics["test/acc"] >= 0.0


@pytest.mark.parametrize(
    ("compiled", "rank_zero", "counted"), [(False, True, True), (True, True, False), (False, False, False)]
)
def test_the_summary_counts_the_flops_of_one_image_on_rank_zero_unless_the_stages_are_compiled(
    tmp_path, compiled, rank_zero, counted
):
    """Lightning counts FLOPs in a forward pass of the model's `example_input_array`, set for the summary alone, on
    the rank that prints it; compiled stages would compile again for that one image (47 s more for Lite0 on a CPU)."""
    _, model = build(compose_train(tmp_path, [*TINY, *SMALL_MODEL, f"model.compile={compiled}"]))
    shapes = []
    model.forward = lambda images: (
        shapes.append(tuple(images.shape)) or model.head(torch.zeros(1, model.head.in_features))
    )
    ModelSummary().on_fit_start(SimpleNamespace(strategy=None, is_global_zero=rank_zero), model)
    size = model.input_config.image_size
    assert shapes == ([(1, 3, size, size)] if counted else []) and model.example_input_array is None

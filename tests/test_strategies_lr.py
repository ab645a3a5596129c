"""The lr every param group actually trains with under `gradual` and `llrd`, also across a resume.

The probe measures the lr from the update itself: plain SGD (no momentum, no weight decay) moves
the weights by -lr * grad, so lr = (before - after) . grad / (grad . grad). A frozen group has no
grad and must not move.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import open_dict

from finetune.models.backbones import timm_backbone, torchvision_backbone
from finetune.train import train
from tests.helpers import SMALL_MODEL, TINY, compose_train

LR = 0.05
STAGES = 5  # timm test_resnet (tests.helpers.SMALL_MODEL): stem and 4 stages, as resnet18


class LrProbe(L.Callback):
    """Per epoch and group (first step of the epoch): the lr in the optimizer and the lr the update used."""

    last: LrProbe | None = None

    def __init__(self):
        self.configured: dict[int, dict[str, float]] = {}
        self.used: dict[int, dict[str, float]] = {}
        LrProbe.last = self

    def on_fit_start(self, trainer, pl_module):
        self.start = {k: v.clone() for k, v in pl_module.backbone.state_dict().items()}

    def on_fit_end(self, trainer, pl_module):
        self.end = {k: v.clone() for k, v in pl_module.backbone.state_dict().items()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before = [
            (g["name"], g["lr"], [(p, p.detach().clone(), p.grad) for p in g["params"]]) for g in optimizer.param_groups
        ]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx:
            return
        epoch = trainer.current_epoch
        self.configured[epoch], self.used[epoch] = {}, {}
        for name, lr, params in self.before:
            with_grad = [(p, old, g) for p, old, g in params if g is not None]
            if not with_grad:
                assert all(torch.equal(p, old) for p, old, _ in params), f"frozen group {name} moved"
            step = sum(float(((old - p.detach()).double() * g.double()).sum()) for p, old, g in with_grad)
            norm = sum(float(g.double().pow(2).sum()) for _, _, g in with_grad)
            self.configured[epoch][name], self.used[epoch][name] = lr, step / norm if norm else 0.0


def run(root: Path, image_folder: Path, *overrides: str, ckpt_path: Path | None = None):
    cfg = compose_train(
        root,
        [
            "data=imagefolder",
            f"data.root={image_folder}",
            *TINY,
            *SMALL_MODEL,
            "+trainer.limit_train_batches=1",  # the probe looks at the first step of each epoch
            f"optimizer.lr={LR}",
            "optimizer=sgd",
            "optimizer.momentum=0",
            "optimizer.weight_decay=0",
            "callbacks.model_checkpoint.save_top_k=-1",
            "trainer.precision=64-true",  # so that the measured lr is exact even for tiny updates
            *overrides,
        ],
    )
    with open_dict(cfg):
        cfg.callbacks.lr_probe = {"_target_": f"{__name__}.LrProbe"}
        cfg.ckpt_path = str(ckpt_path) if ckpt_path else None
    metrics = train(cfg)
    return LrProbe.last, metrics


def cosine(epoch: int, epochs: int = 3) -> float:
    return (1 + math.cos(math.pi * epoch / epochs)) / 2


@pytest.mark.parametrize(
    "strategy, mults, trainable",
    [
        (
            ["strategy=llrd"],  # stage k of K at lr * 0.7 ** (K - k), the head at lr; all train from the start
            {f"stage{k}": 0.7 ** (STAGES - k) for k in range(STAGES)} | {"head": 1.0},
            lambda epoch: range(STAGES),
        ),
        (
            ["strategy=gradual", "strategy.unfreeze_at=[1,2]"],  # one more stage from the top per epoch (ULMFiT)
            {f"stage{k}": 0.385 ** (STAGES - k) for k in range(STAGES)} | {"head": 1.0},
            lambda epoch: range(STAGES - epoch, STAGES),
        ),
    ],
    ids=["llrd", "gradual"],
)
def test_every_group_trains_at_its_lr_also_after_a_resume(tmp_path, image_folder, strategy, mults, trainable):
    common = [*strategy, "scheduler=cosine", "trainer.max_epochs=3"]
    whole, metrics = run(tmp_path / "whole", image_folder, *common)
    checkpoint = tmp_path / "whole" / "run" / "checkpoints" / "epoch_001.ckpt"
    resumed, _ = run(tmp_path / "resumed", image_folder, *common, ckpt_path=checkpoint)

    assert list(whole.configured[0]) == [*(f"stage{k}" for k in range(STAGES)), "head"]
    for epoch in range(3):
        lrs = {name: LR * mult * cosine(epoch) for name, mult in mults.items()}
        used = {name: lr if name == "head" or int(name[5:]) in trainable(epoch) else 0.0 for name, lr in lrs.items()}
        assert whole.configured[epoch] == pytest.approx(lrs, rel=1e-9), f"epoch {epoch}"
        assert whole.used[epoch] == pytest.approx(used, rel=1e-6, abs=1e-12), f"epoch {epoch}"
    logged = {name: metrics[f"lr-SGD/{name}"] for name in mults}  # what TensorBoard shows, last epoch
    assert logged == pytest.approx(whole.configured[2], rel=1e-6)

    for k in range(STAGES):  # weights and BatchNorm statistics of a stage that never trained stay as they were
        stage = {name: v for name, v in whole.start.items() if name.startswith(f"stages.{k}.")}
        unchanged = all(torch.equal(v, whole.end[name]) for name, v in stage.items())
        assert unchanged == (k not in trainable(2)), f"stage{k}"

    assert list(resumed.used) == [2], "the resumed run must start at epoch 2"
    assert resumed.configured[2] == pytest.approx(whole.configured[2], rel=1e-9)
    assert resumed.used[2] == pytest.approx(whole.used[2], rel=1e-6, abs=1e-12)


@pytest.mark.parametrize(
    "factory, name, stages",
    [
        (torchvision_backbone, "resnet18", 5),
        (torchvision_backbone, "resnet50", 5),
        (torchvision_backbone, "mobilenet_v2", 5),
        (timm_backbone, "tf_efficientnet_lite0", 5),  # model=efficientnet_lite0
        (timm_backbone, "resnet18", 5),  # model=timm: one stage per feature_info level
        (timm_backbone, "convnext_atto", 4),
        (timm_backbone, "vit_tiny_patch16_224", 1),  # forward is not a chain of children: one stage
    ],
)
def test_every_model_family_has_stages_for_gradual_and_llrd(factory, name, stages):
    backbone = factory(name, pretrained=False)
    assert backbone.num_stages == stages
    assert all(any(True for _ in stage.parameters()) for stage in backbone.stages)

"""Per-step lr schedules, the loss, weight decay groups, BatchNorm in eval, clipping, early stopping.

The lr every group trains with is measured from the update itself, as in `tests/test_strategies_lr.py`: plain SGD
(no momentum, no weight decay) moves the weights by -lr * grad, so lr = (before - after) . grad / (grad . grad).
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from omegaconf import open_dict

from finetune.builders import build
from finetune.errors import ConfigError
from finetune.train import train
from tests.helpers import SMALL_MODEL, TINY, compose_train, make_image_folder

LR = 0.05
STEPS = 3  # per epoch: 22 training images (val_fraction 0.1 of 24), batch 8
MULTS = {"backbone": 1.0, "head": 10.0}  # strategy=freeze_unfreeze


class StepProbe(L.Callback):
    """At every optimizer step: each group's lr in the optimizer, the lr its update used, and the update's norm."""

    last: StepProbe | None = None

    def __init__(self):
        self.configured: dict[int, dict[str, float]] = {}
        self.used: dict[int, dict[str, float]] = {}
        self.update_norm: dict[int, float] = {}
        StepProbe.last = self

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before = [
            (g["name"], g["lr"], [(p, p.detach().clone(), p.grad) for p in g["params"]]) for g in optimizer.param_groups
        ]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1
        self.configured[step], self.used[step], squares = {}, {}, 0.0
        for name, lr, params in self.before:
            with_grad = [(p, old, g) for p, old, g in params if g is not None]
            moved = sum(float(((old - p.detach()).double() * g.double()).sum()) for p, old, g in with_grad)
            norm = sum(float(g.double().pow(2).sum()) for _, _, g in with_grad)
            squares += sum(float((old - p.detach()).double().pow(2).sum()) for p, old, _ in params)
            self.configured[step][name], self.used[step][name] = lr, moved / norm if norm else 0.0
        self.update_norm[step] = math.sqrt(squares)


def run(root: Path, image_folder: Path, *overrides: str, ckpt_path: Path | None = None) -> tuple[StepProbe, dict]:
    cfg = compose_train(
        root,
        [
            "data=imagefolder",
            f"data.root={image_folder}",
            *TINY,
            *SMALL_MODEL,
            f"optimizer.lr={LR}",
            "optimizer=sgd",
            "optimizer.momentum=0",
            "optimizer.weight_decay=0",
            "callbacks.model_checkpoint.save_top_k=-1",
            "trainer.precision=64-true",  # the measured lr is exact even for tiny updates
            *overrides,
        ],
    )
    with open_dict(cfg):
        cfg.callbacks.step_probe = {"_target_": f"{__name__}.StepProbe"}
        cfg.ckpt_path = str(ckpt_path) if ckpt_path else None
    metrics = train(cfg)
    return StepProbe.last, metrics


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Linear warmup (step s at (s+1)/(warmup+1)), then cosine to 0 at `total`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) / 2


def slanted_triangle(step: int, peak: int, total: int, ratio: float = 32.0) -> float:
    """ULMFiT's slanted triangular lr as OneCycleLR makes it: lr/ratio up to lr at step `peak`, back to lr/ratio."""
    low = 1 / ratio
    if step <= peak:
        return low + (1 - low) * step / peak
    return 1 + (low - 1) * (step - peak) / (total - 1 - peak)


FREEZE_UNFREEZE = ["strategy=freeze_unfreeze", "strategy.unfreeze_at=[1]", "trainer.max_epochs=2"]


@pytest.mark.parametrize(
    "schedule, factor",
    [
        (["scheduler=warmup_cosine", "scheduler.warmup=2"], lambda s: warmup_cosine(s, 2, 2 * STEPS)),
        (["scheduler=warmup_cosine", "scheduler.warmup=0.5"], lambda s: warmup_cosine(s, 3, 2 * STEPS)),  # 50% of 6
        (["scheduler=one_cycle", "scheduler.pct_start=0.5"], lambda s: slanted_triangle(s, 2, 2 * STEPS)),
    ],
    ids=["warmup_steps", "warmup_fraction", "one_cycle"],
)
def test_per_step_schedules_keep_every_group_at_its_multiplier_through_unfreeze_and_resume(
    tmp_path, image_folder, schedule, factor
):
    whole, metrics = run(tmp_path / "whole", image_folder, *FREEZE_UNFREEZE, *schedule)
    resumed, _ = run(
        tmp_path / "resumed",
        image_folder,
        *FREEZE_UNFREEZE,
        *schedule,
        ckpt_path=tmp_path / "whole" / "run" / "checkpoints" / "epoch_000.ckpt",
    )
    assert sorted(whole.configured) == list(range(2 * STEPS))
    for step in range(2 * STEPS):
        lrs = {name: LR * mult * factor(step) for name, mult in MULTS.items()}
        trains = {"head": lrs["head"], "backbone": lrs["backbone"] if step >= STEPS else 0.0}  # unfrozen at epoch 1
        assert whole.configured[step] == pytest.approx(lrs, rel=1e-9), f"step {step}"
        assert whole.used[step] == pytest.approx(trains, rel=1e-6, abs=1e-12), f"step {step}"
    assert sorted(resumed.configured) == list(range(STEPS, 2 * STEPS)), "the resumed run starts at epoch 1"
    for step in range(STEPS, 2 * STEPS):
        assert resumed.configured[step] == pytest.approx(whole.configured[step], rel=1e-12), f"step {step}"
        assert resumed.used[step] == pytest.approx(whole.used[step], rel=1e-6, abs=1e-12), f"step {step}"
    # LearningRateMonitor logs each step's lr before the step (its last value: the last step's)
    assert metrics["lr-SGD/head"] == pytest.approx(whole.configured[2 * STEPS - 1]["head"], rel=1e-6)


def test_warmup_longer_than_the_run_names_the_key(tmp_path, image_folder):
    with pytest.raises(ConfigError, match=r"scheduler.warmup=10 is 10 steps, but the run has only 3"):
        run(tmp_path, image_folder, "scheduler=warmup_cosine", "scheduler.warmup=10", "trainer.max_epochs=1")


def test_gradient_clipping_clips_the_update(tmp_path, image_folder):
    clip = 1e-3
    probe, _ = run(tmp_path, image_folder, f"trainer.gradient_clip_val={clip}", "strategy.head_lr_mult=1")
    for step, norm in probe.update_norm.items():  # one lr for all: update = lr * clipped grad
        assert norm / LR == pytest.approx(clip, rel=1e-6), f"step {step}"


def test_early_stopping_stops_when_val_acc_stops_improving(tmp_path, image_folder):
    _, metrics = run(
        tmp_path,
        image_folder,
        "callbacks.early_stopping.enabled=true",
        "callbacks.early_stopping.patience=1",
        "optimizer.lr=1e-12",  # nothing changes: val/acc never improves after epoch 0
        "trainer.max_epochs=5",
    )
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("epoch_*.ckpt"))
    assert saved == ["epoch_000.ckpt", "epoch_001.ckpt"]


def tiny_model(tmp_path: Path, image_folder: Path, *overrides: str):
    cfg = compose_train(
        tmp_path, ["data=imagefolder", f"data.root={image_folder}", *TINY, "strategy.pretrained=false", *overrides]
    )
    L.seed_everything(0)
    return build(cfg)


def by_hand(logits, labels, weight, smoothing):
    """PyTorch's cross-entropy with class weights and label smoothing, written out (mean over the weight of the
    labels for class indices, over the batch for probabilities)."""
    log_p = logits.log_softmax(1)
    classes = logits.shape[1]
    if labels.ndim == 1:
        nll = -(weight[labels] * log_p.gather(1, labels[:, None])[:, 0]).sum() / weight[labels].sum()
        uniform = -(log_p * weight).sum(1).sum() / weight[labels].sum() / classes
        return (1 - smoothing) * nll + smoothing * uniform
    targets = (1 - smoothing) * labels + smoothing / classes
    return -(targets * log_p * weight).sum(1).mean()


def test_loss_is_weighted_smoothed_cross_entropy_also_on_soft_targets(tmp_path, image_folder):
    _, model = tiny_model(tmp_path, image_folder, "loss.label_smoothing=0.2", "loss.class_weights=[1.0,3.0]")
    weight = torch.tensor([1.0, 3.0])
    torch.testing.assert_close(model.criterion.class_weights, weight)
    logits = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 1, 0, 1, 1])
    soft = torch.tensor([[0.7, 0.3], [0.2, 0.8], [0.5, 0.5], [1.0, 0.0], [0.1, 0.9], [0.4, 0.6]])  # MixUp-like
    for targets in (labels, soft):
        expected = by_hand(logits, targets, weight, 0.2)
        torch.testing.assert_close(model.criterion(logits, targets), expected)
        torch.testing.assert_close(
            expected, F.cross_entropy(logits, targets, weight=weight, label_smoothing=0.2), rtol=1e-6, atol=1e-7
        )
    model.validation_step((torch.zeros(6, 3, 32, 32), soft), 0)  # accuracy against the argmax of soft targets
    predicted = model(torch.zeros(6, 3, 32, 32)).argmax(1)
    assert model.val_metrics.acc.compute() == pytest.approx((predicted == soft.argmax(1)).double().mean().item())


def test_default_loss_is_plain_cross_entropy(tmp_path, image_folder):
    _, model = tiny_model(tmp_path, image_folder)
    logits, labels = torch.randn(5, 2), torch.tensor([0, 1, 1, 0, 1])
    assert model.criterion.class_weights is None and model.criterion.label_smoothing == 0.0
    torch.testing.assert_close(model.criterion(logits, labels), F.cross_entropy(logits, labels))


def test_balanced_class_weights_from_a_skewed_training_split(tmp_path):
    images = make_image_folder(tmp_path / "images", classes=("a", "b", "c"), train=12)
    for path in sorted((images / "train" / "b").iterdir())[4:]:  # b keeps 4 of its 12 training images
        path.unlink()
    for path in sorted((images / "train" / "c").iterdir())[6:]:  # c keeps 6
        path.unlink()
    datamodule, model = tiny_model(tmp_path, images, "data.val_fraction=0", "loss.class_weights=balanced")
    assert datamodule.class_counts() == [12, 4, 6]
    expected = [22 / (3 * 12), 22 / (3 * 4), 22 / (3 * 6)]  # n_samples / (n_classes * count_c)
    torch.testing.assert_close(model.criterion.class_weights, torch.tensor(expected))
    with pytest.raises(ConfigError, match=r"loss.class_weights=\[1.0, 2.0\] must be null, balanced or a list of 3"):
        tiny_model(tmp_path, images, "loss.class_weights=[1.0,2.0]")


def test_no_weight_decay_on_biases_and_norm_weights(tmp_path, image_folder):
    _, model = tiny_model(tmp_path, image_folder, "optimizer.filter_bias_and_bn=true", "optimizer.weight_decay=0.01")
    model.hparams.scheduler = None  # configure_optimizers without a trainer: no schedule
    optimizer = model.configure_optimizers()["optimizer"]
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert list(groups) == ["backbone", "backbone_no_decay", "head", "head_no_decay"]
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in ("backbone_no_decay", "head_no_decay") for p in groups[g]["params"]}
    decay = {names[id(p)] for g in ("backbone", "head") for p in groups[g]["params"]}
    assert no_decay == {n for n, p in model.named_parameters() if n.endswith(".bias") or p.ndim == 1}
    assert "backbone.stages.0.1.weight" in no_decay and "head.bias" in no_decay  # resnet18's first BatchNorm
    assert decay == {n for n, p in model.named_parameters() if p.ndim > 1} and "head.weight" in decay
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0, 0.01, 0.0]
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([6.4e-3, 6.4e-3, 6.4e-2, 6.4e-2])


def bn_state(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith("backbone.") and "running_" in k}


@pytest.mark.parametrize(
    ("bn", "pretrained", "kept"),
    [("eval", "true", True), ("train", "true", False), ("eval", "false", False)],  # a random init's are not kept
)
def test_bn_eval_keeps_the_statistics_while_the_stage_trains(tmp_path, image_folder, bn, pretrained, kept):
    overrides = [*TINY, "model=efficientnet_lite0", f"strategy.bn={bn}", f"strategy.pretrained={pretrained}"]
    cfg = compose_train(tmp_path, ["data=imagefolder", f"data.root={image_folder}", *overrides])
    L.seed_everything(cfg.seed)
    before = build(cfg)[1].state_dict()
    train(cfg)
    after = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    stats = bn_state(after)
    assert stats and all(torch.equal(v, before[k]) for k, v in stats.items()) == kept
    bn_weights = [k[: -len("running_mean")] + "weight" for k in stats if k.endswith("running_mean")]
    assert all(not torch.equal(after[k], before[k]) for k in bn_weights), "BatchNorm weights must train"
    assert not torch.equal(after["backbone.stages.0.0.weight"], before["backbone.stages.0.0.weight"])

"""Augmentation presets, MixUp/CutMix and the class-balanced sampler: every batch still depends only on
(seed, epoch, sample), so it is the same with 0 or 2 workers, across ranks and after a mid-epoch resume."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from finetune.data.datamodule import ImageFolderDataModule
from finetune.data.sampling import BalancedSampler, SeededSampler
from finetune.data.transforms import train_transform
from finetune.models import InputConfig
from tests.helpers import doc_commands, make_image_folder, run_cli

CONFIG = InputConfig(32, (0.5,) * 3, (0.5,) * 3)
OPTIONS = {
    "d2l": {},
    "none": {"augment": "none"},
    "trivialaugment": {"augment": "trivialaugment"},
    "randaugment": {"augment": "randaugment"},
    "random_erasing": {"random_erasing": 0.5},
    "mixup": {"mixup": 0.4},
    "cutmix": {"cutmix": 1.0},
    "mixup+cutmix": {"mixup": 0.4, "cutmix": 1.0},
    "balanced": {"sampler": "balanced"},
}


def imbalanced_folder(root: Path, blue: int, red: int) -> Path:
    """`make_image_folder` with `blue` training images of one class and `red` of the other (6 test images each)."""
    make_image_folder(root, train=max(blue, red), test=6)
    for name, keep in (("blue", blue), ("red", red)):
        for path in sorted((root / "train" / name).iterdir())[keep:]:
            path.unlink()
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return imbalanced_folder(tmp_path_factory.mktemp("images"), blue=24, red=8)  # 4 batches of 8


def datamodule(images: Path, workers: int = 0, **options) -> ImageFolderDataModule:
    data = ImageFolderDataModule(CONFIG, images, batch_size=8, val_fraction=0, num_workers=workers, **options)
    data.setup()
    return data


def epoch(loader, number: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.sampler.set_epoch(number)
    return [(images, labels) for images, labels in loader]


@pytest.mark.parametrize("name", OPTIONS)
def test_each_option_gives_the_same_batches_with_0_or_2_workers_and_after_a_resume(images, name):
    main = datamodule(images, **OPTIONS[name]).train_dataloader()
    workers = datamodule(images, 2, **OPTIONS[name]).train_dataloader()  # persistent: their state spans epochs
    for number in (0, 1):
        torch.testing.assert_close(epoch(main, number), epoch(workers, number), rtol=0, atol=0)
    assert not torch.equal(epoch(main, 0)[0][0], epoch(main, 1)[0][0])  # a new draw each epoch

    resumed = datamodule(images, **OPTIONS[name]).train_dataloader()
    resumed.load_state_dict({"epoch": 1, "batches": 2})
    torch.testing.assert_close(epoch(resumed, 1), epoch(main, 1)[2:], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["trivialaugment", "randaugment", "random_erasing", "cutmix"])
def test_each_option_changes_the_images_of_d2l(images, name):
    """The same samples and crops (the same seeds), then the policy, erasing or mix on top."""
    (d2l_images, d2l_labels), *_ = epoch(datamodule(images).train_dataloader(), 0)
    (other_images, other_labels), *_ = epoch(datamodule(images, **OPTIONS[name]).train_dataloader(), 0)
    assert not torch.equal(other_images, d2l_images)
    if name != "cutmix":
        assert torch.equal(other_labels, d2l_labels)  # the same samples


def test_mixup_mixes_each_batch_with_itself_rolled_and_gives_soft_labels(images):
    plain = epoch(datamodule(images).train_dataloader(), 0)
    mixed = epoch(datamodule(images, mixup=0.4).train_dataloader(), 0)
    checked = 0
    for (x, y), (mixed_x, soft) in zip(plain, mixed, strict=True):
        one_hot = F.one_hot(y, 2).float()
        assert soft.shape == (len(y), 2) and torch.allclose(soft.sum(1), torch.ones(len(y)))
        differs = (y != y.roll(1)).nonzero()
        if len(differs):  # lam = the weight of the sample itself, one per batch
            row = int(differs[0])
            lam = float(soft[row, y[row]])
            torch.testing.assert_close(soft, lam * one_hot + (1 - lam) * one_hot.roll(1, 0))
            torch.testing.assert_close(mixed_x, lam * x + (1 - lam) * x.roll(1, 0))
            checked += 1
    assert checked >= 2


def test_booleans_of_older_configs_mean_d2l_and_none(images):
    assert datamodule(images, augment=True).augment == "d2l" and datamodule(images, augment=False).augment == "none"
    assert repr(datamodule(images, augment=True).train_transform) == repr(train_transform(CONFIG, "d2l"))
    assert repr(datamodule(images, augment=False).train_transform) == repr(datamodule(images).eval_transform)
    assert not datamodule(images, augment="none").augmented
    assert datamodule(images, augment="none", random_erasing=0.1).augmented  # the feature cache stores views


def test_the_balanced_sampler_draws_classes_evenly():
    labels = [0] * 90 + [1] * 10  # 9:1
    sampler = BalancedSampler(list(range(100)), labels, seed=3)
    draws = []
    for number in range(50):
        sampler.set_epoch(number)
        epoch_draws = list(sampler)
        assert len(epoch_draws) == 100
        draws += epoch_draws
    rare = sum(labels[index] for index, _ in draws) / len(draws)
    assert abs(rare - 0.5) < 0.03, rare  # 0.1 when shuffled
    assert {index for index, _ in draws} == set(range(100))  # every image is drawn
    assert len({seed for _, seed in draws}) == len(draws)  # each draw its own augmentation seed
    shuffled = SeededSampler(list(range(100)), seed=3)
    assert sum(labels[index] for index, _ in shuffled) == 10


def test_two_balanced_ranks_together_draw_what_one_process_draws():
    dataset, labels = list(range(40)), [0] * 30 + [1] * 10
    one = list(BalancedSampler(dataset, labels, seed=7))
    ranks = [list(BalancedSampler(dataset, labels, num_replicas=2, rank=r, seed=7)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 20
    for step in range(5):  # batch 8 on one process = batch 4 on each of 2 ranks, same draws, same seeds
        together = ranks[0][4 * step : 4 * step + 4] + ranks[1][4 * step : 4 * step + 4]
        assert sorted(together) == sorted(one[8 * step : 8 * step + 8])


def test_class_counts_and_the_imbalance_warning(tmp_path, caplog):
    folder = imbalanced_folder(tmp_path, blue=24, red=6)
    with caplog.at_level(logging.INFO, logger="finetune.data.datamodule"):
        data = datamodule(folder)
    assert data.class_counts() == [24, 6] and data.class_counts("test") == [6, 6]
    assert "Images per class (train, 30): blue 24, red 6" in caplog.messages
    assert "Images per class (test, 12): blue 6, red 6" in caplog.messages
    assert caplog.records[-1].levelname == "WARNING" and caplog.messages[-1] == (
        "The training split is imbalanced: blue has 24 images, red 6 (4.0x). Consider data.sampler=balanced "
        "or loss.class_weights=balanced"
    )
    caplog.clear()
    datamodule(folder, sampler="balanced")
    datamodule(imbalanced_folder(tmp_path / "3to1", blue=24, red=8))  # 3x: no warning
    assert not [record for record in caplog.records if record.levelname == "WARNING"]
    assert ImageFolderDataModule(CONFIG, folder, val_fraction=0).class_counts() == [24, 6]  # sets itself up


def test_the_documented_command_with_every_option_trains_on_soft_labels(tmp_path):
    (command,) = doc_commands("docs/strategies.md", "## Augmentation and class imbalance")
    assert command.split()[2:] == [
        "model=efficientnet_lite0",
        "data=synthetic",
        "data.augment=trivialaugment",
        "data.random_erasing=0.25",
        "data.mixup=0.2",
        "data.cutmix=1.0",
        "data.sampler=balanced",
        "debug=fdr",
    ]
    result = run_cli(command.split()[1:], tmp_path)
    assert result.returncode == 0, result.output[-3000:]
    assert "Test accuracy:" in result.output
    (log,) = tmp_path.glob("logs/train/runs/*/train.log")
    assert "Images per class (train, 162): circle 52, square 57, triangle 53" in log.read_text()

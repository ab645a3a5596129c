"""Cross-validation (`data.folds=K data.fold=i`): stratified, seeded folds that partition the training set, the
folds' own feature-cache keys, and the report's mean ± std over folds."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
import torch

from finetune import report
from finetune.builders import build_datamodule
from finetune.caching import split_key
from finetune.data.datamodule import ImageFolderDataModule, stratified_folds
from finetune.errors import ConfigError
from finetune.models import InputConfig
from tests.helpers import TINY, compose_train, make_image_folder, run_cli

CONFIG = InputConfig(32, (0.5,) * 3, (0.5,) * 3)
LABELS = [0] * 23 + [1] * 17 + [2] * 10  # imbalanced, and no class a multiple of the folds
TRAIN = {"blue": 11, "red": 7, "green": 5}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Three classes of 11, 7 and 5 training images (4 test images each)."""
    root = make_image_folder(tmp_path_factory.mktemp("images"), classes=tuple(TRAIN), train=max(TRAIN.values()), test=4)
    for name, keep in TRAIN.items():
        for path in sorted((root / "train" / name).iterdir())[keep:]:
            path.unlink()
    return root


def fold_data(images: Path, fold: int, folds: int = 3, seed: int = 0, **options) -> ImageFolderDataModule:
    data = ImageFolderDataModule(CONFIG, images, folds=folds, fold=fold, seed=seed, num_workers=0, **options)
    data.setup()
    return data


@pytest.mark.parametrize("folds", [2, 3, 5])
def test_folds_partition_the_indices_and_keep_each_class_share(folds):
    dealt = stratified_folds(LABELS, folds, seed=0)
    assert sorted(i for fold in dealt for i in fold) == list(range(len(LABELS)))  # each index in exactly one fold
    assert max(map(len, dealt)) - min(map(len, dealt)) <= 1
    for label in set(LABELS):
        per_fold = [sum(LABELS[i] == label for i in fold) for fold in dealt]
        assert max(per_fold) - min(per_fold) <= 1, (label, per_fold)


def test_the_same_seed_gives_the_same_folds_another_seed_others():
    assert stratified_folds(LABELS, 5, seed=3) == stratified_folds(LABELS, 5, seed=3)
    assert stratified_folds(LABELS, 5, seed=3) != stratified_folds(LABELS, 5, seed=4)


def test_each_fold_validates_once_and_trains_on_the_rest(images):
    total = sum(TRAIN.values())
    validated = []
    for fold in range(3):
        data = fold_data(images, fold)
        train, val = data.datasets["train"].indices, data.datasets["val"].indices
        assert not set(train) & set(val) and len(train) + len(val) == total
        assert data.datasets["val"].dataset.samples is data.datasets["train"].dataset.samples  # train's, not test's
        assert not data.validates_on_test
        for name, count in zip(data.classes, data.class_counts("val"), strict=True):  # each class's share kept
            assert math.floor(TRAIN[name] / 3) <= count <= math.ceil(TRAIN[name] / 3), (fold, name)
        validated += val
    assert sorted(validated) == list(range(total))  # every training image validated exactly once
    same = fold_data(images, 1)
    assert same.datasets["val"].indices == fold_data(images, 1).datasets["val"].indices  # a resume: the same split
    assert same.datasets["val"].indices != fold_data(images, 1, seed=1).datasets["val"].indices


def test_the_test_split_never_validates_with_folds_and_val_fraction_is_not_used(images):
    assert fold_data(images, 0, folds=None, val_fraction=0).validates_on_test  # d2l: the test split validates
    for val_fraction in (0, 0.5):  # hotdog's 0 included: with folds, the fold validates
        data = fold_data(images, 0, val_fraction=val_fraction)
        assert not data.validates_on_test and len(data.datasets["val"]) == 8


def test_more_folds_than_images_is_an_error(images):
    with pytest.raises(ConfigError, match=r"data.folds=30 is more than the 23 training images"):
        fold_data(images, 0, folds=30)


def test_a_fold_never_reads_another_folds_cached_features(images):
    """The feature cache keys a split by its samples: each fold's validation (and training) split has its own key."""
    data = [fold_data(images, fold, augment="none") for fold in range(3)]
    for split in ("train", "val"):
        keys = [split_key("backbone", d.datasets[split]) for d in data]
        assert len(set(keys)) == 3, split
        assert split_key("backbone", fold_data(images, 1, augment="none").datasets[split]) == keys[1]
    assert len({split_key("backbone", d.datasets["test"]) for d in data}) == 1  # the test split is shared


def test_the_config_builds_the_fold(tmp_path, images):
    cfg = compose_train(tmp_path, ["data=imagefolder", f"data.root={images}", *TINY, "data.folds=3", "data.fold=2"])
    data = build_datamodule(cfg)
    data.setup()
    assert (data.folds, data.fold) == (3, 2)
    assert data.datasets["val"].indices == stratified_folds(data.datasets["train"].dataset.targets, 3, cfg.seed)[2]


def fake_run(name: str, overrides: dict[str, str], test_acc: float) -> report.Run:
    return report.Run(
        name, Path(name), overrides, None, None, "completed", None, 1.0, {"val/acc": [test_acc]}, test_acc, 0.5
    )


def test_the_report_averages_over_folds_like_seeds():
    accs = {("freeze", "0"): 0.6, ("freeze", "1"): 0.8, ("freeze", "2"): 0.7, ("finetune", "0"): 0.9}
    runs = [
        fake_run(str(n), {"strategy": strategy, "data.folds": "3", "data.fold": fold}, acc)
        for n, ((strategy, fold), acc) in enumerate(accs.items())
    ]
    assert list(report.groups(runs)) == ["strategy=freeze", "strategy=finetune"]
    assert report.repeated_over(runs) == "folds"
    summary = report.summary_table(runs).splitlines()
    assert summary[2].startswith("| strategy=freeze | 3/3 | 0.700 ± 0.100 | 0.700 ± 0.100 | 0.500 ± 0.000 |")
    assert summary[3].startswith("| strategy=finetune | 1/1 | 0.900 | 0.900 |") and len(summary) == 4

    seeds = [fake_run(f"{r.name}s", {**r.overrides, "seed": "1"}, r.test_acc) for r in runs]
    both = [fake_run(r.name, {**r.overrides, "seed": "0"}, r.test_acc) for r in runs] + seeds
    assert report.repeated_over(both) == "seeds and folds"
    assert [len(members) for members in report.groups(both).values()] == [6, 2]  # seeds and folds together


@pytest.mark.slow
def test_a_fold_sweep_through_the_cli_and_its_report(tmp_path, images):
    """`train.py -m data.folds=3 data.fold=0,1,2` (tiny): one job per fold, and the report's one row over the folds."""
    folds = ["-m", "data.folds=3", "data.fold=0,1,2", "seed=0"]
    data = ["data=imagefolder", f"data.root={images}", "strategy.pretrained=false"]
    result = run_cli(["train.py", *folds, *data, *TINY], tmp_path)
    assert result.returncode == 0, result.output
    for fold in range(3):  # each job validated on its own fold
        split = fold_data(images, fold)
        counts = ", ".join(f"{n} {c}" for n, c in zip(split.classes, split.class_counts("val"), strict=True))
        assert result.output.count(f"Images per class (val, {len(split.datasets['val'])}): {counts}") == 1, fold
    (folder,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    for fold in range(3):
        checkpoint = torch.load(folder / str(fold) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert (checkpoint["run_settings"]["data"]["folds"], checkpoint["run_settings"]["data"]["fold"]) == (3, fold)

    printed = run_cli(["-m", "finetune.report", str(folder)], tmp_path)
    assert printed.returncode == 0, printed.output
    assert "## Summary (mean ± std over folds)" in printed.output
    (row,) = [line for line in printed.output.splitlines() if line.startswith("| all runs |")]
    accs = [run.test_acc for run in report.load_runs(folder)]
    assert row.startswith("| all runs | 3/3 | ")
    assert f"| {statistics.mean(accs):.3f} ± {statistics.stdev(accs):.3f} |" in row

"""The feature cache (same results as without it, invalidated by any change it depends on) and tiny runs of
every performance benchmark, so that none of them rots."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from finetune.builders import build, build_fit_trainer
from finetune.caching import CachedFeatures, FeatureCache, FoldedBackbone, backbone_key, split_key
from finetune.data.datamodule import Transformed
from finetune.data.images import ImageFolder
from finetune.data.transforms import eval_transform
from finetune.errors import ConfigError
from finetune.models import InputConfig, timm_backbone, torchvision_backbone
from finetune.models.fusion import fold_batchnorm
from finetune.train import train
from tests.helpers import SMALL_MODEL, TINY, compose_train, make_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")


PROBE = [*SMALL_MODEL, "strategy=freeze", "trainer.max_epochs=2"]


def probe(tmp_path: Path, image_folder: Path, *overrides: str):
    """A tiny linear probe, fitted and tested as train.py does it; returns (model, datamodule, metrics)."""
    cfg = compose_train(tmp_path, ["data=imagefolder", f"data.root={image_folder}", *TINY, *PROBE, *overrides])
    L.seed_everything(cfg.seed, workers=True)
    datamodule, model = build(cfg)
    trainer = build_fit_trainer(cfg)  # the Trainer exactly as train.py builds it
    trainer.fit(model, datamodule=datamodule)
    metrics = trainer.test(model, datamodule=datamodule, verbose=False)[0]
    return model, datamodule, metrics


def test_cached_probe_trains_the_same_head_and_predicts_the_same(tmp_path, image_folder):
    cache = f"paths.data_dir={tmp_path / 'data'}"
    plain, plain_data, plain_metrics = probe(tmp_path / "plain", image_folder, "data.augment=none", cache)
    cached, cached_data, cached_metrics = probe(
        tmp_path / "cached", image_folder, "data.augment=none", "callbacks.feature_cache.enabled=true", cache
    )
    test = cached_data.datasets["test"]
    assert isinstance(test, CachedFeatures) and test.features.shape == (1, 12, cached.backbone.num_features)
    for name in ("weight", "bias"):  # same batches in the same order: the same training trajectory
        torch.testing.assert_close(getattr(cached.head, name), getattr(plain.head, name), atol=1e-6, rtol=1e-5)
    assert cached_metrics["test/acc"] == plain_metrics["test/acc"]
    # Same head weights: predicting from the images (whole backbone) = predicting from the cached features.
    images = torch.stack([image for image, _ in plain_data.datasets["test"]])
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(images), cached.head(test.features[0]), atol=1e-5, rtol=1e-4)


def test_second_run_reads_the_cache_and_a_changed_image_is_computed_again(tmp_path, caplog):
    folder = make_image_folder(tmp_path / "images")
    overrides = ["data.augment=none", "callbacks.feature_cache.enabled=true", f"paths.data_dir={tmp_path / 'data'}"]
    features = tmp_path / "data" / "features"
    with caplog.at_level(logging.INFO, logger="finetune.caching"):
        probe(tmp_path / "first", folder, *overrides)
        assert caplog.text.count("computed") == 3 and len(list(features.iterdir())) == 3  # train, val, test
        caplog.clear()
        probe(tmp_path / "second", folder, *overrides)
        assert "computed" not in caplog.text and caplog.text.count("read from") == 3
        caplog.clear()
        Image.fromarray(np.full((40, 40, 3), 7, np.uint8)).save(folder / "test" / "red" / "000.png")
        probe(tmp_path / "third", folder, *overrides)
    assert "Features of 12 images computed" in caplog.text and caplog.text.count("read from") == 2
    assert len(list(features.iterdir())) == 4


def test_key_changes_with_weights_transform_data_and_labels(tmp_path, image_folder):
    backbone = torchvision_backbone("resnet18", pretrained=False)
    backbone.frozen_stages = backbone.num_stages
    folder = ImageFolder(image_folder / "test")
    split = Transformed(folder, range(len(folder)), eval_transform(InputConfig(32, (0.5,) * 3, (0.2,) * 3)))
    weights = backbone_key(backbone)
    key = split_key(weights, split)
    assert split_key(backbone_key(backbone), split) == key  # deterministic

    with torch.no_grad():
        backbone.stages[0][0].weight[0, 0, 0, 0] += 1e-3
    assert backbone_key(backbone) != weights
    backbone.stages[0][1].running_mean[0] += 1.0  # BatchNorm statistics are weights too
    assert len({weights, backbone_key(backbone)}) == 2

    assert (
        split_key(weights, Transformed(folder, split.indices, eval_transform(InputConfig(64, (0.5,) * 3, (0.2,) * 3))))
        != key
    )
    assert (
        split_key(weights, Transformed(folder, split.indices, eval_transform(InputConfig(32, (0.4,) * 3, (0.2,) * 3))))
        != key
    )
    assert split_key(weights, Transformed(folder, split.indices[1:], split.transform)) != key
    assert split_key(weights, split, extra="precision=bf16-mixed") != key

    copy = tmp_path / "copy"
    for path, _ in folder.samples:
        target = copy / path.relative_to(image_folder / "test")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    moved = ImageFolder(copy)
    assert split_key(weights, Transformed(moved, split.indices, split.transform)) == key  # content, not location
    path = moved.samples[0][0]
    Image.fromarray(np.full((40, 40, 3), 7, np.uint8)).save(path)  # same name, new pixels
    assert split_key(weights, Transformed(ImageFolder(copy), split.indices, split.transform)) != key
    moved.samples[1] = (moved.samples[1][0], 1 - moved.samples[1][1])  # a relabelled image
    assert split_key(weights, Transformed(moved, split.indices, split.transform)) != key


def test_key_changes_with_the_exif_orientation_alone(tmp_path):
    """The images are read upright, so a photo whose orientation tag changes is another input: the key hashes
    the file's bytes, tag included."""
    keys = []
    for orientation in (1, 6):
        root = tmp_path / str(orientation)
        make_image_folder(root, train=1, test=1)
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(np.arange(32 * 48 * 3, dtype=np.uint8).reshape(32, 48, 3)).save(
            root / "test" / "red" / "photo.jpg", exif=exif
        )
        folder = ImageFolder(root / "test")
        split = Transformed(folder, range(len(folder)), eval_transform(InputConfig(32, (0.5,) * 3, (0.2,) * 3)))
        keys.append(split_key("backbone", split))
    assert keys[0] != keys[1]
    assert [p.read_bytes() for p in sorted((tmp_path / "1").rglob("*.png"))] == [
        p.read_bytes() for p in sorted((tmp_path / "6").rglob("*.png"))
    ]  # the same data otherwise


def test_augmented_views_hold_each_epochs_augmentation(tmp_path, image_folder):
    overrides = [
        "callbacks.feature_cache.enabled=true",
        "callbacks.feature_cache.views=2",
        f"paths.data_dir={tmp_path / 'data'}",
    ]
    _, datamodule, _ = probe(tmp_path, image_folder, *overrides)
    train_split, val, test = (datamodule.datasets[s] for s in ("train", "val", "test"))
    assert train_split.features.shape[:2] == (2, 22) and val.features.shape[0] == test.features.shape[0] == 1
    assert not torch.allclose(train_split.features[0], train_split.features[1])  # two different augmentations
    assert datamodule.num_workers == 0  # tensors in memory: no worker processes


def test_cache_refuses_a_backbone_that_trains(tmp_path, image_folder):
    cache = FeatureCache(enabled=True, cache_dir=tmp_path)
    backbone = torchvision_backbone("resnet18", pretrained=False)
    with pytest.raises(ConfigError, match="callbacks.feature_cache.enabled=true needs a backbone frozen"):
        cache.require_frozen(backbone)
    with pytest.raises(ConfigError, match="feature_cache.views=0 must be >= 1"):
        FeatureCache(views=0)
    cfg = compose_train(
        tmp_path,
        ["data=imagefolder", f"data.root={image_folder}", *TINY, *SMALL_MODEL, "strategy=finetune"]
        + ["callbacks.feature_cache.enabled=true"],
    )
    with pytest.raises(ConfigError, match=r"but (\d+) of its \1 stages train"):
        train(cfg)


# Tiny runs of every benchmark (the real ones take minutes on real data, see BENCHMARKS.md).
BENCH = ["--models", "tiny", "--sizes", "32", "--batch-size", "4", "--steps", "2", "--warmup", "1", "--rounds", "1"]


def test_throughput_benchmark_runs(image_folder):
    from benchmarks import throughput

    (result,) = throughput.main(["--data", str(image_folder), *BENCH, "data.num_workers=0"])
    assert result["lightning"] > 0 and result["plain"] > 0 and result["ratio"] > 0


@pytest.mark.parametrize("side", ["ceiling", "plain", "fit"])
def test_each_side_ticks_once_a_step_so_the_clock_waits_for_the_gpu_where_the_window_ends(tmp_path, image_folder, side):
    """On a GPU the clock waits for the device at the window's first and last step only: the last tick must be the
    last step's (the steps in between are queued while the GPU runs, as in training)."""
    from benchmarks import throughput
    from finetune.config import compose_config

    cfg = compose_config(throughput.overrides(image_folder, "tiny", 32, 4, 3, ["data.num_workers=0"]), tmp_path)
    clock = throughput.run_side(side, {"plain": cfg, "fit": cfg}, steps=3, warmup=1)
    assert len(clock.times) == 3 and clock.synchronize_at == {0, 2}


def test_the_window_clock_counts_the_host_waits_between_its_ends(monkeypatch):
    """On a GPU (faked here), CUDA's sync debug mode warns at each wait of the host for the device: counted from the
    end of the warm-up to the last step, without the clock's own waits at both ends."""
    from benchmarks.throughput import WindowClock

    modes = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "utilization", lambda: 50)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    monkeypatch.setattr(
        torch.cuda, "synchronize", lambda: warnings.warn("called a synchronizing CUDA operation", stacklevel=1)
    )
    clock = WindowClock(warmup=2, steps=5)
    for step in range(5):
        for _ in range(step):  # step k waits k times
            warnings.warn("called a synchronizing CUDA operation", stacklevel=1)
        clock.tick()
    assert clock.waits == 2 + 3 + 4 and modes == ["warn", 0] and len(clock.times) == 5


def test_throughput_fit_trains_every_weight_as_the_plain_loop(tmp_path):
    """The default recipe trains the head alone in its first epoch; the plain loop trains everything."""
    from benchmarks import throughput
    from finetune.config import compose_config

    cfg = compose_config(throughput.overrides(tmp_path, "tiny", 32, 4, 3, []), tmp_path)
    assert cfg.strategy.trainable == "all" and not cfg.strategy.unfreeze_at


def test_host_time_benchmark_runs(image_folder):
    from benchmarks import host_time

    rows = host_time.main(["--data", str(image_folder), "--steps", "3", "--warmup", "1", "--rounds", "2"])
    # each variant trained with the bar it names; the last is the defaults a user gets
    assert [(row[0], row[1]) for row in rows] == [("off", 0), ("100Hz", 100), ("10Hz", 10)]
    assert all(row[2] > 0 and row[3] > 0 for row in rows)


def test_speed_options_benchmark_runs(image_folder):
    from benchmarks import speed_options

    rows = speed_options.main(
        ["--data", str(image_folder), *BENCH, "data.num_workers=0", "--variants", "defaults", "ema"]
    )
    assert [row[2] for row in rows] == ["defaults", "ema"] and rows[0][4] == 1.0


def test_memory_benchmark_runs(image_folder):
    from benchmarks import memory

    args = ["--epochs", "3", "--train-batches", "2", "--val-batches", "1", "data.batch_size=4", "data.num_workers=0"]
    result = memory.main(["--data", str(image_folder), "--model", *SMALL_MODEL, *args])
    assert result["peak_main_mb"] > 100 and abs(result["growth_mb_per_epoch"]) < 50


def test_datapipe_benchmark_runs(tmp_path):
    from benchmarks import datapipe

    rng = np.random.default_rng(0)
    for name, size in (("photos", 80), ("tiny", 32)):
        for label in ("a", "b"):
            folder = tmp_path / name / "train" / label
            folder.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), np.uint8)).save(folder / f"{i}.jpg")
    args = ["--seefood", str(tmp_path / "photos"), "--cifar", str(tmp_path / "tiny"), "--sizes", "48"]
    args += ["--photos", "8", "--photo-side", "400"]
    rows = datapipe.main([*args, "--batch-size", "2", "--rounds", "1", "--workers", "0", "--models"])
    pipelines = ["project", "project, full decode", "eval", "eval, full decode", "project, uint8 batches"]
    pipelines += ["PIL transforms", "decode_jpeg", "PIL draft"]
    stored = ["store", "store, uint8 batches", "store, batch crop"]
    found = {source: [row[2] for row in rows if row[0] == source] for source, *_ in rows}
    assert found == {  # no batch resize of photos
        "seefood512": [*pipelines, *stored],
        "cifar10 (32 px)": [*pipelines, "batch resize", *stored],
        "seefood512 at 400x300 px": [*pipelines, *stored],
    }
    assert all(row[3] > 0 and row[4] > 0 for row in rows)


@pytest.mark.slow  # the benchmark's command-line runs (17 s); the cache's results are tested above
def test_feature_cache_benchmark_times_a_cli_run(tmp_path, image_folder):
    from benchmarks import feature_cache

    args = ["data=imagefolder", f"data.root={image_folder}", *TINY, *PROBE, "callbacks.feature_cache.enabled=true"]
    result = feature_cache.run_train(args, tmp_path, "cached")
    assert len(result["epochs_s"]) == 1 and result["extraction_s"] is not None and 0 <= result["test_acc"] <= 1


def _randomize_batchnorm(module: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(0)
    for bn in (m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        for tensor, low in ((bn.running_mean, -1), (bn.running_var, 0.5), (bn.weight, 0.5), (bn.bias, -1)):
            tensor.data = low + torch.rand(tensor.shape, generator=generator) * 1.5


@pytest.mark.parametrize("name", ["resnet18", "tf_efficientnet_lite0"])
def test_folded_batchnorm_computes_the_same_features(name):
    backbone = (
        torchvision_backbone(name, pretrained=False)
        if name == "resnet18"
        else timm_backbone(name, pretrained=False)  # its stride-2 convolutions are timm's Conv2dSame
    )
    _randomize_batchnorm(backbone)
    backbone.frozen_stages = backbone.num_stages
    images = torch.randn(3, 3, 64, 64)
    folded = fold_batchnorm(backbone, images[:1])
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded.forward_frozen(images), backbone.forward_frozen(images), atol=1e-3, rtol=1e-3)
    assert all(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules() if "bn" in type(m).__name__.lower())


def test_the_cache_folds_once_in_full_precision_even_under_autocast():
    backbone = torchvision_backbone("resnet18", pretrained=False)
    _randomize_batchnorm(backbone)
    backbone.frozen_stages = backbone.num_stages
    extract, images = FoldedBackbone(backbone), torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", torch.bfloat16), torch.inference_mode():  # as the cache extracts under bf16-mixed
        extract(images)
        folded = extract.folded
        extract(images)
    assert extract.folded is folded and not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(extract(images), backbone.forward_frozen(images), atol=1e-4, rtol=1e-4)


def test_a_convolution_whose_output_is_also_used_elsewhere_is_not_folded():
    class Shortcut(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # folding would change the second use of y

    module = Shortcut()
    _randomize_batchnorm(module)
    folded = fold_batchnorm(module, torch.randn(2, 3, 8, 8))
    assert isinstance(folded.bn, torch.nn.BatchNorm2d)


def test_image_scan_benchmark_runs_and_the_scan_catches_every_bad_file(image_folder):
    from benchmarks import image_scan

    rows, caught = image_scan.main(
        ["--root", str(image_folder.parent), "--datasets", image_folder.name, "--rounds", "1"]
    )
    assert rows[0][1] == 36 and all(value > 0 for value in rows[0][2:])
    assert [scan for _, scan, _ in caught] == ["yes"] * len(caught)


@pytest.mark.parametrize("runs", ["1", "2"])
def test_store_build_benchmark_runs(image_folder, runs):
    from benchmarks import store_build

    (row,) = store_build.main(["--folders", str(image_folder / "train"), "--rounds", "1", "--runs", runs])
    assert row[1:3] == [24, 40] and row[3] > 0  # 24 images, stored at their own 40 px (not upsampled to 256)


def test_augment_benchmark_runs(image_folder):
    from benchmarks import augment

    args = ["--data", str(image_folder), "--image-size", "32", "--batch-size", "4", "--images", "8", "--rounds", "1"]
    rows = augment.main([*args, "--workers", "0", "--variants", "augment=randaugment", "mixup=0.2,cutmix=1.0"])
    assert [row[0] for row in rows] == ["augment=randaugment", "mixup=0.2,cutmix=1.0"]
    assert all(row[1] > 0 and row[2] >= 0 for row in rows)
    assert augment.options("mixup=0.2,augment=none") == {"mixup": 0.2, "augment": "none"}

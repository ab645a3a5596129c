"""data.store: images decoded once into a memory-mapped uint8 store; d2l's crop and flip on the device's batches."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from benchmarks._common import at_once
from finetune.caching import split_key
from finetune.data import store
from finetune.data.datamodule import ImageFolderDataModule
from finetune.data.images import ImageFolder, ImageReadError
from finetune.data.store import CropSample, DeviceAugment, StoredImages
from finetune.data.transforms import NormalizeBatch
from finetune.errors import ConfigError
from finetune.models import InputConfig
from finetune.train import train
from finetune.validation import validate
from tests.helpers import compose_train, doc_commands, make_image_folder, meet_in, run_cli, within

CONFIG = InputConfig(32, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))  # resize 37: below the images' 40 px
# the recommended recipe, short: pretrained Lite0, 2 epochs (the head alone, then everything), batches of 8
TINY_RUN = ["model=efficientnet_lite0", "trainer.max_epochs=2", "data.batch_size=8", "data.num_workers=0"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Two classes of 40 px squares, and one 64x40 photo per split and class (its centre square is stored)."""
    root = make_image_folder(tmp_path_factory.mktemp("images"), train=12, test=4)
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for name in ("blue", "red"):
            pixels = rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / split / name / "wide.jpg", quality=90)
    return root


def datamodule(root: Path, store_dir: Path, **settings) -> ImageFolderDataModule:
    settings = {
        "batch_size": 4,
        "val_fraction": 0.25,
        "num_workers": 0,
        "store": True,
        "store_dir": store_dir,
    } | settings
    data = ImageFolderDataModule(CONFIG, root, **settings)
    data.setup()
    return data


def test_the_eval_transform_gives_the_same_pixels_from_the_store_as_from_the_files(images, tmp_path):
    files, stored = datamodule(images, tmp_path, store=False), datamodule(images, tmp_path)
    assert isinstance(stored.datasets["test"].dataset, StoredImages)
    assert stored.datasets["test"].dataset.side == CONFIG.resize == 37
    wide = stored.datasets["test"].dataset
    assert wide[len(wide) - 1][0].shape == (3, 37, 59)  # red/wide.jpg, whole: 64x40 resized as the eval transform does
    for split in ("val", "test"):
        assert len(stored.datasets[split]) == len(files.datasets[split]) > 0
        for index in range(len(files.datasets[split])):
            a, b = files.datasets[split][index], stored.datasets[split][index]
            assert b[1] == a[1]
            torch.testing.assert_close(b[0], a[0], rtol=0, atol=0)  # the wide photo too: its centre square
    assert stored.datasets["test"].image(0).size == (37, 37)  # figures get a PIL image


def test_images_are_decoded_once_and_a_changed_file_gives_a_new_store(images, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="finetune.data.store"):
        first = datamodule(images, tmp_path)
        again = datamodule(images, tmp_path)
    assert caplog.text.count("Decoding") == 2  # train and test, once
    assert caplog.text.count("read from the store") == 2
    assert again.datasets["train"].dataset.file == first.datasets["train"].dataset.file
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".npy", ".npy", ".u8", ".u8"]  # no partial file left

    changed = images / "test" / "red" / "wide.jpg"
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # edited (e.g. re-exported) later
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="finetune.data.store"):
        datamodule(images, tmp_path)
    assert caplog.text.count("Decoding") == 1  # the test split's store is new, train's is read
    assert len(list(tmp_path.glob("*.npy"))) == 3


@pytest.mark.parametrize("processes", [1, 3])
def test_a_store_decoded_in_parts_by_several_processes_holds_every_image_in_order(
    images, tmp_path, monkeypatch, processes
):
    monkeypatch.setattr(store, "per_core", lambda count: (processes, 5))  # parts of 5 images (the last of 1)
    folder = ImageFolder(images / "train")
    stored = StoredImages.of(folder, None, CONFIG, tmp_path)
    assert len(stored) == len(folder) == 26
    for index, (path, label) in enumerate(folder.samples):
        pixels, stored_label = stored[index]
        assert stored_label == label
        torch.testing.assert_close(
            pixels, torch.from_numpy(store._resized(path, 37, InterpolationMode.BILINEAR)), rtol=0, atol=0
        )
    assert sorted(file.suffix for file in tmp_path.iterdir()) == [".npy", ".u8"]  # no part left behind

    def fails_at_the_seventh(path: Path, *args: object) -> np.ndarray:
        if path == folder.samples[6][0]:
            raise OSError(f"{path}: the disk is full")
        return resized(path, *args)

    resized = store._resized
    monkeypatch.setattr(store, "_resized", fails_at_the_seventh)
    with pytest.raises(OSError, match="the disk is full"):
        StoredImages.of(folder, None, CONFIG, tmp_path / "failed")
    assert list((tmp_path / "failed").iterdir()) == []  # neither the store's partial file nor any part


def test_runs_that_ask_for_a_new_store_at_once_build_it_once(images, tmp_path, monkeypatch):
    """DDP ranks and a parallel sweep's jobs start their first run together: one builds, the others read."""
    meet_in(monkeypatch, store, "build_store", tmp_path / "builds")
    with within(120, "runs still wait for one another"):
        at_once(StoredImages.of, ImageFolder(images / "train"), None, CONFIG, tmp_path / "store", runs=3)
    assert len((tmp_path / "builds").read_text().splitlines()) == 1
    assert sorted(file.suffix for file in (tmp_path / "store").iterdir()) == [".npy", ".u8"]  # no lock file left


def test_a_store_dir_that_cannot_be_written_is_named(images, tmp_path):
    (tmp_path / "file").write_text("a file, not a folder\n")
    with pytest.raises(ConfigError, match=f"data.store_dir={tmp_path}/file/store cannot be written"):
        datamodule(images, tmp_path / "file" / "store")


def test_the_side_is_the_eval_resize_capped_at_the_images_or_data_store_size(images, tmp_path):
    large = ImageFolderDataModule(InputConfig(224), images, num_workers=0, store=True, store_dir=tmp_path)
    large.setup()
    assert large.datasets["train"].dataset.side == 40  # not 256: the images' short side is 40 px
    index = np.load(large.datasets["train"].dataset.file)  # start, height, width of each image of the folder
    assert len(index) == 26 and {tuple(size) for size in index[:, 1:]} == {(40, 40), (40, 64)}  # whole images
    assert datamodule(images, tmp_path / "small", store_size=20).datasets["test"].dataset.side == 20


def test_the_device_crop_is_torchvisions_resized_crop_with_antialiasing():
    torch.manual_seed(0)
    smooth = TF.resize(torch.randint(0, 256, (2, 3, 12, 12), dtype=torch.uint8), [96, 96], antialias=True)
    boxes = torch.tensor([[10.0, 4.0, 90.0, 84.0], [30.0, 20.0, 46.0, 44.0]])  # downscaled 80 -> 32, upscaled 16x24
    batch = CropSample(smooth, boxes, torch.tensor([False, True]), torch.tensor([0, 1]))
    images, labels = DeviceAugment(CONFIG)(batch)
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [0, 1]
    mean, std = torch.tensor(CONFIG.mean).view(3, 1, 1), torch.tensor(CONFIG.std).view(3, 1, 1)
    for image, (x1, y1, x2, y2), flip, got in zip(smooth, boxes.int().tolist(), (False, True), images, strict=True):
        expected = TF.resized_crop(image, y1, x1, y2 - y1, x2 - x1, [32, 32], antialias=True).float() / 255
        expected = (TF.horizontal_flip(expected) if flip else expected - 0) - mean
        error = ((got * std - expected) * 255).abs()  # in 0..255 grey levels
        assert error.mean() < 1.5 and error.max() < 12, (error.mean(), error.max())


def test_augment_none_on_the_device_is_the_eval_crop(images, tmp_path):
    data = datamodule(images, tmp_path, augment="none", augment_on="device", val_fraction=0)
    (crops,) = [DeviceAugment(CONFIG)(batch)[0] for batch in data.train_dataloader()][:1]
    train = data.datasets["train"]  # its per-image transform is the eval transform
    order = list(data.train_dataloader().sampler)[:4]
    expected = torch.stack([train[index][0] for index, _ in order])
    torch.testing.assert_close(crops, expected, rtol=0, atol=1e-5)  # the same pixels, at the store's own size


def test_a_bad_image_is_named_or_skipped_as_without_the_store(tmp_path):
    root = make_image_folder(tmp_path / "images", train=4, test=2)
    (root / "train" / "red" / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole jpeg")
    with pytest.raises(ImageReadError, match="cut.jpg"):
        datamodule(root, tmp_path / "store")
    assert not (tmp_path / "store").exists()  # named before anything is decoded
    skipped = datamodule(root, tmp_path / "store", skip_bad_images=True, val_fraction=0)
    assert len(skipped.datasets["train"]) == 8
    assert np.load(skipped.datasets["train"].dataset.file).shape[0] == 8


def test_the_feature_cache_tells_stored_images_from_files(images, tmp_path):
    files, stored = datamodule(images, tmp_path, store=False), datamodule(images, tmp_path)
    for split in ("train", "test"):
        assert split_key("backbone", files.datasets[split]) != split_key("backbone", stored.datasets[split])


@pytest.mark.parametrize(
    "overrides",
    [["data.augment_on=device"], ["strategy=freeze", "callbacks.feature_cache.enabled=true"]],
    ids=["device", "feature-cache"],
)
def test_train_py_with_the_store_and_the_recommended_recipe(tmp_path, images, overrides, caplog):
    """The shipped defaults (freeze_unfreeze, AdamW, warmup + cosine per step, label smoothing) on pretrained
    Lite0, with the store: the crop on the device's batches, and the linear probe on cached features (the
    documented command runs the crop in the workers)."""
    cfg = compose_train(
        tmp_path,
        [
            "data=imagefolder",
            f"data.root={images}",
            "data.store=true",
            "data.image_size=32",
            *TINY_RUN,
            "trainer.accelerator=cpu",
            *overrides,
        ],
    )
    with caplog.at_level(logging.INFO, logger="finetune.data.datamodule"):
        metrics = train(cfg)
    assert 0 <= metrics["test/acc"] <= 1 and metrics["train/loss"] > 0
    # said once, though the per-step schedule's step count builds the training loader before the fit loop does
    assert caplog.text.count("as whole batches on the training device") == ("data.augment_on=device" in overrides)
    assert caplog.text.count("training images: each epoch draws") == 1
    (store,) = {p.parent for p in (tmp_path / "data" / "store").glob("*.npy")}
    assert len(list(store.glob("*.npy"))) == 2


def test_the_store_command_runs_as_written(images, tmp_path):
    (command,) = doc_commands("docs/strategies.md", "## Images decoded once: the store")
    typed = command.replace("path/to/images", str(images)).split()[1:]
    result = run_cli([*typed, "data.image_size=32", "trainer.max_epochs=1", "data.num_workers=0"], tmp_path)
    assert result.returncode == 0, result.output
    assert "Test accuracy: " in result.output and len(list((tmp_path / "data" / "store").glob("*.npy"))) == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.augment_on=device", "data.random_erasing=0.25"], "but data.random_erasing=0.25 needs normalised"),
        (["data.store=true", "data.augment_on=device", "data.mixup=0.2"], "but data.mixup/data.cutmix needs"),
        (["data.augment_on=gpu"], "data.augment_on=gpu must be one of auto, device, workers"),
        (["data.store_size=0"], "data.store_size=0 must be a side in pixels >= 1"),
    ],
)
def test_store_settings_that_cannot_work_are_named(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_train(tmp_path, ["data=imagefolder", "data.root=/somewhere", *overrides]))


@pytest.mark.parametrize(
    "settings",
    [{"store": False}, {"augment": "trivialaugment"}, {"store": False, "augment": "none"}],
    ids=["files", "store-with-a-policy", "files-eval-transform"],
)
def test_on_the_device_the_workers_uint8_images_are_normalised_to_the_per_image_transforms_floats(
    images, tmp_path, settings, caplog
):
    """What the device cannot crop (files, other presets) it still normalises: the workers hand over uint8 images
    (a quarter of the bytes) and the batch becomes, bit for bit, what the per-image transform makes."""

    def batches(augment_on: str) -> list:
        data = datamodule(images, tmp_path, augment_on=augment_on, **settings)
        return [(batch, data.on_after_batch_transfer(batch, 0)) for batch in data.train_dataloader()]

    with caplog.at_level(logging.INFO, logger="finetune.data.datamodule"):
        on_device = batches("device")
    assert "normalised as whole batches on the training device (uint8 from the workers)" in caplog.text
    assert len(on_device) == 5 and on_device[0][0][0].dtype == torch.uint8
    for (_, (device_images, device_labels)), (batch, finished) in zip(on_device, batches("workers"), strict=True):
        assert finished is batch and batch[0].dtype == torch.float32  # nothing left for the device to do
        torch.testing.assert_close(device_images, batch[0], rtol=0, atol=0)
        assert torch.equal(device_labels, batch[1])


def test_train_py_normalising_on_the_device_trains_the_weights_the_workers_train(images, tmp_path):
    """Through Lightning's hook (`on_after_batch_transfer`), uint8 batches normalised on the device train the
    same weights, bit for bit, as the workers' normalised images: the shipped recipe (freeze_unfreeze, AdamW,
    warmup + cosine per step, label smoothing) on pretrained Lite0."""

    def trained(augment_on: str) -> dict[str, torch.Tensor]:
        overrides = ["data=imagefolder", f"data.root={images}", "data.image_size=32", *TINY_RUN]
        overrides += [f"data.augment_on={augment_on}"]
        train(compose_train(tmp_path / augment_on, overrides))
        checkpoint = tmp_path / augment_on / "run" / "checkpoints" / "last.ckpt"
        return torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]

    on_device, in_workers = trained("device"), trained("workers")
    torch.testing.assert_close(on_device, in_workers, rtol=0, atol=0)


def test_auto_finishes_batches_on_a_gpu_only(images, tmp_path):
    """`data.augment_on=auto` (the default) decides by the trainer's device, seen here through a stand-in trainer."""

    def first_batch(device: str, **settings):
        data = datamodule(images, tmp_path, **settings)
        data.trainer = SimpleNamespace(
            strategy=SimpleNamespace(root_device=torch.device(device)),
            world_size=1,
            global_rank=0,
            accumulate_grad_batches=1,
        )
        return next(iter(data.train_dataloader()))

    assert isinstance(first_batch("cuda"), CropSample)  # stored images: cropped on the GPU
    assert first_batch("cuda", store=False)[0].dtype == torch.uint8  # files: normalised on the GPU
    assert first_batch("cuda", store=False, mixup=0.2)[0].dtype == torch.float32  # MixUp mixes normalised images
    assert first_batch("cpu")[0].dtype == first_batch("cpu", store=False)[0].dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (benchmarks/gpu_check.sh runs it there)")
def test_on_a_gpu_the_crop_runs_on_the_device_by_default_with_the_cpus_result(images, tmp_path, caplog):
    data = datamodule(images, tmp_path, val_fraction=0, augment_on="device")
    batch = next(iter(data.train_dataloader()))  # no trainer: a CPU batch
    on_cpu = DeviceAugment(CONFIG)(batch)[0]
    on_gpu = DeviceAugment(CONFIG)(CropSample(*(t.cuda() for t in batch)))[0]
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=0, atol=1e-4)
    uint8 = batch.image[..., :32, :32]
    normalized = NormalizeBatch(CONFIG)
    torch.testing.assert_close(normalized.images(uint8.cuda()).cpu(), normalized.images(uint8), rtol=0, atol=1e-6)
    cfg = compose_train(
        tmp_path,
        ["data=imagefolder", f"data.root={images}", "data.store=true", "data.image_size=32", "trainer=gpu", *TINY_RUN],
    )
    with caplog.at_level(logging.INFO, logger="finetune.data.datamodule"):
        metrics = train(cfg)
    assert "as whole batches on the training device" in caplog.text and 0 <= metrics["test/acc"] <= 1

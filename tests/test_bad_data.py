"""Bad data: odd image modes become proper RGB, photos are turned upright as their EXIF orientation says; unreadable
files stop setup with their names, or are skipped."""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import signal
import struct
import zlib
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from benchmarks._common import at_once
from finetune.builders import build_datamodule
from finetune.data import images
from finetune.data.datamodule import ImageFolderDataModule, default_num_workers
from finetune.data.images import (
    ImageFolder,
    ImageReadError,
    _problem,
    find_bad_images,
    forked_map,
    one_at_a_time,
    per_core,
    read_rgb,
)
from finetune.data.transforms import eval_transform
from finetune.errors import ConfigError, DataError, MissingFileError
from finetune.models import InputConfig
from finetune.train import train
from tests.helpers import SMALL_MODEL, TINY, compose_train, make_image_folder, meet_in, within

RED, GREEN = (255, 0, 0), (0, 255, 0)


def png_header(width: int, height: int) -> bytes:
    """A tiny PNG that claims `width` x `height` pixels: what a decompression bomb looks like to `Image.open`."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def two_pixels(mode: str, first, second) -> Image.Image:
    image = Image.new(mode, (2, 1))
    image.putpixel((0, 0), first)
    image.putpixel((1, 0), second)
    return image


def palette(transparent: bool) -> Image.Image:
    image = two_pixels("P", 0, 1)
    image.putpalette([*RED, *GREEN])
    if transparent:
        image.info["transparency"] = 1
    return image


# (file name, writer, the two RGB pixels read_rgb must return)
CONVERTIBLE = {
    "grey.png": (lambda p: two_pixels("L", 100, 200).save(p), [(100,) * 3, (200,) * 3]),
    "palette.png": (lambda p: palette(False).save(p), [RED, GREEN]),
    "palette_transparent.png": (lambda p: palette(True).save(p), [RED, (255, 255, 255)]),
    "alpha.png": (lambda p: two_pixels("RGBA", (*RED, 255), (0, 0, 0, 0)).save(p), [RED, (255, 255, 255)]),
    "grey_alpha.png": (lambda p: two_pixels("LA", (50, 255), (0, 0)).save(p), [(50,) * 3, (255, 255, 255)]),
    # 65535 is white and 32768 mid-grey; PIL's convert("RGB") would clip both to 255
    "grey16.png": (
        lambda p: Image.fromarray(np.array([[65535, 32768]], dtype=np.uint16)).save(p),
        [(255,) * 3, (128,) * 3],
    ),
    "cmyk.jpg": (lambda p: Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(p, quality=100), [RED, RED]),
    "UPPER.JPG": (lambda p: Image.new("RGB", (8, 8), GREEN).save(p, quality=100), [GREEN, GREEN]),
}


def write_truncated_jpeg(path: Path) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# (file name, writer, words the reason must hold)
UNREADABLE = {
    "truncated.jpg": (write_truncated_jpeg, "truncated"),
    "empty.jpg": (lambda p: p.write_bytes(b""), "cannot identify"),
    "text.png": (lambda p: p.write_text("not an image"), "cannot identify"),
    # PIL refuses above 2 x MAX_IMAGE_PIXELS itself, and only warns between 1x and 2x: both are refused
    "bomb.png": (lambda p: p.write_bytes(png_header(100_000, 100_000)), "DecompressionBombError"),
    "large.png": (lambda p: p.write_bytes(png_header(10_000, 10_000)), "MAX_IMAGE_PIXELS"),
}

# Never read: hidden files, macOS/Windows clutter, non-image extensions, hidden folders.
IGNORED = ("notes.txt", "Thumbs.db", ".DS_Store", "._0.png", "labels.csv")


@pytest.mark.parametrize("name", CONVERTIBLE)
def test_every_image_mode_is_read_as_proper_rgb(tmp_path, name):
    write, expected = CONVERTIBLE[name]
    write(tmp_path / name)
    image = read_rgb(tmp_path / name)
    assert image.mode == "RGB"
    got = [image.getpixel((0, 0)), image.getpixel((image.width - 1, 0))]
    assert np.abs(np.array(got, dtype=int) - np.array(expected)).max() <= 3, got  # JPEG is lossy


def test_images_are_read_with_the_size_limit_switched_off(tmp_path, monkeypatch):
    """`PIL.Image.MAX_IMAGE_PIXELS = None` is PIL's way to switch its check off (for scans, satellite tiles)."""
    Image.new("RGB", (40, 30)).save(tmp_path / "image.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert read_rgb(tmp_path / "image.png").size == (40, 30)
    assert find_bad_images([tmp_path / "image.png"]) == {}


def test_16_bit_png_would_be_clipped_by_a_plain_convert(tmp_path):
    """The control for grey16.png above: PIL alone turns mid-grey into white."""
    CONVERTIBLE["grey16.png"][0](tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as image:
        assert image.mode.startswith("I;16") and image.convert("RGB").getpixel((1, 0)) == (255, 255, 255)


# EXIF orientation (tag 0x0112) -> the transpose that shows the stored pixels upright, as a photo viewer does
UPRIGHT = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_270, 8: Image.Transpose.ROTATE_90}


def write_photo(path: Path, orientation: int) -> Image.Image:
    """A 48x32 JPEG with an EXIF orientation, as a phone stores a photo; returns the upright image a viewer shows."""
    pixels = np.zeros((32, 48, 3), np.uint8)
    pixels[:16, :24] = RED  # one coloured corner and a gradient: every rotation and mirror looks different
    pixels[..., 2] = np.arange(48, dtype=np.uint8)[None, :] * 5
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    with Image.open(path) as stored:  # the stored pixels, decoded as they are
        return stored.convert("RGB").transpose(UPRIGHT[orientation])


@pytest.mark.parametrize("orientation", UPRIGHT)
def test_a_photo_is_read_upright_as_its_exif_orientation_says(tmp_path, orientation):
    upright = write_photo(tmp_path / "photo.jpg", orientation)
    assert upright.size == ((48, 32) if orientation == 3 else (32, 48))
    image = read_rgb(tmp_path / "photo.jpg")
    assert image.size == upright.size and np.array_equal(np.asarray(image), np.asarray(upright))
    assert find_bad_images([tmp_path / "photo.jpg"]) == {}  # the fast scan reads it the same way


def test_training_and_evaluation_see_photos_upright(tmp_path):
    make_image_folder(tmp_path, train=2, test=2)
    upright = {o: write_photo(tmp_path / "test" / "red" / f"photo{o}.jpg", o) for o in UPRIGHT}
    for orientation in UPRIGHT:
        write_photo(tmp_path / "train" / "red" / f"photo{orientation}.jpg", orientation)
    config = InputConfig(32, (0, 0, 0), (1, 1, 1))
    datamodule = ImageFolderDataModule(config, tmp_path, val_fraction=0)
    datamodule.setup()
    train_images, test = datamodule.datasets["train"].dataset, datamodule.datasets["test"]
    for orientation, image in upright.items():
        name = f"photo{orientation}.jpg"
        tensor, label = test[[p.name for p, _ in test.dataset.samples].index(name)]  # as evaluation sees it
        assert label == 1 and torch.equal(tensor, eval_transform(config)(image))
        read, _ = train_images[[p.name for p, _ in train_images.samples].index(name)]  # before augmentation
        assert np.array_equal(np.asarray(read), np.asarray(image))


def bad_data_folder(root: Path) -> Path:
    """A dataset with every case at once: unicode/space class names, all convertible modes, unreadable,
    hidden and non-image files, a hidden folder; every class keeps readable images."""
    classes = ("hot dog", "café ☕")
    make_image_folder(root, classes=classes, train=4, test=2)
    for name, (write, _) in CONVERTIBLE.items():
        write(root / "train" / classes[0] / name)
    for name, (write, _) in UNREADABLE.items():
        write(root / "train" / classes[1] / name)
    for name in IGNORED:
        (root / "train" / classes[0] / name).write_bytes(b"\x00junk")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    return root


def test_unreadable_images_stop_before_training_naming_each_file(tmp_path):
    root = bad_data_folder(tmp_path)
    with pytest.raises(ImageReadError) as error:
        ImageFolder(root / "train")
    message = str(error.value)
    assert f"{len(UNREADABLE)} images in {root / 'train'} cannot be read" in message
    assert "data.skip_bad_images=true" in message
    for name, (_, reason) in UNREADABLE.items():
        line = next(
            line for line in message.splitlines() if line.strip().startswith(str(root / "train" / "café ☕" / name))
        )
        assert reason in line, line


def test_skip_bad_images_leaves_them_out_and_lists_them(tmp_path, caplog):
    root = bad_data_folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="finetune.data.images"):
        dataset = ImageFolder(root / "train", skip_bad_images=True)
    assert dataset.classes == ["café ☕", "hot dog"]  # hidden folder ignored, unicode and spaces kept
    files = {path.name for path, _ in dataset.samples}
    assert files == {f"{i:03d}.png" for i in range(4)} | set(CONVERTIBLE)
    assert len(dataset.samples) == 8 + len(CONVERTIBLE)  # no hidden or non-image file, no bad image
    assert {path.name for path in dataset.skipped} == set(UNREADABLE)
    assert all(str(root / "train" / "café ☕" / name) in caplog.text for name in UNREADABLE)
    image, label = dataset[[p.name for p, _ in dataset.samples].index("grey16.png")]
    assert image.mode == "RGB" and dataset.classes[label] == "hot dog"


def test_a_class_s_sub_folders_hold_its_images_too_as_torchvision_finds_them(tmp_path):
    """Photos kept in folders of their own within a class folder (by date, by source) are the class's, as
    torchvision's ImageFolder finds them (here in its order too); a hidden folder (`.ipynb_checkpoints`) is not."""
    make_image_folder(tmp_path, train=2, test=1)
    red = tmp_path / "train" / "red"
    for folder in ("2024/b", "2024/a", ".ipynb_checkpoints"):
        (red / folder).mkdir(parents=True)
        (red / folder / "photo.png").write_bytes((red / "000.png").read_bytes())
    (red / "2024" / "z.png").write_bytes((red / "000.png").read_bytes())
    dataset = ImageFolder(tmp_path / "train")
    found = [str(path.relative_to(tmp_path / "train")) for path, _ in dataset.samples]
    assert found == [
        *(f"blue/{i:03d}.png" for i in range(2)),
        *(f"red/{i:03d}.png" for i in range(2)),
        "red/2024/z.png",
        "red/2024/a/photo.png",
        "red/2024/b/photo.png",
    ]
    assert dataset.targets == [0, 0, 1, 1, 1, 1, 1]
    reference = torchvision.datasets.ImageFolder(tmp_path / "train", is_valid_file=lambda p: ".ipynb" not in p)
    assert [(Path(path), label) for path, label in reference.samples] == dataset.samples


def test_a_run_trains_through_every_case_with_skip_bad_images(tmp_path):
    root = bad_data_folder(tmp_path / "data")
    overrides = ["data=imagefolder", f"data.root={root}", *TINY, *SMALL_MODEL, "data.val_fraction=0"]
    metrics = train(compose_train(tmp_path, [*overrides, "data.skip_bad_images=true"]))
    assert 0.0 <= metrics["test/acc"] <= 1.0
    with pytest.raises(ImageReadError, match="truncated.jpg"):  # the same data without the flag
        train(compose_train(tmp_path, overrides))


def test_forked_processes_give_what_one_gives_in_order(tmp_path):
    assert list(forked_map(str, range(100), processes=3, chunksize=7)) == [str(i) for i in range(100)]
    root = bad_data_folder(tmp_path)
    paths = sorted(path for path in root.rglob("*") if path.is_file())
    problems = list(forked_map(_problem, paths, processes=3))  # the reasons cross from the processes
    assert problems == [_problem(path) for path in paths]
    bad = {path.name: problem for path, problem in zip(paths, problems, strict=True) if problem}
    assert set(bad) == set(UNREADABLE) | set(IGNORED)  # IGNORED files are junk too
    assert all(reason in bad[name] for name, (_, reason) in UNREADABLE.items())


def killed_at_three(item: int) -> int:
    if item == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel kills a process that runs out of memory
    return item


def test_a_process_that_dies_is_an_error_not_a_wait_for_ever():
    # a multiprocessing.Pool would wait for ever: the suite must not
    with within(60, "forked_map still waits for a process that died"), pytest.raises(BrokenProcessPool):
        list(forked_map(killed_at_three, range(8), processes=2))


def test_without_an_affinity_mask_every_core_counts(monkeypatch):
    """macOS has no os.sched_getaffinity: the check's processes and data.num_workers=auto count every core."""
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert per_core(1000) == (4, 62)  # 4 processes, chunks of 1000 / 16
    assert default_num_workers() == 4


def test_the_check_decodes_a_set_of_files_once_and_again_after_any_change(tmp_path, decoded_images):
    root, records = bad_data_folder(tmp_path / "data"), tmp_path / "checked"
    first = ImageFolder(root / "train", skip_bad_images=True, checked_dir=records)
    files = len(decoded_images)
    assert files == len(first.samples) + len(UNREADABLE)
    decoded_images.clear()
    again = ImageFolder(root / "train", skip_bad_images=True, checked_dir=records)
    assert decoded_images == [] and again.samples == first.samples and again.skipped == first.skipped
    with pytest.raises(ImageReadError, match=f"{len(UNREADABLE)} images in"):  # the record's problems stop it too
        ImageFolder(root / "train", checked_dir=records)
    assert decoded_images == []
    good = first.samples[0][0]
    good.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # cut short after the check
    with pytest.raises(ImageReadError, match=f"{len(UNREADABLE) + 1} images in(.|\n)*{re.escape(good.name)}"):
        ImageFolder(root / "train", checked_dir=records)
    assert len(decoded_images) == files  # a changed file: the whole set again (its key is of every file)
    decoded_images.clear()
    good.unlink()
    removed = ImageFolder(root / "train", skip_bad_images=True, checked_dir=records)
    assert len(decoded_images) == files - 1 and len(removed.samples) == len(first.samples) - 1


def test_runs_that_check_the_same_files_at_once_decode_them_once(tmp_path, monkeypatch):
    meet_in(monkeypatch, images, "find_bad_images", tmp_path / "checks")
    with within(120, "runs still wait for one another"):
        at_once(ImageFolder, bad_data_folder(tmp_path / "data") / "train", None, True, tmp_path / "checked", runs=3)
    assert len((tmp_path / "checks").read_text().splitlines()) == 1
    assert [file.suffix for file in (tmp_path / "checked").iterdir()] == [".json"]  # no lock file left


def test_a_process_that_dies_holding_the_lock_lets_go_of_it(tmp_path):
    record = tmp_path / "record.json"

    def dies_holding_it() -> None:
        with one_at_a_time(record):
            os.kill(os.getpid(), signal.SIGKILL)

    holder = multiprocessing.get_context("fork").Process(target=dies_holding_it)
    holder.start()
    holder.join(60)
    assert holder.exitcode == -signal.SIGKILL and (tmp_path / "record.json.lock").exists()
    with within(30, "the lock of a killed process is still held"), one_at_a_time(record):
        record.write_text("{}")
    assert [file.name for file in tmp_path.iterdir()] == ["record.json"]


def test_a_checked_dir_that_cannot_be_written_costs_the_decoding_only(tmp_path, decoded_images, caplog):
    root = make_image_folder(tmp_path / "data", train=2, test=1)
    (tmp_path / "file").write_text("")
    with caplog.at_level(logging.WARNING, logger="finetune.data.images"):
        for _ in range(2):
            assert len(ImageFolder(root / "train", checked_dir=tmp_path / "file" / "checked")) == 4
    assert len(decoded_images) == 2 * 4
    assert "set data.checked_dir to a writable folder" in caplog.text


def test_runs_with_the_default_config_decode_each_image_once(tmp_path, decoded_images):
    root = make_image_folder(tmp_path / "images")
    cfg = compose_train(tmp_path, ["data=imagefolder", f"data.root={root}"])  # the recipe's model and data settings
    assert Path(cfg.data.checked_dir) == tmp_path / "data" / "checked"
    build_datamodule(cfg).setup("fit")
    assert sorted(decoded_images) == sorted(root.rglob("*.png"))  # train and test
    decoded_images.clear()
    build_datamodule(cfg).setup("fit")  # the next run over the same files
    assert decoded_images == []


def test_a_class_whose_images_are_all_bad_is_named(tmp_path):
    make_image_folder(tmp_path, classes=("a", "b"), train=1, test=1)
    (tmp_path / "train" / "b" / "000.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"Class folder .*train/b holds no readable images"):
        ImageFolder(tmp_path / "train", skip_bad_images=True)


def test_one_class_only_is_refused(tmp_path):
    make_image_folder(tmp_path, classes=("only",), train=2, test=1)
    with pytest.raises(DataError, match=r"train has only one class folder \(only\): a classifier needs at least 2"):
        ImageFolder(tmp_path / "train")


def test_empty_splits_are_named(tmp_path):
    make_image_folder(tmp_path, classes=("a", "b"), train=2, test=1)
    for image in (tmp_path / "test").rglob("*.png"):
        image.unlink()
    with pytest.raises(DataError, match=r"Class folder .*test/a holds no images \(\.jpg"):
        ImageFolder(tmp_path / "test")
    flat = tmp_path / "flat"  # images straight in the split folder, no class folders
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "x.png")
    with pytest.raises(DataError, match=r"flat has no class folders"):
        ImageFolder(flat)
    with pytest.raises(MissingFileError, match=r"Missing folder .*nowhere"):
        ImageFolder(tmp_path / "nowhere")


def test_a_validation_fraction_that_leaves_no_training_image_is_refused(tmp_path):
    make_image_folder(tmp_path, classes=("a", "b"), train=2, test=1)
    datamodule = ImageFolderDataModule(InputConfig(32), tmp_path, val_fraction=0.9)
    with pytest.raises(ConfigError, match=r"data.val_fraction=0.9 leaves none of the 4 training images"):
        datamodule.setup()

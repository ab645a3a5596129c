"""Large JPEGs decoded at the smallest DCT scale that the transforms still need (`decode_side`, `read_rgb`'s
`at_least`): a phone's 12 MP photo is decoded at 1/4 size for evaluation and at 1/2 for training, to nearly the
pixels of the full decode, and the same way by the test split, predict.py and the demo."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from finetune.data import images
from finetune.data.datamodule import ImageFolderDataModule
from finetune.data.images import read_rgb
from finetune.data.transforms import decode_side, eval_transform
from finetune.models import InputConfig
from finetune.predict import load_image
from finetune.train import train
from tests.helpers import compose_train, make_image_folder

CONFIG = InputConfig(224)  # resized to 256, the centre 224 cropped


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4032x3024 JPEG, as a phone stores a 12 MP photo: coarse detail, smooth between."""
    rng = np.random.default_rng(0)
    coarse = Image.fromarray(rng.integers(0, 256, (189, 252, 3), dtype=np.uint8))
    path = tmp_path_factory.mktemp("photo") / "photo.jpg"
    coarse.resize((4032, 3024), Image.Resampling.BICUBIC).save(path, quality=90)
    return path


def test_every_random_crop_of_an_image_with_the_decode_side_is_shrunk_never_enlarged():
    """d2l's RandomResizedCrop(224) takes 8 % to all of the area at aspect ratios 3/4 to 4/3: its smallest crop
    has 0.245 of the short side, so an image needs 915 px for every crop to be at least 224 px on both sides."""
    side = decode_side(CONFIG, "d2l")
    assert side == 915 and decode_side(CONFIG, "trivialaugment") == side and decode_side(CONFIG) == 2 * 256
    crop = v2.RandomResizedCrop(224)  # torchvision's ranges, as the presets use
    torch.manual_seed(0)
    for height, width in ((side, side), (side, side * 4 // 3), (side * 2, side)):
        crops = [crop.make_params([torch.empty(3, height, width)]) for _ in range(3000)]
        assert min(min(params["height"], params["width"]) for params in crops) >= 224


def test_a_large_jpeg_is_decoded_at_the_smallest_scale_that_keeps_the_side(photo, tmp_path):
    assert read_rgb(photo).size == (4032, 3024)
    for at_least, size in ((256, (504, 378)), (915, (2016, 1512)), (3024, (4032, 3024)), (5000, (4032, 3024))):
        assert read_rgb(photo, at_least).size == size, at_least
    for size, decoded in (((1210, 1000), (605, 500)), ((1211, 1000), (1211, 1000))):
        Image.open(photo).resize(size).save(tmp_path / "cropped.jpg")  # sides that 1/4, 1/8 (or 1/2) leave a part of
        assert read_rgb(tmp_path / "cropped.jpg", 256).size == decoded
    Image.open(tmp_path / "cropped.jpg").save(tmp_path / "cropped.png")  # not a JPEG: read whole
    assert read_rgb(tmp_path / "cropped.png", 256).size == (1211, 1000)


@pytest.mark.parametrize("size", [(4032, 3024), (2410, 4032)], ids=["12MP", "cropped"])
def test_evaluation_sees_nearly_the_pixels_of_the_full_decode(photo, tmp_path, size):
    """Decoded at twice the resize (1/4 size here), the antialiased resize halves it again: close to the full
    decode. A cropped photo whose sides 1/4 would leave a part of is decoded at 1/2: its 1/4 (603x1008) would
    resize to 427 px instead of 428, and move the crop by half a pixel (54 levels off at edges, measured)."""
    Image.open(photo).resize(size).save(tmp_path / "photo.jpg", quality=90)
    transform = eval_transform(CONFIG)
    full, drafted = (transform(read_rgb(tmp_path / "photo.jpg", side)) for side in (None, decode_side(CONFIG)))
    levels = (full - drafted).abs() * torch.tensor(CONFIG.std).view(3, 1, 1) * 255  # in uint8 levels
    assert levels.mean() < 1.0 and levels.max() <= 6  # measured: 0.57, at most 4


def test_the_splits_predict_py_and_the_demo_read_a_photo_as_their_transform_needs(photo, tmp_path):
    make_image_folder(tmp_path, train=4, test=2)
    for split in ("train", "test"):
        shutil.copy(photo, tmp_path / split / "red" / "photo.jpg")
    data = ImageFolderDataModule(CONFIG, tmp_path, val_fraction=0.25, num_workers=0)
    data.setup()
    sides = {split: dataset.dataset.at_least for split, dataset in data.datasets.items()}
    assert sides == {"train": 915, "val": 512, "test": 512}
    test = data.datasets["test"]
    position = [path.name for path, _ in test.dataset.samples].index("photo.jpg")
    assert test.image(position).size == (1008, 756)
    _, predicted, _ = load_image(photo, eval_transform(CONFIG), decode_side(CONFIG))  # predict.py's and the demo's
    assert torch.equal(predicted, test[position][0])


def test_the_store_keeps_the_pixels_the_eval_transform_reads_from_the_photo(photo, tmp_path):
    """The store decodes each image once as the eval transform reads it (`resized_from` its resize): a stored photo
    evaluates to the same pixels as the file."""
    make_image_folder(tmp_path / "images", train=4, test=2)
    shutil.copy(photo, tmp_path / "images" / "test" / "red" / "photo.jpg")
    tests = []
    for store in (False, True):
        data = ImageFolderDataModule(CONFIG, tmp_path / "images", num_workers=0, store=store, store_dir=tmp_path)
        data.setup()
        tests.append(data.datasets["test"])
    files, stored = tests
    position = [path.name for path, _ in files.dataset.samples].index("photo.jpg")
    assert stored.dataset.side == 256
    torch.testing.assert_close(stored[position][0], files[position][0], rtol=0, atol=0)


def test_train_py_with_the_defaults_reads_a_photo_at_its_transforms_sides(photo, tmp_path, monkeypatch, one_thread):
    """The recommended recipe on pretrained Lite0 (debug=tiny's 32 px: an eval resize of 37 px): the 12 MP photo
    is read at 1/8 size for training (a 131 px crop side) and for evaluation (74 px), the sides the config
    gives through the backbone's input config."""
    make_image_folder(tmp_path / "images", train=4, test=2)
    for split in ("train", "test"):
        shutil.copy(photo, tmp_path / "images" / split / "red" / "photo.jpg")
    read = []

    def recorded(path: Path, at_least: int | None = None):
        if Path(path).name == "photo.jpg":
            read.append(at_least)
        return read_rgb(path, at_least)

    monkeypatch.setattr(images, "read_rgb", recorded)
    overrides = ["data=imagefolder", f"data.root={tmp_path / 'images'}", "model=efficientnet_lite0", "debug=tiny"]
    metrics = train(compose_train(tmp_path, [*overrides, "trainer.max_epochs=2", "data.val_fraction=0"]))
    assert 0 <= metrics["test/acc"] <= 1
    config = InputConfig(32)
    assert set(read) == {decode_side(config, "d2l"), decode_side(config)} == {131, 74}

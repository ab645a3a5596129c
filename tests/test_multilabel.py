"""Multi-label classification (`data=multilabel`): CSVs of images with several labels each, read with the image
folders' splits, subsets, seeded batches, store and bad-image handling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune.data.images import ImageReadError
from finetune.data.multilabel import MultiLabelDataModule
from finetune.data.synthetic import SHAPES, generate_multilabel_shapes
from finetune.errors import DataError, MissingFileError
from finetune.models import InputConfig

CONFIG = InputConfig(32, (0.5,) * 3, (0.5,) * 3)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """40 training and 12 test images of two or three of the four shapes each."""
    return generate_multilabel_shapes(tmp_path_factory.mktemp("multilabel"), train=40, test=12, size=48)


def datamodule(root: Path, **settings) -> MultiLabelDataModule:
    data = MultiLabelDataModule(input_config=CONFIG, root=root, batch_size=8, num_workers=0, **settings)
    data.setup()
    return data


def write_csv(root: Path, split: str, *rows: str, header: str = "path,labels") -> None:
    (root / f"{split}.csv").write_text("\n".join([header, *rows]) + "\n")


def test_targets_are_multi_hot_vectors_over_the_sorted_labels(shapes):
    data = datamodule(shapes)
    assert data.classes == sorted(SHAPES) == ["circle", "cross", "square", "triangle"]
    first = (shapes / "train.csv").read_text().splitlines()[1]  # images/train_0000.png,circle|cross|square
    path, labels = first.split(",")
    dataset = data.read_split("train")
    image, target = dataset[0]
    assert dataset.samples[0][0] == shapes / path and image.size == (48, 48)
    assert target.dtype == torch.float32
    assert [data.classes[i] for i in target.nonzero().flatten().tolist()] == labels.split("|")
    assert data.class_counts() == [sum(t.tolist()[i] for _, t in data.datasets["train"]) for i in range(4)]
    images, targets = next(iter(data.train_dataloader()))
    assert images.shape == (8, 3, 32, 32) and targets.shape == (8, 4) and set(targets.unique().tolist()) == {0.0, 1.0}


def test_an_image_without_labels_and_paths_relative_to_root(tmp_path, shapes):
    root = tmp_path / "data"
    root.mkdir()
    (root / "photos").symlink_to(shapes / "images")
    write_csv(
        root, "train", "photos/train_0000.png,dog|grass", "photos/train_0001.png,", " photos/train_0002.png , grass "
    )
    write_csv(root, "test", "photos/test_0000.png,grass")
    data = datamodule(root, val_fraction=0)
    assert data.classes == ["dog", "grass"]
    assert [t.tolist() for _, t in data.read_split("train")] == [[1.0, 1.0], [0.0, 0.0], [0.0, 1.0]]
    assert data.class_counts() == [1, 2]


def test_missing_csv_column_and_image_are_named(tmp_path, shapes):
    root = tmp_path / "data"
    root.mkdir()
    with pytest.raises(MissingFileError, match=r"no train.csv in .*data.*columns path,labels"):
        datamodule(root)
    write_csv(root, "train", f"{shapes}/images/train_0000.png,a,b", header="path,labels,notes")
    with pytest.raises(DataError, match=r"unknown: \['notes'\], missing: \[\]\): expected exactly path,labels"):
        datamodule(root)
    write_csv(root, "train", f"{shapes}/images/train_0000.png,a", "gone.png,b", "also_gone.png,a")
    write_csv(root, "test", f"{shapes}/images/test_0000.png,a")
    with pytest.raises(MissingFileError, match=r"2 images listed in .*train.csv are not there(.|\n)*gone.png"):
        datamodule(root)
    write_csv(root, "train", f"{shapes}/images/train_0000.png,a", f"{shapes}/images/train_0001.png,b")
    write_csv(root, "test", f"{shapes}/images/test_0000.png,a|c")
    with pytest.raises(DataError, match=r"test.csv has labels that train.csv has not: \['c'\]"):
        datamodule(root)


def test_bad_and_missing_images_are_skipped_with_skip_bad_images(tmp_path, shapes, caplog):
    root = tmp_path / "data"
    root.mkdir()
    (root / "broken.png").write_bytes(b"not a png")
    rows = [f"{shapes}/images/train_{i:04d}.png,a|b" for i in range(4)]
    write_csv(root, "train", *rows, "broken.png,a", "gone.png,b")
    write_csv(root, "test", f"{shapes}/images/test_0000.png,a")
    with pytest.raises(MissingFileError, match="gone.png"):
        datamodule(root)
    (root / "gone.png").write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"2 images in .* cannot be read(.|\n)*broken.png(.|\n)*gone.png"):
        datamodule(root)
    (root / "gone.png").unlink()
    data = datamodule(root, skip_bad_images=True, val_fraction=0)
    assert len(data.datasets["train"]) == 4
    assert "broken.png" in caplog.text and "gone.png" in caplog.text


def test_few_shot_gives_every_class_at_least_k_images_in_nested_subsets(shapes):
    small, large = (datamodule(shapes, shots=k) for k in (3, 6))
    for data, k in ((small, 3), (large, 6)):
        assert min(data.class_counts()) >= k
        assert len(data.datasets["train"]) < 36  # fewer than the training part of the split
    assert set(small.datasets["train"].indices) <= set(large.datasets["train"].indices)
    assert small.datasets["val"].indices == large.datasets["val"].indices == datamodule(shapes).datasets["val"].indices


def test_folds_partition_the_training_images(shapes):
    folds = [datamodule(shapes, folds=4, fold=k).datasets["val"].indices for k in range(4)]
    assert sorted(i for fold in folds for i in fold) == list(range(40))


def test_batches_resume_mid_epoch_and_the_store_gives_the_same_targets(tmp_path, shapes):
    def epoch(data: MultiLabelDataModule, number: int, state: dict | None = None) -> list[torch.Tensor]:
        loader = data.train_dataloader()
        if state:
            loader.load_state_dict(state)
        loader.sampler.set_epoch(number)
        return [batch[-1] for batch in loader]  # the stored images' batches are CropSamples, label last

    files = datamodule(shapes)
    whole = epoch(files, 1)
    torch.testing.assert_close(epoch(datamodule(shapes), 1, {"epoch": 1, "batches": 2}), whole[2:], rtol=0, atol=0)
    stored = datamodule(shapes, store=True, store_dir=tmp_path, augment_on="device")
    torch.testing.assert_close(epoch(stored, 1), whole, rtol=0, atol=0)

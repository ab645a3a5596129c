"""Streaming prediction over files: every file gets a row, unreadable ones with their reason."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from finetune.data.transforms import eval_transform
from finetune.errors import MissingFileError
from finetune.models import InputConfig
from finetune.predict import ImagePaths, predict
from tests.helpers import tiny_meta

META = tiny_meta()
TRANSFORM = eval_transform(InputConfig.from_dict(META))
COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


def colour_classifier() -> nn.Module:
    """A fixed linear model on the mean of each normalised channel: a red image is `red` (class 0), and so on."""
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3))
    with torch.no_grad():
        model[2].weight.copy_(torch.eye(3) * 2)
        model[2].bias.zero_()
    return model


GOOD = {"a.png": "red", "c.jpg": "green", "d.JPEG": "blue", "b_sub/e.png": "red", "f.png": "blue"}


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Good PNGs and JPEGs (one in a sub-folder, one with an upper-case suffix), three unreadable files,
    and files that are not looked at: hidden, not an image by name."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    (root / "b_sub").mkdir()
    for name, colour in GOOD.items():
        size = (40, 30) if name.endswith("png") else (50, 70)
        noisy = np.array(COLOURS[colour]) + rng.normal(0, 20, (*size, 3))
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(root / name)
    jpeg = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg, format="JPEG")
    (root / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (root / "text.jpg").write_text("not an image\n")
    (root / "empty.png").write_bytes(b"")
    (root / ".hidden.png").write_bytes((root / "a.png").read_bytes())
    (root / "notes.txt").write_text("skipped: not an image by name\n")
    return root


# a folder's files, then its sub-folders' (finetune.data.images.image_files: the order training reads a class folder)
EXPECTED = ["a.png", "c.jpg", "d.JPEG", "empty.png", "f.png", "text.jpg", "truncated.jpg", "b_sub/e.png"]
BAD = {"empty.png": "UnidentifiedImageError", "text.jpg": "UnidentifiedImageError", "truncated.jpg": "truncated"}


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_folders_are_walked_recursively_sorted_and_only_images(photos):
    assert [p.relative_to(photos).as_posix() for p in ImagePaths(photos)] == EXPECTED
    assert list(ImagePaths(photos)) == list(ImagePaths(photos))  # iterable again
    assert [p.name for p in ImagePaths(photos / "**" / "*.png")] == ["a.png", "e.png", "empty.png", "f.png"]
    assert list(ImagePaths(photos / "notes.txt")) == [photos / "notes.txt"]  # a named file is taken as it is
    assert list(ImagePaths(photos / "*.gif")) == []
    with pytest.raises(MissingFileError, match="nowhere.jpg"):
        ImagePaths(photos / "nowhere.jpg")


def test_every_file_gets_a_row_and_unreadable_ones_their_reason(photos, tmp_path):
    out = tmp_path / "predictions.csv"
    summary = predict(colour_classifier(), META, ImagePaths(photos), TRANSFORM, 3, "cpu", top_k=2, output_csv=out)
    rows = read_rows(out)
    header = ["path", "top1_class", "top1_prob", "top2_class", "top2_prob", "error"]
    assert list(rows[0]) == header
    assert [Path(row["path"]).relative_to(photos).as_posix() for row in rows] == EXPECTED
    for row in rows:
        name = Path(row["path"]).relative_to(photos).as_posix()
        if name in BAD:
            assert BAD[name] in row["error"] and row["top1_class"] == row["top1_prob"] == "", row
            continue
        assert row["error"] == "" and row["top1_class"] == GOOD[name]
        first, second = float(row["top1_prob"]), float(row["top2_prob"])
        assert 1 > first > second > 0 and first + second < 1
    assert summary.images == 8 and summary.errors == 3
    assert summary.per_class == {"red": 2, "green": 1, "blue": 2}


def test_top_k_probabilities_are_sorted_and_temperature_keeps_the_ranking(photos, tmp_path):
    model = colour_classifier()
    rows = {}
    for temperature in (1.0, 4.0):
        out = tmp_path / f"t{temperature}.csv"
        meta = tiny_meta(temperature=temperature)
        predict(model, meta, ImagePaths(photos), TRANSFORM, 4, "cpu", top_k=5, output_csv=out, progress=False)
        rows[temperature] = [row for row in read_rows(out) if not row["error"]]
    for sharp, soft in zip(rows[1.0], rows[4.0], strict=True):
        assert "top4_class" not in sharp  # top_k capped at the 3 classes
        ranks = [[row[f"top{i}_class"] for i in (1, 2, 3)] for row in (sharp, soft)]
        assert ranks[0] == ranks[1] and sorted(ranks[0]) == sorted(META["classes"])
        sharp_probs, soft_probs = ([float(row[f"top{i}_prob"]) for i in (1, 2, 3)] for row in (sharp, soft))
        assert sharp_probs == sorted(sharp_probs, reverse=True) and sum(sharp_probs) == pytest.approx(1, abs=1e-5)
        assert soft_probs[0] < sharp_probs[0] and soft_probs[2] > sharp_probs[2]  # flatter, same order


def test_workers_share_the_files_without_repeats(photos, tmp_path):
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    model = colour_classifier()
    predict(model, META, ImagePaths(photos), TRANSFORM, 2, "cpu", output_csv=one, progress=False)
    predict(model, META, ImagePaths(photos), TRANSFORM, 2, "cpu", output_csv=two, num_workers=2, progress=False)
    by_path = [{row["path"]: row for row in read_rows(path)} for path in (one, two)]
    assert len(read_rows(two)) == len(by_path[1]) == 8
    for path, row in by_path[0].items():
        other = by_path[1][path]
        assert row["top1_class"] == other["top1_class"] and row["error"] == other["error"]
        assert float(row["top1_prob"] or 0) == pytest.approx(float(other["top1_prob"] or 0), abs=1e-5)

"""Checkpoints that cannot be used as given: resumed on data with other classes, or damaged (cut short by a copy or
a full disk). Each is one `Error:` line that says what is wrong and what to use instead, before any work."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import finetune.demo
from finetune.demo import serve
from finetune.errors import DamagedFileError, DataError, MissingFileError
from finetune.eval import evaluate
from finetune.export import export_checkpoint
from finetune.predict import predict_files
from finetune.train import train
from finetune.wise_ft import wise_ft
from tests.helpers import SMALL_MODEL, TINY, compose_train, make_image_folder, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def run_args(image_folder: Path) -> list[str]:
    return ["data=imagefolder", f"data.root={image_folder}", *TINY, *SMALL_MODEL]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, image_folder: Path) -> Path:
    """A tiny run's folder: checkpoints/epoch_000.ckpt (the best) and last.ckpt, classes blue and red."""
    root = tmp_path_factory.mktemp("trained")
    train(compose_train(root, run_args(image_folder)))
    return root / "run"


@pytest.mark.parametrize("classes", [("cat", "dog", "emu"), ("blue", "green")], ids=["more", "renamed"])
def test_resuming_on_data_with_other_classes_names_both_before_any_work(tmp_path, trained, classes):
    """3 classes: torch's `size mismatch for head.bias` before; 2 other names: the head went on silently."""
    other = make_image_folder(tmp_path / "other", classes=classes, train=4, test=2)
    cfg = compose_train(tmp_path, [*run_args(other), f"ckpt_path={trained}"])
    listed = ", ".join(f"'{name}'" for name in classes)
    with pytest.raises(DataError, match=rf"classes \['blue', 'red'\], but the data \(data.root\) has .*\[{listed}\]"):
        train(cfg)
    assert not (tmp_path / "run").exists()  # nothing logged, validated or saved


def test_the_commands_after_training_take_the_run_folder_that_train_py_prints(
    tmp_path, trained, image_folder, monkeypatch
):
    """`ckpt_path=<run folder>` means its checkpoints/last.ckpt, as for train.py's resume; a path that is neither
    says so, as does a folder without it, before any work."""
    by_file, by_folder = (
        evaluate(compose_train(tmp_path / name, [f"ckpt_path={path}", f"eval.output_dir={tmp_path / name}"], "eval"))
        for name, path in (("file", trained / "checkpoints" / "last.ckpt"), ("folder", trained))
    )
    assert by_folder == by_file
    commands = {
        "eval": evaluate,
        "predict": predict_files,
        "export": export_checkpoint,
        "wise_ft": wise_ft,
        "demo": serve,
    }
    monkeypatch.setattr(finetune.demo, "import_gradio", lambda: None)  # the checkpoint is read before the page
    for path, error in (
        (tmp_path / "nowhere", "no such file or run folder: "),
        (image_folder, "the run folder has no "),
    ):
        for name, command in commands.items():
            cfg = compose_train(
                tmp_path, [f"ckpt_path={path}", *([f"input={image_folder}"] * (name == "predict"))], name
            )
            with pytest.raises(MissingFileError, match=error):
                command(cfg)


def damaged_copy(trained: Path, folder: Path) -> Path:
    """A copy of the run whose last.ckpt was cut short (a copy interrupted, a full disk on another machine)."""
    shutil.copytree(trained, folder, ignore=shutil.ignore_patterns("tensorboard"))
    last = folder / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    return last


def test_a_damaged_checkpoint_is_called_damaged_and_the_whole_one_beside_it_named(tmp_path, trained, image_folder):
    last = damaged_copy(trained, tmp_path / "logs" / "train" / "runs" / "copied")
    whole = last.parent / "epoch_000.ckpt"
    damaged = pytest.raises(DamagedFileError, match=rf"{last} is damaged .*newest whole one beside it: .*={whole}$")
    with damaged:
        evaluate(compose_train(tmp_path, [f"ckpt_path={last}"], "eval"))
    with damaged:
        predict_files(compose_train(tmp_path, [f"ckpt_path={last}", f"input={image_folder / 'test'}"], "predict"))
    with damaged:
        train(compose_train(tmp_path, [*run_args(image_folder), f"ckpt_path={last.parent.parent}"]))
    torch.load(whole, weights_only=True)  # the one named is whole

    # train.py ckpt_path=last, as typed: one line, no traceback, not "refusing" (which is for files that run code)
    result = run_cli(["train.py", *run_args(image_folder), "ckpt_path=last"], tmp_path, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert "is damaged" in line and "refusing" not in line and str(whole) in line


def test_a_damaged_checkpoint_alone_says_so(tmp_path):
    lonely = tmp_path / "last.ckpt"
    lonely.write_bytes(b"")  # a copy that never got its first byte
    with pytest.raises(DamagedFileError, match="no whole one is beside it"):
        evaluate(compose_train(tmp_path, [f"ckpt_path={lonely}"], "eval"))

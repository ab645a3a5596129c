"""The one-way build: the backbone's metadata decides the data, the checkpoint holds what rebuilds the model,
and the debug configs run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.transforms import v2

from finetune.builders import build_datamodule
from finetune.config import PROJECT_ROOT
from finetune.models.module import FineTuneModule
from finetune.train import train
from tests.helpers import SMALL_MODEL, TINY, compose_train, doc_commands, doc_section, run_cli


def resize_of(transform: v2.Compose) -> v2.Resize:
    (resize,) = (t for t in transform.transforms if isinstance(t, v2.Resize))
    return resize


@pytest.mark.parametrize(
    ("overrides", "crop", "resize", "interpolation", "mean"),
    [
        (["model=resnet18"], 224, 256, "bilinear", (0.485, 0.456, 0.406)),
        (["model=resnet50"], 224, 232, "bilinear", (0.485, 0.456, 0.406)),  # torchvision's V2 weights: 232
        (["model=torchvision", "model.name=mobilenet_v2"], 224, 232, "bilinear", (0.485, 0.456, 0.406)),
        (["model=efficientnet_lite0"], 224, 256, "bicubic", (0.5, 0.5, 0.5)),
        (["model=efficientnet_lite0", "data.image_size=128"], 128, 146, "bicubic", (0.5, 0.5, 0.5)),  # 128 / 0.875
        (["model=efficientnet_lite1"], 240, 272, "bicubic", (0.5, 0.5, 0.5)),  # 240 / 0.882
        (["model=efficientnet_lite2"], 260, 292, "bicubic", (0.5, 0.5, 0.5)),  # 260 / 0.89
    ],
)
def test_the_data_follows_what_the_weights_expect(tmp_path, overrides, crop, resize, interpolation, mean):
    datamodule = build_datamodule(compose_train(tmp_path, ["data=synthetic", "data.image_size=null", *overrides]))
    config = datamodule.input_config
    assert (config.image_size, config.resize, config.interpolation, config.mean) == (crop, resize, interpolation, mean)
    eval_resize = resize_of(datamodule.eval_transform)
    assert eval_resize.size == [resize] and eval_resize.interpolation.value == interpolation  # the short side


def test_a_checkpoint_rebuilds_its_model_from_itself_alone(tmp_path, image_folder):
    overrides = ["data=imagefolder", f"data.root={image_folder}", *TINY, "model=efficientnet_lite0", "strategy=freeze"]
    train(compose_train(tmp_path, overrides))
    moved = tmp_path / "elsewhere" / "model.ckpt"
    moved.parent.mkdir()
    shutil.copy(tmp_path / "run" / "checkpoints" / "last.ckpt", moved)
    shutil.rmtree(tmp_path / "run")  # no run folder, no config: the checkpoint alone

    checkpoint = torch.load(moved, map_location="cpu", weights_only=True)  # plain containers only
    model = FineTuneModule.from_checkpoint(moved)
    assert model.classes == ["blue", "red"] and not model.training
    assert model.input_config.image_size == 32 and model.input_config.interpolation == "bicubic"
    assert checkpoint["run_settings"]["data"]["root"] == str(image_folder)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, checkpoint["state_dict"][name]), name
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 2)


def test_debug_configs_run_the_pipeline(tmp_path, image_folder):
    data = ["data=imagefolder", f"data.root={image_folder}", "data.image_size=32", "data.batch_size=4"]
    data += SMALL_MODEL
    fdr = train(compose_train(tmp_path / "fdr", [*data, "debug=fdr"]))
    assert "test/acc" in fdr and not (tmp_path / "fdr" / "run" / "checkpoints").exists()  # fast_dev_run saves none
    train(compose_train(tmp_path / "limit", [*data, "debug=limit"]))
    last = torch.load(tmp_path / "limit" / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (2, 9)  # 3 epochs of 3 batches
    overfit = train(compose_train(tmp_path / "overfit", [*data, "debug=overfit", "trainer.max_epochs=2"]))
    assert overfit["train/loss_epoch"] >= 0  # Lightning's overfit_batches replaces the sampler: still runs
    assert compose_train(tmp_path, [*data, "debug=overfit"]).trainer.overfit_batches == 3
    profiler = compose_train(tmp_path, [*data, "debug=profiler"])
    assert profiler.trainer.profiler == "simple" and profiler.data.num_workers == 0


def test_where_things_live_matches_the_tree():
    table = doc_section("docs/contributing.md", "## Where things live").strip().split("\n\n")[0]
    named = set(re.findall(r"`((?:src|conf|tests|benchmarks)/[\w/.]*|[\w]+\.py)`", table))
    assert all((PROJECT_ROOT / path).exists() for path in named), sorted(
        p for p in named if not (PROJECT_ROOT / p).exists()
    )
    modules = {str(p.relative_to(PROJECT_ROOT)) for p in (PROJECT_ROOT / "src" / "finetune").rglob("*.py")}
    folders = {path.rstrip("/") for path in named}
    unnamed = [
        m for m in modules if m not in named and not m.endswith("__init__.py") and str(Path(m).parent) not in folders
    ]
    assert not unnamed, f"not in docs/contributing.md's 'Where things live': {unnamed}"


def test_the_documented_debug_command_runs(tmp_path):
    (command,) = doc_commands("docs/training.md", "## Quick checks (`debug=`)")
    assert command == "python train.py model=efficientnet_lite0 data=synthetic debug=fdr"
    result = run_cli(command.split()[1:], tmp_path)
    assert result.returncode == 0, result.output
    assert "Test accuracy:" in result.output and not list((tmp_path / "logs").rglob("*.ckpt"))
    # The console a user reads: none of Lightning's notices they can do nothing about, and the summary table counts
    # what trains from the first step (the recipe's linear probe: Lite0's head for 3 classes), as the log line does
    notices = ("LeafSpec", "💡", "module(s) in eval mode", "already configured with model summary", "Loading `train_")
    assert not [noise for noise in notices if noise in result.output]
    assert "Trainable parameters: 3,843 of" in result.output and "Trainable params: 3.8 K" in result.output
    assert (
        "Total FLOPs: 141 M" in result.output
    )  # of one image at 96 px (2 x 70 M multiply-adds; timm: 0.4 G at 224 px)


def test_make_lint_runs_as_documented():
    # this environment's ruff, as an activated venv finds it, also when the suite was started as .venv/bin/python
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    result = subprocess.run(
        ["make", "lint"], cwd=PROJECT_ROOT, capture_output=True, text=True, env={**os.environ, "PATH": path}
    )
    assert result.returncode == 0, result.stdout + result.stderr

"""The commands of README.md's first screen and of training, run as a user types them (offline, on generated data)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from finetune.train import train
from tests.helpers import SMALL_MODEL, TINY, compose_train, doc_commands, event_dir, run_cli


def printed_accuracy(output: str) -> float:
    return float(re.search(r"Test accuracy: ([0-9.]+)", output).group(1))


def only_run(root: Path) -> Path:
    (run,) = (root / "logs" / "train" / "runs").iterdir()
    return run


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, image_folder) -> tuple[Path, str]:
    """`python train.py model=resnet18 strategy=freeze` on a generated folder, tiny settings."""
    root = tmp_path_factory.mktemp("cli")
    args = [
        "model=resnet18",
        "strategy=freeze",
        "data=imagefolder",
        f"data.root={image_folder}",
        "strategy.pretrained=false",
    ]
    result = run_cli(["train.py", *TINY, *args, "trainer.max_epochs=2"], root)
    assert result.returncode == 0, result.output
    return only_run(root), result.output


def test_train_writes_config_checkpoints_and_events(trained_run):
    run, output = trained_run
    assert f"(outputs in {run})" in output
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert 0.0 <= printed_accuracy(output) <= 1.0


def test_tensorboard_events_hold_the_logged_scalars(trained_run):
    events = EventAccumulator(str(event_dir(trained_run[0])))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"train/loss_step", "train/acc_epoch", "val/loss", "val/acc", "test/acc", "trainable_stages"}
    assert expected <= tags, tags
    assert {"lr-SGD/backbone", "lr-SGD/head"} <= tags
    assert [e.value for e in events.Scalars("trainable_stages")] == [0.0, 0.0]  # strategy=freeze
    head, backbone = events.Scalars("lr-SGD/head")[0].value, events.Scalars("lr-SGD/backbone")[0].value
    assert head == pytest.approx(10 * backbone)
    assert events.Scalars("test/acc")[-1].value == pytest.approx(printed_accuracy(trained_run[1]), abs=1e-4)


def first_screen() -> list[list[str]]:
    """README's first commands, as typed (without their comments)."""
    return [line.split("#")[0].split() for line in doc_commands("README.md", "# finetune")]


@pytest.mark.slow  # 50 s of one core; the same pipeline (model, data, defaults) runs in the default suite as
# docs/training.md's `debug=fdr` command (tests/test_structure.py)
def test_offline_demo_runs_as_written(tmp_path):
    demo = ["python", "train.py", "model=efficientnet_lite0", "data=synthetic"]
    assert demo in first_screen()
    result = run_cli(demo[1:], tmp_path)
    assert result.returncode == 0, result.output
    assert printed_accuracy(result.output) >= 0.8  # real ImageNet features separate the shapes


def test_default_command_offline_says_what_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert ["python", "train.py"] in first_screen()
    result = run_cli(["train.py"], tmp_path)
    assert result.returncode != 0
    assert "resnet18-f37072fd.pth" in result.output and "model.weights_path=" in result.output


UNFREEZE_AT_1 = ("mobilenetv2_cifar10", "lp_ft", "ulmfit")  # their unfreeze epochs, within 2 epochs


@pytest.mark.parametrize(
    "experiment", ["d2l_hotdog", "d2l_hotdog_scratch", "mobilenetv2_cifar10", "lp_ft", "ulmfit", "llrd_beit"]
)
def test_experiments_run(tmp_path, image_folder, experiment):
    cfg = compose_train(
        tmp_path,
        [
            f"experiment={experiment}",
            f"data.root={image_folder}",
            *SMALL_MODEL,  # the experiments' backbones train in tests/test_training.py
            "debug=tiny",  # not TINY's plain recipe: each experiment pins its own
            "trainer.max_epochs=2",
        ]
        + (["strategy.unfreeze_at=[1]"] if experiment in UNFREEZE_AT_1 else []),
    )
    assert 0.0 <= train(cfg)["test/acc"] <= 1.0

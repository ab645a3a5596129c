"""benchmarks/gpu_check.sh, the check of the GPU paths: its dry run composes every command it would run, and its
tiny run takes every step for real on the CPU (the GPU run itself needs a machine with GPUs)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from finetune.train import PROJECT_ROOT

BENCHMARKS_MD = PROJECT_ROOT / "BENCHMARKS.md"


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", *args], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True
    )


@pytest.fixture
def given_files(tmp_path) -> list[str]:
    """The files a GPU machine gets instead of downloads (empty: a dry run only checks that they exist)."""
    cifar, weights = tmp_path / "cifar10-jpg.tar.gz", tmp_path / "resnet18-f37072fd.pth"
    cifar.touch()
    weights.touch()
    return ["--cifar10", str(cifar), "--resnet18", str(weights)]


def test_the_dry_run_prints_every_gpu_command_and_composes_each(tmp_path, given_files):
    benchmarks_md = BENCHMARKS_MD.read_bytes()
    result = gpu_check("--dry-run", *given_files, "--work", str(tmp_path / "work"))
    assert result.returncode == 0, result.stdout + result.stderr
    composed = [line.removeprefix("composes: ") for line in result.stdout.splitlines() if line.startswith("composes: ")]
    data = f"data.root={tmp_path}/work/cifar10"
    expected = [  # what each step must hold: DDP across the unfreeze, both precisions, SyncBatchNorm, the speeds
        ["python train.py ", "trainer=ddp trainer.devices=", "strategy=freeze_unfreeze 'strategy.unfreeze_at=[1]'"],
        ["python train.py ", "trainer=gpu trainer.precision=16-mixed"],
        ["python train.py ", "trainer=gpu trainer.precision=bf16-mixed"],
        ["python train.py ", "trainer=ddp trainer.devices=", "model.sync_batchnorm=true"],
        ["python -m benchmarks.throughput --accelerator gpu --models resnet18 --sizes 224 --batch-size 256 "],
        ["python -m benchmarks.throughput --accelerator gpu ", "model.channels_last=false"],
        ["python train.py experiment=mobilenetv2_cifar10 model=efficientnet_lite0 ", data, "trainer=gpu"],
    ]
    assert len(composed) == len(expected), result.stdout
    for command, parts in zip(composed, expected, strict=True):
        assert all(part in command for part in parts), (command, parts)
        assert f"   {command}" in result.stdout  # printed before the check too
    for command in composed[:4]:
        assert data in command and f"model.weights_path={tmp_path}/resnet18-f37072fd.pth" in command
    assert "FAILED" not in result.stdout
    assert BENCHMARKS_MD.read_bytes() == benchmarks_md and not (tmp_path / "work" / "logs" / "train").exists()


def test_the_dry_run_names_a_missing_file(tmp_path, given_files):
    result = gpu_check("--dry-run", *given_files[:2], "--resnet18", str(tmp_path / "nowhere.pth"))
    assert result.returncode == 1
    assert result.stderr == f"Error: --resnet18 {tmp_path}/nowhere.pth: no such file\n"


def test_the_dry_runs_check_catches_a_command_that_does_not_compose(capsys):
    from benchmarks import compose_check

    assert compose_check.main(["python train.py model=nope", "python train.py optimizer.lr=-1"]) == 2
    output = capsys.readouterr().out
    assert "FAILED: python train.py model=nope\n  MissingConfigException: " in output
    assert (
        "FAILED: python train.py optimizer.lr=-1\n  ConfigError: Invalid config:\n  optimizer.lr=-1 must be > 0"
        in output
    )


@pytest.mark.slow
def test_the_tiny_run_takes_every_step_on_the_cpu_and_says_so(tmp_path):
    benchmarks_md = BENCHMARKS_MD.read_bytes()
    result = gpu_check("--tiny", "--work", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"GPU check: tiny, on the CPU; work folder {tmp_path}\n")
    assert result.stdout.endswith(f"Results appended to {tmp_path}/gpu_check.md (ran on a GPU: no)\n")
    section = (tmp_path / "gpu_check.md").read_text()
    assert "**Machine:** every step tiny on the CPU (--tiny); " in section
    assert "**Ran on a GPU:** no." in section
    lines = section.splitlines()
    start = lines.index("| step | result | wall s |") + 2
    rows = {
        cells[0]: cells[1]
        for cells in (line.strip("| ").split(" | ") for line in lines[start : lines.index("", start)])
    }
    assert len(rows) == 7
    assert rows["DDP across the unfreeze (trainer=ddp_cpu)"].startswith("ok, test acc ")
    assert rows["DDP across the unfreeze (trainer=ddp_cpu)"].endswith(", trainable stages 0 -> 5")
    assert rows["trainer.precision=16-mixed"] == "skipped: 16-mixed needs a GPU"
    assert rows["trainer.precision=bf16-mixed"].startswith("ok, test acc ")
    assert rows["model.sync_batchnorm=true (trainer=ddp_cpu)"] == "skipped: PyTorch's SyncBatchNorm has no CPU kernel"
    assert rows["fit vs plain loop, channels-last (default)"] == "ok"
    assert rows["fit vs plain loop, model.channels_last=false"] == "ok"
    headline = rows["headline: EfficientNet-Lite0, CIFAR-10, MobileNetV2 recipe (blog: 94.31 %)"]
    assert headline.startswith("ok, test acc ") and headline.endswith(", trainable stages 0 -> 5")
    assert section.count("\n| tiny | 32 | ") == 2  # the throughput table of each variant
    assert BENCHMARKS_MD.read_bytes() == benchmarks_md

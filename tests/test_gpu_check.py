"""benchmarks/gpu_check.sh, the check of the GPU paths on the lent GPU machine: its dry run composes every command it
would run, its bundle (benchmarks/gpu_bundle.sh's wheels) is installed with pip --no-index into its work folder, and
its tiny run takes every step for real on the CPU (the GPU run itself needs a machine with a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from benchmarks import throughput
from finetune.config import PROJECT_ROOT
from tests.helpers import doc_commands

BENCHMARKS_MD = PROJECT_ROOT / "BENCHMARKS.md"


def gpu_check(*args: str, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", *args], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True
    )


def composed(stdout: str) -> list[str]:
    return [line.removeprefix("composes: ") for line in stdout.splitlines() if line.startswith("composes: ")]


def wheel(folder: Path, name: str) -> Path:
    """A pure-Python wheel of one module `name` that prints where it was imported from."""
    path = folder / f"{name}-0.1-py3-none-any.whl"
    info = f"{name}-0.1.dist-info"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}.py", "print(__file__)\n")
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
        archive.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        archive.writestr(f"{info}/RECORD", f"{name}.py,,\n{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n")
    return path


def documented_gpu_commands() -> list[str]:
    return [line.split("  #")[0].strip() for line in doc_commands("docs/scaling-out.md", "## The GPU check")]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path, bool]:
    """The documented dry run (`benchmarks/gpu_check.sh --bundle .whl --dry-run`) as typed, on a bundle of one probe
    wheel and an empty CIFAR-10 archive, pip pointed at no index: its result, its work folder, and whether
    BENCHMARKS.md stayed as it was."""
    root = tmp_path_factory.mktemp("dry_run")
    bundle = root / ".whl"
    bundle.mkdir()
    wheel(bundle, "gpu_check_probe")
    (bundle / "cifar10-jpg.tar.gz").touch()
    benchmarks_md = BENCHMARKS_MD.read_bytes()
    typed = documented_gpu_commands()[1].replace(".whl", str(bundle)).split()[1:]
    result = gpu_check(*typed, "--work", str(root / "work"), PIP_INDEX_URL="http://127.0.0.1:9/")
    return result, root / "work", BENCHMARKS_MD.read_bytes() == benchmarks_md


def test_the_dry_run_prints_every_gpu_command_and_composes_each(dry_run):
    result, work, benchmarks_md_unchanged = dry_run
    assert result.returncode == 0, result.stdout + result.stderr
    commands = composed(result.stdout)
    data, photos = f"data.root={work}/cifar10", f"--data={work}/photos"
    speed = (
        f"--accelerator gpu --sizes 224 --batch-size 256 --warmup 8 --steps 24 {photos} trainer.precision=bf16-mixed"
    )
    expected = [  # in the order they run: the speeds and the headline first, DDP (composed only here) last
        [
            "python -m benchmarks.throughput --models resnet18 efficientnet_lite0 --variants ceiling plain fit store ",
            "--profile-below 10000 ",
            speed,
            " data.store=false",
        ],
        ["python train.py experiment=mobilenetv2_cifar10 model=efficientnet_lite0 ", data, " data.store=true ", "gpu"],
        [
            "python train.py data=imagefolder ",
            data,
            " data.store=true ",
            "trainer=gpu strategy=finetune trainer.precision=16-mixed",
        ],
        ["python train.py data=imagefolder ", data, "trainer=gpu strategy=finetune trainer.precision=bf16-mixed"],
        [
            "python -m benchmarks.throughput --models resnet18 --variants ceiling store ",
            speed,
            "++trainer.benchmark=true",
        ],
        [
            "python -m benchmarks.throughput --models resnet18 --variants ceiling store ",
            speed,
            "model.channels_last=false",
        ],
        [
            "python train.py ",
            data,
            "trainer=ddp trainer.devices=",
            "strategy=freeze_unfreeze 'strategy.unfreeze_at=[1]'",
        ],
        ["python train.py ", data, "trainer=ddp trainer.devices=", "model.sync_batchnorm=true"],
    ]
    assert len(commands) == len(expected), result.stdout
    for command, parts in zip(commands, expected, strict=True):
        assert all(part in command for part in parts), (command, parts)
        assert f"   {command}" in result.stdout  # printed before the check too
    assert "weights_path" not in result.stdout  # no ResNet-18 weights: random init (strategy.pretrained=false)
    assert "FAILED" not in result.stdout and "never train" not in result.stdout
    assert benchmarks_md_unchanged
    assert not (work / "logs").exists() and not (work / "cifar10").exists()


def test_the_bundle_is_installed_without_an_index_and_gives_the_archive(dry_run):
    result, work, _ = dry_run
    assert result.stdout.startswith(f"Installing gpu_check_probe-0.1-py3-none-any.whl into {work}/site\n")
    assert (work / "site" / "gpu_check_probe.py").is_file()
    assert f"data.root={work}/cifar10" in composed(result.stdout)[1]


def test_the_documented_gpu_commands_are_what_the_tests_run():
    """The GPU block of docs/scaling-out.md: `make gpu-bundle` is the Makefile's target for the bundle script (it
    downloads, so it is not run here), the dry run is run as written on a bundle (`dry_run`), the tiny run is the
    slow test below."""
    assert documented_gpu_commands() == [
        "make gpu-bundle",
        "benchmarks/gpu_check.sh --bundle .whl --dry-run",
        "benchmarks/gpu_check.sh --tiny",
        "benchmarks/gpu_check.sh --bundle .whl",
    ]
    assert "gpu-bundle:" in (PROJECT_ROOT / "Makefile").read_text()
    assert "benchmarks/gpu_bundle.sh" in (PROJECT_ROOT / "Makefile").read_text()


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--bundle", "{tmp}/nowhere"], "--bundle {tmp}/nowhere: no such folder (make gpu-bundle makes .whl)"),
        (["--bundle", "{tmp}"], "--bundle {tmp} holds no wheels (make gpu-bundle)"),
        (["--cifar10", "{tmp}/nowhere.tar.gz"], "{tmp}/nowhere.tar.gz: no such file"),
        ([], "--bundle <folder> or --cifar10 <cifar10-jpg.tar.gz> is needed: a GPU machine downloads nothing"),
    ],
)
def test_a_missing_bundle_or_archive_is_named(tmp_path, args, error):
    result = gpu_check("--dry-run", *(arg.format(tmp=tmp_path) for arg in args), CIFAR10_TGZ="")
    assert result.returncode == 1
    assert result.stderr == f"Error: {error.format(tmp=tmp_path)}\n"


@pytest.mark.slow  # the script's --tiny run (14 s); its dry run, in the default suite, composes every step
def test_a_step_that_no_longer_fits_the_budget_is_skipped_and_said_so(tmp_path):
    result = gpu_check("--tiny", "--work", str(tmp_path), "--budget", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    section = (tmp_path / "gpu_check.md").read_text()
    assert "| data: 32 + 8 JPEGs of 64x48 px made | ok | " in section
    assert "| trainer.precision=bf16-mixed | skipped: out of time: " in section
    assert " s of the 1 s budget left, about 30 s needed | - |" in section
    assert section.count("| ok") == 1  # nothing ran after the data


def test_the_bundle_script_names_a_missing_archive(tmp_path):
    result = subprocess.run(
        ["bash", "benchmarks/gpu_bundle.sh", str(tmp_path / "bundle")],
        cwd=PROJECT_ROOT,
        env={**os.environ, "PYTHON": sys.executable, "CIFAR10_TGZ": str(tmp_path / "none.tar.gz")},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert (
        result.stderr == f"Error: {tmp_path}/none.tar.gz: no such file (the CIFAR-10 JPEG archive; set $CIFAR10_TGZ)\n"
    )
    assert not (tmp_path / "bundle").exists()


def test_the_dry_runs_check_catches_a_command_that_does_not_compose(capsys):
    from benchmarks import compose_check

    assert compose_check.main(["python train.py model=nope", "python train.py optimizer.lr=-1"]) == 2
    output = capsys.readouterr().out
    assert "FAILED: python train.py model=nope\n  MissingConfigException: " in output
    assert (
        "FAILED: python train.py optimizer.lr=-1\n  ConfigError: Invalid config:\n  optimizer.lr=-1 must be > 0"
        in output
    )


def test_the_throughput_row_has_the_goal_ratios_and_the_gpu_utilisation():
    rates = {
        "ceiling": [1000.0, 1200.0],
        "plain": [300.0, 310.0],
        "fit": [290.0, 310.0],
        "store": [950.0, 1140.0],
        "ceiling gpu": [99.0, 97.0],
        "plain gpu": [30.0, 32.0],
        "fit gpu": [29.0, 31.0],
        "store gpu": [95.0, 93.0],
        **{f"{side} cpu": [100.0, 100.0] for side in ("ceiling", "plain", "fit", "store")},
    }
    row = throughput.summary("resnet18", 224, rates, 256, ("ceiling", "plain", "fit", "store"))
    assert row["fit/plain"] == pytest.approx(300 / 305) and row["store/ceiling"] == pytest.approx(1045 / 1100)
    assert row["rounds"] == "fit/plain 0.97 1.00; store/ceiling 0.95 0.95"
    assert row["GPU %"] == "98 / 31 / 30 / 94"
    plain = throughput.summary(
        "tiny", 32, {k: rates[k] for k in ("plain", "fit", "plain cpu", "fit cpu")}, 4, ("plain", "fit")
    )
    assert plain["lightning"] == 300 and plain["ratio"] == pytest.approx(300 / 305) and plain["rounds"] == "0.97 1.00"
    assert "GPU %" not in plain


@pytest.mark.slow
def test_the_tiny_run_takes_every_step_on_the_cpu_and_says_so(tmp_path):
    benchmarks_md = BENCHMARKS_MD.read_bytes()
    out = tmp_path / "out"
    result = gpu_check("--tiny", "--work", str(tmp_path), OUT=str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"GPU check: tiny, on the CPU; work folder {tmp_path}\n")
    assert result.stdout.endswith(f"Results appended to {tmp_path}/gpu_check.md (ran on a GPU: no)\n")
    section = (tmp_path / "gpu_check.md").read_text()
    assert (out / "gpu_check.md").read_text() == section and (out / "gpu_check_logs.tar.gz").is_file()
    assert "**Machine:** every step tiny on the CPU (--tiny); " in section
    assert "**Ran on a GPU:** no. **Total:** " in section
    lines = section.splitlines()
    start = lines.index("| step | result | wall s |") + 2
    rows = {
        cells[0]: cells[1]
        for cells in (line.strip("| ").split(" | ") for line in lines[start : lines.index("", start)])
    }
    assert list(rows) == [
        "data: 32 + 8 JPEGs of 64x48 px made",
        "images/s: ceiling, plain loop, fit (JPEG), fit (store); ResNet-18 and Lite0, bf16, channels-last",
        "headline: EfficientNet-Lite0, CIFAR-10, MobileNetV2 recipe (blog: 94.31 %)",
        "trainer.precision=16-mixed",
        "trainer.precision=bf16-mixed",
        "images/s: trainer.benchmark=true (ResNet-18)",
        "images/s: model.channels_last=false (ResNet-18)",
        "DDP across the unfreeze (trainer=ddp_cpu)",
        "model.sync_batchnorm=true (trainer=ddp_cpu)",
    ]
    assert all(result == "ok" for result in list(rows.values())[:2]), rows
    headline = rows["headline: EfficientNet-Lite0, CIFAR-10, MobileNetV2 recipe (blog: 94.31 %)"]
    assert headline.startswith("ok, test acc ") and headline.endswith(", trainable stages 0 -> 5")
    assert rows["trainer.precision=16-mixed"] == "skipped: 16-mixed needs a GPU"
    assert rows["trainer.precision=bf16-mixed"].startswith("ok, test acc ")
    assert rows["images/s: model.channels_last=false (ResNet-18)"] == "ok"
    assert rows["images/s: trainer.benchmark=true (ResNet-18)"] == "ok"
    assert rows["DDP across the unfreeze (trainer=ddp_cpu)"].startswith("ok, test acc ")
    assert rows["DDP across the unfreeze (trainer=ddp_cpu)"].endswith(", trainable stages 0 -> 5")
    assert rows["model.sync_batchnorm=true (trainer=ddp_cpu)"] == "skipped: PyTorch's SyncBatchNorm has no CPU kernel"
    assert section.count("\n| tiny | 32 | ") == 3  # the throughput table of each
    assert "| model | size | ceiling | plain | fit | store | fit/plain | store/ceiling |" in section
    assert "Top ops of 1 steps by self_cpu_time_total" in (tmp_path / "steps" / "throughput.log").read_text()
    assert BENCHMARKS_MD.read_bytes() == benchmarks_md

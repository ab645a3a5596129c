"""Multi-device and mixed precision: 2-process CPU DDP against one process, bf16 on the CPU,
SyncBatchNorm, and the SLURM launcher config (composed and rendered, never submitted)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import submitit
import timm
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from omegaconf import open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from finetune.builders import build
from finetune.errors import ConfigError
from finetune.train import train
from tests.helpers import SMALL_MODEL, TINY, compose_train, event_dir, run_cli

# convnext_atto normalises with LayerNorm (per sample, unlike BatchNorm), so 2 ranks x batch 4 must
# compute what 1 process x batch 8 does, through the unfreeze at epoch 1 included.
DDP_RUN = [
    "data=imagefolder",
    *TINY,
    "data.val_fraction=0",
    "trainer.max_epochs=2",
    "trainer.deterministic=true",
    "model=timm",
    "model.name=convnext_atto",
    "strategy.pretrained=false",
    "strategy=freeze_unfreeze",
    "strategy.unfreeze_at=[1]",
    "optimizer=sgd",
    "optimizer.momentum=0.9",
]


@pytest.fixture(autouse=True)
def _restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)  # trainer.deterministic=true in this process sets it globally


def scalars(run: Path) -> dict[str, float]:
    """The last value of every scalar in the run's TensorBoard events."""
    events = EventAccumulator(str(event_dir(run)))
    events.Reload()
    return {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}


def ddp_and_single(tmp_path: Path, run: list[str]) -> tuple[Path, dict, dict, dict[str, float]]:
    """`run` on 2 DDP ranks (gloo) at batch 4 through the CLI and in one process at batch 8: the DDP run's folder,
    both last checkpoints and the single process's metrics."""
    result = run_cli(["train.py", *run, "trainer=ddp_cpu", "data.batch_size=4"], tmp_path)
    assert result.returncode == 0, result.output[-3000:]
    (ddp_run,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    single = train(compose_train(tmp_path / "single", [*run, "data.batch_size=8"]))
    ddp = torch.load(ddp_run / "checkpoints" / "last.ckpt", weights_only=True)
    one = torch.load(tmp_path / "single" / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ddp["global_step"] == one["global_step"] == 6
    return ddp_run, ddp, one, single


@pytest.mark.parametrize(
    "options",
    [
        [],
        pytest.param(  # drawn with replacement, each draw augmented under its own seed
            ["data.sampler=balanced", "data.augment=randaugment", "data.random_erasing=0.5"], marks=pytest.mark.slow
        ),
    ],
)
def test_two_cpu_processes_train_what_one_process_trains(tmp_path, image_folder, options):
    """24 images: 3 steps of batch 8 on one process, or of batch 4 on each of 2 DDP ranks (gloo)."""
    ddp_run, ddp, one, single = ddp_and_single(tmp_path, [*DDP_RUN, f"data.root={image_folder}", *options])
    assert ddp["callbacks"]["StageUnfreezing"] == one["callbacks"]["StageUnfreezing"] == {"trainable_stages": 4}
    torch.testing.assert_close(ddp["state_dict"], one["state_dict"], rtol=1e-4, atol=1e-6)
    logged = scalars(ddp_run)  # metrics reduced over both ranks equal the single process's over all samples
    for key in ("train/loss_epoch", "train/acc_epoch", "val/loss", "val/acc", "test/loss", "test/acc"):
        assert logged[key] == pytest.approx(single[key], abs=1e-5), key
    # Only rank 0 writes checkpoints and events; rank 1 has its own Hydra log file only.
    files = sorted(p.name for p in (ddp_run / "checkpoints").iterdir())
    assert re.fullmatch(r"epoch_00\d.ckpt", files[0]) and files[1:] == ["last.ckpt", "probe.ckpt"], files
    probes = [
        torch.load(run / "checkpoints" / "probe.ckpt", weights_only=True)
        for run in (ddp_run, tmp_path / "single" / "run")
    ]
    torch.testing.assert_close(probes[0]["state_dict"], probes[1]["state_dict"], rtol=1e-4, atol=1e-6)  # epoch 0's
    writers = {p.name.split(".")[-2] for p in (ddp_run / "tensorboard").rglob("events.out.tfevents.*")}
    assert len(writers) == 1  # event files of one process id
    assert (ddp_run / "train_ddp_process_1.log").is_file()


@pytest.mark.parametrize(
    "method",
    [
        "regularizer=bss",  # the one that needs the ranks' features gathered: a spectrum is not a mean
        *(
            pytest.param(method, marks=pytest.mark.slow)
            for method in ("regularizer=l2sp", "regularizer=co_tuning", "peft=bitfit", "peft=norm_only", "peft=lora")
        ),
    ],
)
def test_each_method_trains_under_ddp_what_one_process_trains(tmp_path, image_folder, method):
    """The transfer methods (issue 22) on 2 ranks x batch 4 against 1 process x batch 8, through the unfreeze, from
    "pretrained" weights (seeded, with their 1000-class classifier: the methods refuse a random init)."""
    torch.manual_seed(0)
    timm_weights = tmp_path / "convnext_atto.pth"
    torch.save(timm.create_model("convnext_atto").state_dict(), timm_weights)
    pretrained = ["strategy.pretrained=true", f"model.weights_path={timm_weights}"]
    name = method.split("=")[1]
    ddp_run, ddp, one, single = ddp_and_single(tmp_path, [*DDP_RUN, f"data.root={image_folder}", *pretrained, method])
    torch.testing.assert_close(ddp["state_dict"], one["state_dict"], rtol=1e-4, atol=1e-6)
    logged = scalars(ddp_run)
    for key in (
        "train/loss_epoch",
        "val/acc",
        "test/loss",
        *([f"train/loss_{name}_epoch"] if "regularizer" in method else []),
    ):
        assert logged[key] == pytest.approx(single[key], rel=1e-4, abs=1e-6), key


class HeadDtypes(Callback):
    """Records (training, dtype) of the head's output at every forward."""

    seen: list[tuple[bool, torch.dtype]] = []

    def on_fit_start(self, trainer, pl_module):
        pl_module.head.register_forward_hook(lambda module, args, out: self.seen.append((module.training, out.dtype)))


def test_bf16_mixed_precision_trains_on_the_cpu(tmp_path, image_folder):
    overrides = ["data=imagefolder", f"data.root={image_folder}", *TINY, "strategy.pretrained=false"]
    cfg = compose_train(tmp_path, [*overrides, "trainer.precision=bf16-mixed"])
    with open_dict(cfg):
        cfg.callbacks.dtypes = {"_target_": f"{__name__}.HeadDtypes"}
    HeadDtypes.seen = seen = []
    metrics = train(cfg)
    assert (True, torch.bfloat16) in seen  # the training forward ran under bf16 autocast
    assert all(map(math.isfinite, metrics.values())), metrics
    weights = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert weights["head.weight"].dtype == torch.float32  # mixed: the weights stay float32


def fake_trainer(world_size: int, device: str) -> SimpleNamespace:
    return SimpleNamespace(world_size=world_size, strategy=SimpleNamespace(root_device=torch.device(device)))


def test_sync_batchnorm_converts_under_ddp_and_explains_the_cpu(tmp_path):
    cfg = compose_train(tmp_path, ["strategy.pretrained=false", "model.sync_batchnorm=true", "data=synthetic"])
    model = build(cfg)[1]
    batchnorms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())

    model._trainer = fake_trainer(1, "cuda")  # one device: nothing to synchronise
    model.configure_model()
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    model._trainer = fake_trainer(2, "cpu")
    with pytest.raises(ConfigError, match="model.sync_batchnorm=true needs GPUs"):
        model.configure_model()
    model._trainer = fake_trainer(2, "cuda")
    model.configure_model()
    model.configure_model()  # again for trainer.test: converted once
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules()) == batchnorms > 0


def test_slurm_launcher_renders_a_multi_node_ddp_job(tmp_path, monkeypatch):
    """`-m hydra/launcher=submitit_slurm trainer=ddp ...`: the sbatch script submitit writes, not submitted."""
    overrides = [
        "hydra/launcher=submitit_slurm",
        "trainer=ddp",
        "trainer.devices=4",
        "trainer.num_nodes=2",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.timeout_min=600",
    ]
    cfg = compose_train(tmp_path, overrides)
    assert (cfg.trainer.strategy.find_unused_parameters, cfg.trainer.num_nodes) == (True, 2)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=print, config=cfg)
    # As on a login node (srun found), but `sbatch` is `false`: submitit writes the script, nothing is queued.
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    monkeypatch.setattr(submitit.SlurmExecutor, "_make_submission_command", lambda self, path: ["false"])
    with pytest.raises(submitit.core.utils.FailedJobError):
        launcher.launch([["optimizer.lr=0.01"], ["optimizer.lr=0.001"]], initial_job_idx=0)
    (script,) = Path(cfg.hydra.sweep.dir).glob(".submitit/.submission_file_*.sh")
    flags = dict(re.findall(r"#SBATCH --([\w-]+)=(\S+)", script.read_text()))
    assert flags["nodes"] == "2" and flags["ntasks-per-node"] == "4" and flags["gpus-per-node"] == "4"
    assert flags["partition"] == "gpu" and flags["time"] == "600" and flags["array"] == "0-1%2"
    assert flags["signal"] == "USR2@120"


class Collectives(Callback):
    """Writes the collectives that Python code calls on this rank (`torch.distributed`'s functions, from `setup` on),
    one line each (name, shape, dtype), to `folder/rank_<rank>.txt` at `teardown`."""

    NAMES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "barrier", "broadcast_object_list")

    def __init__(self, folder: str):
        self.folder, self.calls, self.originals = Path(folder), [], {}

    def setup(self, trainer, pl_module, stage):
        for name in self.NAMES:
            self.originals[name] = function = getattr(torch.distributed, name)
            setattr(torch.distributed, name, self._logged(name, function))

    def _logged(self, name, function):
        def logged(*args, **kwargs):
            tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
            self.calls.append(f"{name} {tuple(tensor.shape)} {tensor.dtype}" if tensor is not None else name)
            return function(*args, **kwargs)

        return logged

    def teardown(self, trainer, pl_module, stage):
        for name, function in self.originals.items():
            setattr(torch.distributed, name, function)
        with open(self.folder / f"rank_{trainer.global_rank}.txt", "a") as out:
            out.writelines(f"{call}\n" for call in self.calls)
        self.calls = []


def test_ddp_with_the_defaults_a_user_gets(tmp_path, image_folder):
    """The recommended recipe (20 steps an epoch, the head alone first), the progress bar, the loggers and the image
    check on 2 gloo ranks, validating twice an epoch: every rank calls the same collectives in the same order (gloo
    fails on a mismatch of sizes; one of equal sizes would reduce the wrong values). The bar draws on rank 0 alone,
    yet its first read of an epoch's values reduces them across the ranks: every rank makes that read together."""
    args = ["train.py", "data=imagefolder", f"data.root={image_folder}", *SMALL_MODEL, "trainer=ddp_cpu"]
    trace = ["+callbacks.trace._target_=tests.test_distributed.Collectives", f"+callbacks.trace.folder={tmp_path}"]
    options = ["data.image_size=32", "trainer.max_epochs=2", "data.num_workers=0", "++trainer.val_check_interval=0.5"]
    result = run_cli([*args, *options, *trace], tmp_path)
    assert result.returncode == 0, result.output[-3000:]
    (run,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    assert {"train/loss_epoch", "val/acc", "test/acc"} <= scalars(run).keys()
    ranks = [(tmp_path / f"rank_{rank}.txt").read_text().splitlines() for rank in (0, 1)]
    assert ranks[0] == ranks[1]
    assert "all_reduce () torch.float32" in ranks[0]  # the metrics reduced with sync_dist
    # Each rank runs the whole script: the console says each line once, with none of Lightning's advice to sync
    # what is already whole nor torch's deprecation inside Lightning's all_gather
    once = ("Seed set to", "Images per class (train", "Test accuracy")
    assert [result.output.count(line) for line in once] == [1] * len(once)
    assert (
        "each epoch draws 1280 (data.min_steps_per_epoch=20 steps of 32 images on each of 2 processes)" in result.output
    )
    assert "sync_dist=True" not in result.output and "all_gather is deprecated" not in result.output


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "trainable"),
    [
        ("scratch", [5, 5]),
        ("finetune", [5, 5]),
        ("freeze", [0, 0]),
        ("freeze_unfreeze", [0, 5]),
        ("gradual", [0, 1]),
        ("llrd", [5, 5]),
    ],
)
def test_every_strategy_runs_under_cpu_ddp(tmp_path, image_folder, strategy, trainable):
    """resnet18 (BatchNorm) on 2 gloo processes, across the unfreeze epoch."""
    args = [
        "train.py",
        "data=imagefolder",
        f"data.root={image_folder}",
        *TINY,
        "trainer=ddp_cpu",
        "data.batch_size=4",
        "trainer.max_epochs=2",
        "strategy.pretrained=false",
        f"strategy={strategy}",
        *(["strategy.unfreeze_at=[1]"] if strategy == "freeze_unfreeze" else []),
        *(["strategy.unfreeze_at=[1]"] if strategy == "gradual" else []),
    ]
    result = run_cli(args, tmp_path)
    assert result.returncode == 0, result.output[-3000:]
    assert "parameters that were not used" not in result.output  # DDP's unused-parameters error
    (run,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    events = EventAccumulator(str(event_dir(run)))
    events.Reload()
    assert [e.value for e in events.Scalars("trainable_stages")] == trainable

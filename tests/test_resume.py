"""Exact resume: a run killed mid-epoch (SIGKILL) and resumed ends where an uninterrupted run ends; Ctrl-C prints the
command that resumes the run."""

from __future__ import annotations

import os
import shlex
import signal
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import open_dict
from torch.utils.tensorboard import SummaryWriter

from finetune.checkpoint import LAST, PROBE, CarryOver, resolve_ckpt_path
from finetune.data.datamodule import ImageFolderDataModule
from finetune.data.sampling import SeededSampler
from finetune.errors import MissingFileError
from finetune.models import InputConfig
from finetune.report import _event_scalars
from finetune.run_status import read_status
from finetune.train import train
from tests.helpers import SMALL_MODEL, TINY, compose_train, make_image_folder, run_cli, start_cli

STEPS_PER_EPOCH = 6  # 2 classes x 24 images, batch 8
RUN = [
    "data=imagefolder",
    *TINY,
    "data.val_fraction=0",
    "trainer.max_epochs=3",
    "trainer.deterministic=true",
    "model=mobilenet_v2",
    "strategy.pretrained=false",
    "strategy=freeze_unfreeze",
    "strategy.unfreeze_at=[1]",
    "scheduler=cosine",  # every group's lr changes each epoch
    "optimizer=sgd",
    "optimizer.momentum=0.9",  # optimizer state that must survive the kill
    "callbacks.mid_epoch_checkpoint.train_time_interval=null",
    "callbacks.mid_epoch_checkpoint.every_n_train_steps=2",
]
THROTTLE = '''
import time
from lightning.pytorch.callbacks import Callback

class Throttle(Callback):
    """Slows the last epoch down, so the test can kill the run in the middle of it."""

    def on_train_batch_end(self, trainer, *args):
        if trainer.current_epoch == trainer.max_epochs - 1:
            time.sleep(1.0)
'''


@pytest.fixture(autouse=True)
def _restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)  # trainer.deterministic=true in this process sets it globally


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"), train=24, test=6)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def kill_mid_epoch(root: Path, run: list[str], steps_per_epoch: int = STEPS_PER_EPOCH) -> dict:
    """Starts `python train.py ...` and SIGKILLs it once last.ckpt is from the middle of the last epoch (of
    `steps_per_epoch` optimizer steps)."""
    (root / "throttle.py").write_text(THROTTLE)
    args = [*run, "+callbacks.throttle._target_=throttle.Throttle"]
    # the threads of this process, which resumes the run: the same float summation order
    started = start_cli(["train.py", *args], root, PYTHONPATH=str(root), OMP_NUM_THREADS=str(torch.get_num_threads()))
    last_epoch, seen = 2 * steps_per_epoch, None
    try:
        deadline = time.monotonic() + 240
        while started.running and time.monotonic() < deadline:
            found = list((root / "logs").glob("train/runs/*/checkpoints/last.ckpt"))
            if found and found[0].stat().st_mtime_ns != seen:
                seen = found[0].stat().st_mtime_ns
                if 0 < load(found[0])["global_step"] - last_epoch < steps_per_epoch:
                    break
            time.sleep(0.05)
    finally:
        started.send_signal(signal.SIGKILL)  # DDP's other ranks with it
    result = started.wait(timeout=60)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    return load(found[0])


def resume_and_run_uninterrupted(root: Path, run: list[str]) -> tuple[dict, dict, dict, dict]:
    """The killed run resumed (`ckpt_path=last`), and the same run uninterrupted in this process: their last.ckpt
    and their metrics."""
    resumed_cfg = compose_train(root, [*run, "ckpt_path=last"])
    resumed = train(resumed_cfg)
    with open_dict(resumed_cfg):
        resumed_cfg.paths.output_dir = str(root / "uninterrupted")
        resumed_cfg.ckpt_path = None
    uninterrupted = train(resumed_cfg)
    a = load(root / "run" / "checkpoints" / "last.ckpt")
    b = load(root / "uninterrupted" / "checkpoints" / "last.ckpt")
    return a, b, resumed, uninterrupted


@pytest.mark.parametrize(
    "workers",
    [0, pytest.param(2, marks=pytest.mark.slow)],  # 2 persistent workers: their random state spans epochs
)
def test_a_run_killed_mid_epoch_resumes_to_the_same_weights_metrics_and_lrs(tmp_path, images, workers):
    run = [*RUN, f"data.root={images}", f"data.num_workers={workers}"]
    killed = kill_mid_epoch(tmp_path, run)
    assert killed["epoch"] == 2 and killed["global_step"] % STEPS_PER_EPOCH  # after the unfreeze, mid-epoch
    assert killed["callbacks"]["StageUnfreezing"] == {"trainable_stages": 5}
    (loader_state,) = killed["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_state == {"epoch": 2, "batches": killed["global_step"] - 2 * STEPS_PER_EPOCH}

    a, b, resumed, uninterrupted = resume_and_run_uninterrupted(tmp_path, run)
    assert a["global_step"] == b["global_step"] == 3 * STEPS_PER_EPOCH
    torch.testing.assert_close(a["state_dict"], b["state_dict"], rtol=0, atol=0)
    (optimizer_a,), (optimizer_b,) = a["optimizer_states"], b["optimizer_states"]
    torch.testing.assert_close(optimizer_a["state"], optimizer_b["state"], rtol=0, atol=0)  # momentum buffers
    assert optimizer_a["param_groups"] == optimizer_b["param_groups"]  # every group's lr
    assert [g["name"] for g in optimizer_a["param_groups"]] == ["backbone", "head"]
    assert a["lr_schedulers"] == b["lr_schedulers"]
    assert a["callbacks"]["StageUnfreezing"] == b["callbacks"]["StageUnfreezing"] == {"trainable_stages": 5}
    for key in ("val/acc", "val/loss", "test/acc", "test/loss"):
        assert resumed[key] == uninterrupted[key], key
    # the resumed run's folder ends as the uninterrupted run's: the best epoch ranked across the resume
    # (finetune.checkpoint.CarryOver) and the probe saved before it, the same files with the same weights
    folders = [root / "checkpoints" for root in (tmp_path / "run", tmp_path / "uninterrupted")]
    assert [sorted(p.name for p in folder.iterdir()) for folder in folders] == [["epoch_000.ckpt", LAST, PROBE]] * 2
    for name in ("epoch_000.ckpt", PROBE):
        torch.testing.assert_close(*(load(folder / name)["state_dict"] for folder in folders), rtol=0, atol=0)
    (ranking,) = (key for key in a["callbacks"] if key.startswith("ModelCheckpoint{'monitor': 'val/acc'"))
    assert [a["callbacks"][ranking]["best_model_score"], Path(a["callbacks"][ranking]["best_model_path"])] == [
        b["callbacks"][ranking]["best_model_score"],
        folders[0] / "epoch_000.ckpt",
    ]
    # ... and TensorBoard curves (CarryOver): the uninterrupted run's, but for the resumed
    # epoch's train averages (of its batches after the resume, also the HPARAMS tab's hp/train/*)
    curves = [_event_scalars(tmp_path / name) for name in ("run", "uninterrupted")]
    assert curves[0].keys() == curves[1].keys() and len(curves[0]["train/loss_step"]) > 3
    last = max(curves[1]["train/loss_epoch"])  # the resumed epoch's end
    for tag in (tag for tag in curves[1] if not tag.startswith("hp/train/")):
        partial = tag in ("train/loss_epoch", "train/acc_epoch")
        before = [{step: value for step, value in c[tag].items() if not partial or step < last} for c in curves]
        assert before[0] == before[1], tag
    (killed_folder,) = tmp_path.glob("logs/train/runs/*/checkpoints")
    assert sorted(p.name for p in killed_folder.iterdir()) == ["epoch_000.ckpt", LAST, PROBE]  # left as it was


@pytest.mark.slow  # 3 DDP runs; what each rank's sampler skips is tested fast below
def test_a_ddp_run_killed_mid_epoch_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, images, monkeypatch):
    """2 gloo ranks of batch 4 (6 steps an epoch, as batch 8 on one process), killed together mid-epoch (their
    session); the resumed and the uninterrupted run in new interpreters with the killed run's threads (its sums in
    the same order)."""
    run = [*RUN, f"data.root={images}", "data.num_workers=0", "trainer=ddp_cpu", "data.batch_size=4"]
    killed = kill_mid_epoch(tmp_path, run)
    assert killed["epoch"] == 2 and killed["global_step"] % STEPS_PER_EPOCH
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    for root, resume in ((tmp_path, ["ckpt_path=last"]), (tmp_path / "uninterrupted", [])):
        result = run_cli(["train.py", *run, *resume], root, fresh=True)
        assert result.returncode == 0, result.output[-3000:]
    folders = [
        sorted((root / "logs" / "train" / "runs").iterdir())[-1] / "checkpoints"
        for root in (tmp_path, tmp_path / "uninterrupted")
    ]
    a, b = (load(folder / LAST) for folder in folders)
    assert [sorted(p.name for p in folder.iterdir()) for folder in folders] == [["epoch_000.ckpt", LAST, PROBE]] * 2
    assert a["global_step"] == b["global_step"] == 3 * STEPS_PER_EPOCH
    torch.testing.assert_close(a["state_dict"], b["state_dict"], rtol=0, atol=0)
    (optimizer_a,), (optimizer_b,) = a["optimizer_states"], b["optimizer_states"]
    torch.testing.assert_close(optimizer_a["state"], optimizer_b["state"], rtol=0, atol=0)  # momentum buffers
    assert optimizer_a["param_groups"] == optimizer_b["param_groups"]  # every group's lr


@pytest.mark.slow  # a third kill-and-resume run; what accumulation counts is tested fast in tests/test_accumulation.py
def test_a_run_with_gradient_accumulation_killed_mid_epoch_resumes_to_the_same_weights(tmp_path, images):
    """trainer.accumulate_grad_batches=2 and a per-step schedule: 3 optimizer steps of 2 batches per epoch; the run is
    killed after a step of its last epoch (checkpoints come only after a step) and resumed."""
    steps_per_epoch = STEPS_PER_EPOCH // 2
    run = [
        *RUN,
        f"data.root={images}",
        "data.num_workers=0",
        *SMALL_MODEL,
        "scheduler=warmup_cosine",
        "trainer.accumulate_grad_batches=2",
        "callbacks.mid_epoch_checkpoint.every_n_train_steps=1",
    ]
    killed = kill_mid_epoch(tmp_path, run, steps_per_epoch)
    assert killed["epoch"] == 2 and killed["global_step"] % steps_per_epoch
    (loader_state,) = killed["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_state == {"epoch": 2, "batches": 2 * (killed["global_step"] - 2 * steps_per_epoch)}

    a, b, resumed, uninterrupted = resume_and_run_uninterrupted(tmp_path, run)
    assert a["global_step"] == b["global_step"] == 3 * steps_per_epoch
    torch.testing.assert_close(a["state_dict"], b["state_dict"], rtol=0, atol=0)
    (optimizer_a,), (optimizer_b,) = a["optimizer_states"], b["optimizer_states"]
    torch.testing.assert_close(optimizer_a["state"], optimizer_b["state"], rtol=0, atol=0)
    assert a["lr_schedulers"] == b["lr_schedulers"] and a["lr_schedulers"][0]["last_epoch"] == 3 * steps_per_epoch
    for key in ("val/acc", "val/loss", "test/acc", "test/loss"):
        assert resumed[key] == uninterrupted[key], key


@pytest.mark.parametrize(
    "store",
    [
        {},
        {"store": True, "augment_on": "device"},  # the store's crop boxes and flips, drawn per sample in the workers
        {"augment_on": "device"},  # uint8 crops from the workers, normalised as a batch
        {"min_steps_per_epoch": 10},  # a small split passed over again within an epoch (conf's default is 20)
    ],
    ids=["files", "store-device-crop", "device-normalisation", "repeated-passes"],
)
def test_batches_depend_only_on_seed_epoch_and_sample(tmp_path, images, store):
    config = InputConfig(32, (0.5,) * 3, (0.5,) * 3)

    def loader(workers: int):
        settings = {"batch_size": 8, "val_fraction": 0, "num_workers": workers, "store_dir": tmp_path, **store}
        data = ImageFolderDataModule(config, images, **settings)
        data.setup()
        return data.train_dataloader(), data.on_after_batch_transfer  # the loader, and what the device finishes

    def epoch(loader_and_finish, number: int) -> list[torch.Tensor]:
        loader, finish = loader_and_finish
        loader.sampler.set_epoch(number)
        return [finish(batch, 0)[0] for batch in loader]

    main, workers = loader(0), loader(2)  # 2 persistent workers: their random state carries over epochs
    for number in (0, 1):
        torch.testing.assert_close(epoch(main, number), epoch(workers, number), rtol=0, atol=0)
    assert not torch.equal(epoch(main, 0)[0], epoch(main, 1)[0])  # a new shuffle and new crops each epoch

    steps = max(STEPS_PER_EPOCH, store.get("min_steps_per_epoch", 0))
    assert len(epoch(main, 0)) == steps
    resumed = loader(0)
    resumed[0].load_state_dict({"epoch": 1, "batches": 2})
    torch.testing.assert_close(epoch(resumed, 1), epoch(main, 1)[2:], rtol=0, atol=0)
    assert resumed[0].state_dict() == {"epoch": 1, "batches": steps}
    assert len(epoch(resumed, 2)) == steps  # the skip applies to its own epoch only


def test_two_ranks_together_see_what_one_process_sees():
    dataset = list(range(40))
    one = list(SeededSampler(dataset, seed=7))
    ranks = [list(SeededSampler(dataset, num_replicas=2, rank=r, seed=7)) for r in (0, 1)]
    for step in range(5):  # batch 8 on one process = batch 4 on each of 2 ranks, same samples, same seeds
        together = ranks[0][4 * step : 4 * step + 4] + ranks[1][4 * step : 4 * step + 4]
        assert sorted(together) == sorted(one[8 * step : 8 * step + 8])


def test_ckpt_path_last_auto_and_run_folders(tmp_path):
    task = tmp_path / "logs" / "train"
    old, new = (task / "runs" / name / "checkpoints" / "last.ckpt" for name in ("old", "new"))
    for path in (old, new):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"")
    os.utime(old, (1, 1))
    current = task / "runs" / "current"

    assert resolve_ckpt_path("last", current, task) == str(new)
    assert resolve_ckpt_path("auto", current, task) is None  # a fresh run, not somebody else's checkpoint
    assert resolve_ckpt_path(str(old.parents[1]), current, task) == str(old)
    assert resolve_ckpt_path("s3://bucket/x.ckpt", current, task) == "s3://bucket/x.ckpt"
    own = current / "checkpoints" / "last.ckpt"
    own.parent.mkdir(parents=True)
    own.write_bytes(b"")
    os.utime(own, (1, 1))
    assert resolve_ckpt_path("last", current, task) == resolve_ckpt_path("auto", current, task) == str(own)
    with pytest.raises(MissingFileError, match="no checkpoints/last.ckpt under"):
        resolve_ckpt_path("last", tmp_path / "new_run", tmp_path / "logs" / "other")
    with pytest.raises(MissingFileError, match="run folder has no checkpoints/last.ckpt"):
        resolve_ckpt_path(str(tmp_path), current, task)


@pytest.mark.parametrize("case", ["in-place", "folder-moved-since", "a-ranked-file-gone"])
def test_a_resume_into_a_new_folder_carries_the_ranking_and_links_the_ranked_files(tmp_path, caplog, case):
    """Every DDP rank loads the ranking that rank 0 decided on (they must agree on what to save), rank 0 alone links
    the files, from beside the checkpoint resumed from (a run folder copied from another machine: its recorded folder
    is gone); if a ranked file is gone, the ranking is Lightning's as before, and that is said."""
    recorded, new = tmp_path / "old" / "checkpoints", tmp_path / "new" / "checkpoints"
    there = tmp_path / "copied" / "checkpoints" if case == "folder-moved-since" else recorded
    there.mkdir(parents=True)
    names = ["epoch_001.ckpt"] if case == "a-ranked-file-gone" else ["epoch_001.ckpt", "epoch_004.ckpt"]
    for name in names:
        (there / name).write_bytes(name.encode())
    saved = ModelCheckpoint(dirpath=recorded, filename="epoch_{epoch:03d}", monitor="val/acc", mode="max")
    saved.best_k_models = {
        str(recorded / "epoch_001.ckpt"): torch.tensor(0.9),
        str(recorded / "epoch_004.ckpt"): torch.tensor(0.8),
    }
    saved.best_model_path, saved.best_model_score = str(recorded / "epoch_001.ckpt"), torch.tensor(0.9)
    saved.kth_best_model_path, saved.kth_value = str(recorded / "epoch_004.ckpt"), torch.tensor(0.8)
    decided: list[bool] = []  # what rank 0 broadcasts: what every rank receives

    def broadcast(obj: bool, src: int) -> bool:
        decided[:] = decided or [obj]
        return decided[0]

    for rank in (0, 1):
        resumed = ModelCheckpoint(dirpath=new, filename="epoch_{epoch:03d}", monitor="val/acc", mode="max")
        checkpoint = {"callbacks": {resumed.state_key: saved.state_dict()}, "global_step": 5}
        trainer = SimpleNamespace(
            callbacks=[resumed],
            is_global_zero=rank == 0,
            ckpt_path=str(there / LAST),
            strategy=SimpleNamespace(broadcast=broadcast),
            loggers=[],
        )
        CarryOver().on_load_checkpoint(trainer, None, checkpoint)
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            resumed.load_state_dict(checkpoint["callbacks"][resumed.state_key])
        if case == "a-ranked-file-gone":
            assert "The dirpath has changed" in str(warned[0].message) and not resumed.best_k_models
            assert not new.exists() and "are gone: the resumed run ranks its epochs anew" in caplog.text
            continue
        assert not warned
        assert resumed.best_k_models == {str(new / "epoch_001.ckpt"): 0.9, str(new / "epoch_004.ckpt"): 0.8}
        assert (resumed.best_model_path, resumed.best_model_score) == (str(new / "epoch_001.ckpt"), 0.9)
        assert (resumed.kth_best_model_path, resumed.kth_value) == (str(new / "epoch_004.ckpt"), 0.8)
        for name in ("epoch_001.ckpt", "epoch_004.ckpt"):
            assert (new / name).samefile(there / name)  # linked by rank 0: no second copy on the disk
    assert sorted(p.name for p in there.iterdir()) == names  # the interrupted run's folder as it was


def test_the_curves_of_a_resume_into_a_new_folder_go_on_from_its_checkpoint(tmp_path):
    """What the interrupted run logged after its checkpoint is dropped where the resumed run goes on: the new folder's
    curve is the old one up to the checkpoint, then the resumed run's (TensorBoard's restart marker); the interrupted
    run's folder stays as it was. A checkpoint at global step 5 holds 5 optimizer steps, whose metrics Lightning logs
    at steps 0 to 4; the resumed run logs from step 5 on."""
    old = tmp_path / "old"
    writer = SummaryWriter(old / "tensorboard" / "train")
    for step in range(11):
        writer.add_scalar("x", step, step)
    writer.close()
    logger = TensorBoardLogger(tmp_path / "new", name="tensorboard", version="resumed")
    trainer = SimpleNamespace(
        is_global_zero=True, ckpt_path=str(old / "checkpoints" / LAST), loggers=[logger], callbacks=[]
    )
    CarryOver().on_load_checkpoint(trainer, None, {"global_step": 5})
    logger.log_metrics({"x": 105.0}, step=5)
    logger.log_metrics({"x": 106.0}, step=6)
    logger.finalize("success")
    assert _event_scalars(tmp_path / "new")["x"] == {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 105, 6: 106}
    assert _event_scalars(old)["x"] == {step: step for step in range(11)}


CTRL_C_AT_START = """
import os, signal

class CtrlC:
    \"\"\"Ctrl-C while the run is set up, before Lightning's fit (which handles Ctrl-C itself).\"\"\"

    def __init__(self):
        os.kill(os.getpid(), signal.SIGINT)
"""


CTRL_C = {"status": "interrupted", "error": "KeyboardInterrupt (Ctrl-C)"}


def with_test_modules(root: Path, monkeypatch) -> None:
    """Commands run now can import the callbacks written into `root` (as +callbacks.<name>)."""
    (root / "throttle.py").write_text(THROTTLE)
    (root / "ctrl_c.py").write_text(CTRL_C_AT_START)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), *sys.path]))


def interrupt(tmp_path: Path, image_folder: Path, monkeypatch, signal_number: int) -> tuple[Path, str]:
    """`python train.py` on a tiny run, sent `signal_number` once its first last.ckpt exists: the run folder and the
    command that resumes it (its exit status must be 1)."""
    args = [
        "data=imagefolder",
        f"data.root={image_folder}",
        *TINY,
        *SMALL_MODEL,
        "trainer.max_epochs=2",
        "+callbacks.throttle._target_=throttle.Throttle",  # 1 s per step in the last epoch
    ]
    with_test_modules(tmp_path, monkeypatch)
    started = start_cli(["train.py", *args], tmp_path)
    deadline = time.monotonic() + 240
    while not list(tmp_path.glob("logs/train/runs/*/checkpoints/last.ckpt")) and time.monotonic() < deadline:
        time.sleep(0.05)
    started.send_signal(signal_number)
    result = started.wait(timeout=120)
    (run,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    assert result.returncode == 1, result.output
    command = f"python train.py {shlex.join(args)} ckpt_path={run}"
    assert result.stderr.endswith(f"Interrupted: resume the run with\n  {command}\n"), result.output[-2000:]
    return run, command


def test_ctrl_c_records_interrupted_and_prints_the_command_that_resumes_the_run(tmp_path, image_folder, monkeypatch):
    run, command = interrupt(tmp_path, image_folder, monkeypatch, signal.SIGINT)  # Ctrl-C
    assert {k: v for k, v in read_status(run).items() if k != "wall_time_s"} == CTRL_C

    resumed = run_cli(shlex.split(command)[1:], tmp_path)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"Resuming from {run}/checkpoints/last.ckpt" in resumed.output and "Test accuracy: " in resumed.output
    runs = {r: read_status(r)["status"] for r in (tmp_path / "logs" / "train" / "runs").iterdir()}
    assert sorted(runs.values()) == ["completed", "interrupted"] and runs[run] == "interrupted"  # a folder each


def test_ctrl_c_before_the_first_checkpoint_prints_the_command_to_start_again(tmp_path, image_folder, monkeypatch):
    """Ctrl-C outside Lightning's fit arrives as a KeyboardInterrupt: the same record, the command as it was typed."""
    args = ["data=imagefolder", f"data.root={image_folder}", *TINY, *SMALL_MODEL, "ckpt_path=last"]
    args.append("+callbacks.ctrl_c._target_=ctrl_c.CtrlC")
    with_test_modules(tmp_path, monkeypatch)
    result = run_cli(["train.py", *args], tmp_path)
    (run,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    assert result.returncode == 1, result.output[-3000:]
    assert {k: v for k, v in read_status(run).items() if k != "wall_time_s"} == CTRL_C
    assert result.stderr.endswith(
        f"Interrupted before the run saved a checkpoint: start it again with\n  python train.py {shlex.join(args)}\n"
    ), result.stderr[-2000:]


def test_sigterm_records_interrupted_and_prints_the_command_that_resumes_the_run(tmp_path, image_folder, monkeypatch):
    """SIGTERM (a SLURM preemption or time limit, `timeout`): as Ctrl-C, a status, last.ckpt and the command."""
    run, _ = interrupt(tmp_path, image_folder, monkeypatch, signal.SIGTERM)
    status = {k: v for k, v in read_status(run).items() if k != "wall_time_s"}
    assert status == {"status": "interrupted", "error": "SIGTERM (a preemption, a time limit or kill)"}


def test_ckpt_path_auto_takes_lightnings_slurm_requeue_checkpoint_when_newer(tmp_path):
    """On SLURM's requeue signal Lightning saves `hpc_ckpt_<n>.ckpt` into the run folder (trainer.default_root_dir)."""
    own = tmp_path / "checkpoints" / "last.ckpt"
    own.parent.mkdir()
    own.touch()
    assert resolve_ckpt_path("auto", tmp_path, tmp_path) == str(own)
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    hpc.touch()
    os.utime(own, (time.time() - 60, time.time() - 60))
    assert resolve_ckpt_path("auto", tmp_path, tmp_path) == str(hpc)

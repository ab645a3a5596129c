"""Nothing lost, nothing mixed: every run's logs are complete when it ends, and every run gets its own folder."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from finetune.checkpoint import resolve_ckpt_path
from finetune.run_dirs import unique_dir
from tests.helpers import SMALL_MODEL, TINY, event_dir, run_cli, start_cli

# A machine busy with other work: TensorBoard's writer thread lags behind, so whatever a process leaves to that
# thread when it exits (it is a daemon) is lost unless the writer is closed first.
SLOW_WRITER = """
import sys, time
from tensorboard.summary.writer.event_file_writer import RecordWriter
write = RecordWriter.write
RecordWriter.write = lambda self, data: (time.sleep(0.02), write(self, data))[1]
sys.argv = ["train.py", *sys.argv[1:]]
from finetune.train import main
main()
"""


@pytest.mark.parametrize(
    "multirun",
    [pytest.param(False, marks=pytest.mark.slow), True],  # both close the writers in train(): one in the default suite
    ids=["single run", "last job of a sweep"],
)
def test_a_run_s_event_file_is_complete_even_when_its_writer_lags(tmp_path, image_folder, multirun):
    args = ["data=imagefolder", f"data.root={image_folder}", *SMALL_MODEL, *TINY]
    sweep = ["-m", "seed=1,2"] if multirun else []
    result = run_cli(["-c", SLOW_WRITER, *sweep, *args], tmp_path)
    assert result.returncode == 0, result.output
    (folder,) = (tmp_path / "logs" / "train" / ("multiruns" if multirun else "runs")).iterdir()
    events = EventAccumulator(str(event_dir(folder / "1" if multirun else folder)))
    events.Reload()
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(events.PluginTagToContent("hparams"))
    assert {"hp/val/acc", "hp/test/loss", "hp/test/acc", "test/acc"} <= set(events.Tags()["scalars"])


def test_unique_dir_gives_each_caller_its_own_folder(tmp_path):
    wanted = str(tmp_path / "runs" / "2026-01-01_00-00-00")
    got: list[str] = []
    threads = [threading.Thread(target=lambda: got.append(unique_dir(wanted))) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(got) == sorted([wanted] + [f"{wanted}_{i}" for i in range(1, 16)])


def test_runs_started_together_get_their_own_folders_and_resume_their_own(tmp_path, image_folder):
    runs = tmp_path / "logs" / "train" / "runs"
    now = datetime.now()
    for second in range(60):  # every timestamp these runs can get is taken already: they must take a suffix
        (runs / f"{now + timedelta(seconds=second):%Y-%m-%d_%H-%M-%S}").mkdir(parents=True)
    taken = set(runs.iterdir())
    args = ["data=imagefolder", f"data.root={image_folder}", *SMALL_MODEL, *TINY]
    started = [start_cli(["train.py", *args, f"seed={seed}"], tmp_path) for seed in (1, 2)]
    results = [run.wait() for run in started]
    assert all(result.returncode == 0 for result in results), [result.output for result in results]
    new = sorted(set(runs.iterdir()) - taken)
    assert len(new) == 2 and all("_" in run.name.rsplit("-", 1)[1] for run in new)  # a suffix each
    overrides = [yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()) for run in new]
    seeds = sorted(next(o for o in run if o.startswith("seed=")) for run in overrides)
    assert seeds == ["seed=1", "seed=2"]
    for run in new:
        writers = {path.name.split(".")[4] for path in (run / "tensorboard").rglob("events.out.tfevents.*")}
        assert len(writers) == 1  # one process's event files (named by its pid)
        assert (run / "checkpoints" / "last.ckpt").is_file()
    lasts = [run / "checkpoints" / "last.ckpt" for run in new]
    newest = max(lasts, key=lambda last: (last.stat().st_mtime, str(last)))  # mtimes tie on the coarse clock
    assert resolve_ckpt_path("last", tmp_path / "fresh", runs.parent) == str(newest)

"""lr_find.py (issue 24): the command as docs/training.md types it, every param group at its multiplier in every step
(the run's lr schedule left out), the model and a later fit untouched by the test, the suggestion rule on curves of
known answer, the stop on divergence."""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from finetune.builders import build, build_fit_trainer
from finetune.errors import ConfigError
from finetune.lr_find import RangeTest, find_lr, range_test, suggestion, valley
from finetune.validation import validate
from tests.helpers import SMALL_MODEL, compose_train, doc_commands, event_dir, run_cli


def documented(image_folder: Path, line: int) -> list[str]:
    """The overrides of the section's command number `line`, on the tiny folder, with the small backbone at 32 px."""
    words = shlex.split(doc_commands("docs/training.md", "## Finding a learning rate")[line], comments=True)
    assert words[:2] == ["python", "lr_find.py"]
    args = [f"data.root={image_folder}" if word.startswith("data.root=") else word for word in words[2:]]
    return [*args, "debug=tiny", *SMALL_MODEL]


def test_lr_find_as_the_docs_type_it_prints_the_override_and_writes_the_plot(tmp_path, image_folder, one_thread):
    """The default strategy: the head alone trains; the printed train.py command with the suggestion composes."""
    args = documented(image_folder, 0)
    result = run_cli(["lr_find.py", *args], tmp_path)
    assert result.returncode == 0, result.output[-3000:]
    (suggested,) = re.findall(r"^Suggested lr .*: optimizer\.lr=(\S+)$", result.stdout, flags=re.M)
    assert 1e-7 <= float(suggested) <= 10
    assert "strategy=freeze_unfreeze: the head alone trained, the head at 10x optimizer.lr" in result.stdout
    train_line = result.stdout.split("Suggested lr", 1)[1].splitlines()[1].strip()
    assert train_line == shlex.join(["python", "train.py", *args, f"optimizer.lr={suggested}"])
    assert f"  {shlex.join(['python', 'lr_find.py', *args, 'strategy=finetune'])}\n" in result.stdout  # the backbone's
    assert "sweep a few lrs from the lower of the two suggestions to about 3x the higher" in result.stdout
    validate(compose_train(tmp_path, shlex.split(train_line)[2:]))  # train.py takes it as printed

    (run,) = (tmp_path / "logs" / "lr_find" / "runs").iterdir()
    with Image.open(run / "lr_find.png") as plot:
        assert plot.size == (840, 540)
    events = EventAccumulator(str(event_dir(run))).Reload()
    losses = events.Scalars("lr_find/loss")
    assert 10 < len(losses) <= 100 and [e.step for e in losses] == list(range(len(losses)))
    assert events.Scalars("lr_find/lr")[0].value == pytest.approx(1e-7)
    (mark,) = events.Scalars("lr_find/suggested_lr")
    assert f"{mark.value:.2g}" == f"{float(suggested):.2g}"
    assert events.Tags()["images"] == ["lr_find/plot"]


class StepLrs(Callback):
    """Every param group's lr as the optimizer step reads it (after the closure: forward, backward)."""

    def __init__(self) -> None:
        self.lrs: list[dict[str, float]] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        self.lrs.append({group["name"]: group["lr"] for group in optimizer.param_groups})


def test_every_group_keeps_its_multiplier_in_every_step_and_the_schedule_stays_out(tmp_path, image_folder, one_thread):
    """The docs' strategy=finetune command (every stage trains), with the default warmup + cosine schedule: at every
    step the head's groups are at 10x optimizer.lr, the backbone's at 1x, and optimizer.lr follows the test's curve."""
    cfg = compose_train(tmp_path, [*documented(image_folder, 1), "lr_find.steps=20"], "lr_find")
    assert cfg.scheduler._target_ == "finetune.schedules.warmup_cosine"
    datamodule, model = build(cfg)
    seen = StepLrs()
    test = range_test(cfg, datamodule, model, seen)
    assert test.trainable_stages == test.num_stages == 5
    assert len(seen.lrs) == len(test.lrs) >= 10 and seen.lrs == test.group_lrs
    for step, lrs in enumerate(seen.lrs):
        lr = 1e-7 * 1e8 ** (step / 19)
        assert test.lrs[step] == pytest.approx(lr, rel=1e-12)
        assert set(lrs) == {"backbone", "backbone_no_decay", "head", "head_no_decay"}
        for name, value in lrs.items():
            assert value == pytest.approx(lr * (10 if name.startswith("head") else 1), rel=1e-12), (step, name)


class Snapshot(Callback):
    """The model's state dict when the range test's training ends."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.state = {name: tensor.clone() for name, tensor in pl_module.state_dict().items()}


def fit(cfg) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """train.py's fit of a model built from `cfg` (no initial validation); its final weights and metrics."""
    datamodule, model = build(cfg)
    trainer = build_fit_trainer(cfg)
    trainer.fit(model, datamodule=datamodule)
    return model.state_dict(), {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_the_model_is_bit_identical_after_lr_find_and_a_later_fit_is_unaffected(tmp_path, image_folder, one_thread):
    """Every weight and BatchNorm statistic moves in the test (strategy=finetune, bn=train); afterwards the model, its
    modes and the random state are as before, and the fit that follows ends exactly where a fit without the test
    ends."""
    overrides = ["data=imagefolder", f"data.root={image_folder}", "debug=tiny", *SMALL_MODEL, "trainer.max_epochs=1"]
    cfg = compose_train(tmp_path, [*overrides, "strategy=finetune", "strategy.bn=train", "lr_find.steps=20"], "lr_find")

    L.seed_everything(cfg.seed)
    datamodule, model = build(cfg)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    modes, random_state = [m.training for m in model.modules()], torch.get_rng_state()
    snapshot = Snapshot()
    range_test(cfg, datamodule, model, snapshot)
    assert all(not torch.equal(snapshot.state[name], before[name]) for name in ("head.weight", "head.bias"))
    assert any(not torch.equal(snapshot.state[n], t) for n, t in before.items() if n.endswith("running_mean"))
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)
    assert [m.training for m in model.modules()] == modes and model.backbone.frozen_stages == 0
    assert torch.equal(torch.get_rng_state(), random_state) and model.hparams.scheduler is not None
    assert datamodule.min_steps_per_epoch == 0  # debug=tiny's, raised to the test's steps during it

    trainer = build_fit_trainer(cfg)
    trainer.fit(model, datamodule=datamodule)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    L.seed_everything(cfg.seed)
    untested_weights, untested_metrics = fit(cfg)
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in untested_weights.items())
    assert metrics == untested_metrics and "train/loss_epoch" in metrics


def curve(losses: list[float], steps: int = 100) -> RangeTest:
    test = RangeTest(1e-7, 10, steps)
    test.smoothed = losses
    return test


def test_the_suggestion_is_halfway_into_the_longest_fall_of_the_loss():
    """A flat loss, a steady fall over steps 40..70, then divergence: fastai's valley (first tenth and last 5 steps
    left out) lands in the middle of the fall, not where it starts or ends; a spike of noise does not move it."""
    losses = [2.0] * 40 + [2.0 - 1.5 * (k / 30) for k in range(1, 31)] + [0.5 * 1.2**k for k in range(1, 31)]
    assert len(losses) == 100
    # the fall from step 39 (the last flat point) to 69: 31 points, from 69 - 31 = 38 (fastai's start), + 31/3 + 31/6
    assert suggestion(curve(losses)) == 38 + 10 + 5
    noisy = list(losses)
    noisy[20] = 1.0  # a single low step in the flat part: the steepest descent would jump to step 19 or 20
    assert suggestion(curve(noisy)) == 38 + 10 + 5
    assert valley([3.0, 2.0, 1.0]) == 0 and valley([5.0, 1.0, 4.0, 3.0, 2.0, 6.0]) == 1
    with pytest.raises(ConfigError, match="the loss never fell"):
        suggestion(curve([1.0 + k / 100 for k in range(100)]))
    with pytest.raises(ConfigError, match="stopped after 12 of 100 steps"):
        suggestion(curve([1.0] * 12))


def test_the_test_stops_once_the_smoothed_loss_exceeds_4x_its_lowest_or_is_not_finite():
    def run(losses: list[float], smoothing: float = 0.0) -> int:
        test = RangeTest(1e-7, 10, 100, smoothing=smoothing)
        trainer = SimpleNamespace(global_step=0, should_stop=False, optimizers=[SimpleNamespace(param_groups=[])])
        for loss in losses:
            trainer.global_step += 1
            test.on_train_batch_end(trainer, None, {"loss": torch.tensor(loss)}, None, 0)
            if trainer.should_stop:
                break
        return len(test.losses)

    assert run([1.0, 0.5, 1.9, 2.0, 2.1, 1.0]) == 5  # 2.1 > 4 x 0.5
    assert run([1.0, math.nan, 1.0]) == 2
    assert run([1.0, 0.5, 2.1], smoothing=0.98) == 3  # smoothed, 2.1 is far from 4x: no stop


def test_wrong_range_test_settings_are_one_error_naming_each_key(tmp_path, image_folder):
    bad = ["lr_find.min_lr=1", "lr_find.max_lr=0.1", "lr_find.steps=5", "lr_find.smoothing=1", "lr_find.stop_factor=1"]
    cfg = compose_train(tmp_path, ["data=imagefolder", f"data.root={image_folder}", *bad, "trainer=ddp_cpu"], "lr_find")
    with pytest.raises(ConfigError) as error:
        find_lr(cfg)  # before anything is built
    problems = str(error.value).splitlines()[1:]
    assert [problem.split("=")[0].strip() for problem in problems] == [
        "lr_find.min_lr",
        "lr_find.steps",
        "lr_find.smoothing",
        "lr_find.stop_factor",
        "lr_find.py runs on one device (trainer.devices",
    ]


def test_the_benchmark_races_the_sweep_and_both_suggestions(tmp_path, image_folder):
    """benchmarks/lr_find.py: compare.py's command plans 5 lrs and the 2 suggestions x 3 seeds, each job at its lr;
    a suggestion's distance is to the best lr of the sweep (not to itself), in points."""
    from benchmarks import lr_find
    from finetune.compare import plan
    from finetune.comparison import compare

    common = ["data=imagefolder", f"data.root={image_folder}", *SMALL_MODEL]
    raced = lr_find.settings(lr_find.LRS, {"lr_find_head": 0.0034, "lr_find_all": 0.00011})
    cfg = compose_train(tmp_path, lr_find.compare_command(common, raced, "1,2,3", tmp_path / "compare")[3:], "compare")
    jobs = plan(cfg)
    assert len(jobs) == 21 and {job.setting for job in jobs} == set(raced)
    job = next(job for job in jobs if job.name == "lr_find_all-seed2")
    assert compose_train(tmp_path, [*common, *job.overrides]).optimizer.lr == 0.00011
    assert raced["lr_3e-5"] == "3e-5" and raced["lr_find_head"] == "0.0034"

    table = {
        "lr_1e-4": {1: 0.80, 2: 0.82, 3: 0.81},
        "lr_3e-4": {1: 0.84, 2: 0.86, 3: 0.85},
        "lr_find_head": {1: 0.87, 2: 0.85, 3: 0.86},  # better than the sweep's best
        "lr_find_all": {1: 0.82, 2: 0.83, 3: 0.84},
    }
    gaps = lr_find.gaps(compare(table), {name: "x" for name in table})
    assert gaps == {"lr_find_head": pytest.approx(1.0), "lr_find_all": pytest.approx(-2.0)}


@pytest.mark.slow  # lr_find.py twice and a compare.py of 4 jobs, end to end; its parts: the test above
def test_the_benchmark_runs_tiny_on_generated_images(tmp_path, monkeypatch, one_thread):
    from benchmarks import lr_find

    monkeypatch.setenv("FINETUNE_ROOT", str(tmp_path))  # compare.py's jobs write there
    result = lr_find.main(["--tiny", "--out", str(tmp_path / "bench")])
    assert set(result["suggestions"]) == {"lr_find_head", "lr_find_all"}
    assert all(1e-7 <= lr <= 10 for lr in result["suggestions"].values())
    assert set(result["accuracy"]) == {"lr_1e-3", "lr_1e-2", "lr_find_head", "lr_find_all"}
    assert set(result["points_from_the_best_lr"]) == {"lr_find_head", "lr_find_all"}
    assert (tmp_path / "bench" / "compare" / "compare.md").is_file()
    assert json.loads((tmp_path / "bench" / "lr_find.jsonl").read_text()) == result

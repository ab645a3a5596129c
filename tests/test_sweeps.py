"""Sweeps as README.md gives them (`train.py -m ...`, `hparams_search=lr_optuna`), tiny and offline."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from tensorboard import context
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins import base_plugin
from tensorboard.plugins.hparams import api_pb2, backend_context, plugin_data_pb2

from tests.helpers import SMALL_MODEL, TINY, compose_train, event_dir, run_cli


def test_every_job_of_a_sweep_has_its_run_folder_with_its_overrides(strategy_sweep):
    folder, _ = strategy_sweep
    jobs = sorted(p for p in folder.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    overrides = [
        dict(o.split("=", 1) for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())) for job in jobs
    ]
    swept = [[f"strategy={o['strategy']}", f"seed={o['seed']}"] for o in overrides]  # a key given twice: the last
    assert swept == [
        ["strategy=freeze", "seed=1"],
        ["strategy=freeze", "seed=2"],
        ["strategy=finetune", "seed=1"],
        ["strategy=finetune", "seed=2"],
    ]
    for job in jobs:
        status = json.loads((job / "status.json").read_text())
        assert status["status"] == "completed" and status["wall_time_s"] > 0
        assert list(event_dir(job).glob("events.out.tfevents.*"))


def tensorboard_view(logdir: Path) -> tuple[list[str], api_pb2.Experiment]:
    """What `tensorboard --logdir <logdir>` shows: its run names, and the HPARAMS tab's experiment (columns in
    order, metrics) as TensorBoard's hparams plugin builds it from the event files."""
    runs = plugin_event_multiplexer.EventMultiplexer().AddRunsFromDirectory(str(logdir))
    runs.Reload()
    provider = data_provider.MultiplexerDataProvider(runs, str(logdir))
    tab = backend_context.Context(base_plugin.TBContext(logdir=str(logdir), multiplexer=runs, data_provider=provider))
    request = context.RequestContext()
    experiment = tab.experiment_from_metadata(
        request, "", True, tab.hparams_metadata(request, ""), tab.hparams_from_data_provider(request, "", limit=None)
    )
    return sorted(runs.Runs()), experiment


def test_tensorboard_lists_a_sweep_by_its_overrides_and_its_hparams_by_the_swept_keys(strategy_sweep):
    folder, _ = strategy_sweep
    runs, experiment = tensorboard_view(folder)
    jobs = {"0": ("freeze", 1), "1": ("freeze", 2), "2": ("finetune", 1), "3": ("finetune", 2)}
    assert [run.split("/")[:2] for run in runs] == [[job, "tensorboard"] for job in jobs]
    for run, (strategy, seed) in zip(runs, jobs.values(), strict=True):
        name = run.split("/", 2)[2]  # the job's overrides, the swept ones first; no paths
        assert name.startswith(f"strategy={strategy},seed={seed},") and "debug=tiny" in name and "root" not in name

    columns = [info.name for info in experiment.hparam_infos]
    assert columns[:2] == ["seed", "strategy"]  # what the sweep varies first; TensorBoard sorts the rest by name
    assert [info.differs for info in experiment.hparam_infos].count(True) == 2
    assert {"optimizer", "optimizer.lr", "model", "data.batch_size", "data.augment", "strategy.head_lr_mult"} <= set(
        columns
    )
    left_out = {"_target_", "_partial_", "num_workers", "pin_memory", "persistent_workers", "root", "paths"}
    assert not [column for column in columns if left_out & set(column.split("."))]
    assert "data.seed" not in columns and "strategy.name" not in columns  # ${seed} and strategy= again
    metrics = [info.name.tag for info in experiment.metric_infos]
    assert metrics[:3] == ["hp/val/acc", "hp/test/acc", "hp/test/macro_f1"]


def test_each_run_logs_its_hyperparameters_with_its_final_metrics_for_the_hparams_tab(strategy_sweep):
    folder, _ = strategy_sweep
    for job, (strategy, seed) in zip(
        "0123", [("freeze", 1), ("freeze", 2), ("finetune", 1), ("finetune", 2)], strict=True
    ):
        events = EventAccumulator(str(event_dir(folder / job)))
        events.Reload()
        content = events.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
        hparams = start.session_start_info.hparams
        assert hparams["strategy"].string_value == strategy and hparams["seed"].number_value == seed
        assert hparams["optimizer.lr"].number_value == 6.4e-3 and hparams["optimizer"].string_value == "sgd"
        final = events.Scalars("hp/test/acc")[-1].value
        assert final == events.Scalars("test/acc")[-1].value  # the metric beside the hparams is the run's result
        assert events.Scalars("hp/test/macro_f1")[-1].value == events.Scalars("test/macro_f1")[-1].value


def test_a_diverging_job_is_recorded_as_failed_and_the_sweep_and_report_complete(tmp_path, image_folder):
    args = [
        "-m",
        "optimizer.lr=1e-2,1e6",
        "data=imagefolder",
        f"data.root={image_folder}",
        "strategy.pretrained=false",
    ]  # ResNet-18: lr 1e6 diverges
    result = run_cli(["train.py", *args, *TINY], tmp_path)
    assert result.returncode == 0, result.output
    assert "job 1 failed, the sweep goes on" in result.output
    (folder,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    status = [json.loads((folder / job / "status.json").read_text()) for job in "01"]
    assert [s["status"] for s in status] == ["completed", "failed"]
    assert status[1]["error"].startswith("FloatingPointError: The training loss is not finite")
    assert not (folder / "1" / "checkpoints").exists(), "a diverged run must not leave a checkpoint"
    assert (folder / "0" / "checkpoints" / "last.ckpt").is_file()

    console_script = Path(sys.executable).parent / "finetune-report"  # as pip installs it
    report = run_cli([str(console_script), str(folder)], tmp_path)
    assert report.returncode == 0, report.output
    rows = [line for line in report.output.splitlines() if line.startswith("| ") and "status" not in line]
    assert [row.split(" | ")[1] for row in rows] == ["0.01", "1e+06"]
    statuses = [row.rstrip(" |").rsplit(" | ", 1)[1] for row in rows]  # a tiny run at chance is also "collapsed"
    assert statuses[0] in ("completed", "completed, collapsed") and statuses[1] == "failed"
    assert "- 1: FloatingPointError: The training loss is not finite" in (folder / "report.md").read_text()
    assert (folder / "acc_vs_lr.png").stat().st_size > 10_000 and (folder / "curves.png").is_file()


def test_optuna_searches_lr_and_head_lr_mult_for_the_best_val_acc(tmp_path, image_folder):
    args = ["hparams_search=lr_optuna", "hydra.sweeper.n_trials=2", "data=imagefolder", f"data.root={image_folder}"]
    result = run_cli(["train.py", *args, *SMALL_MODEL, *TINY], tmp_path)
    assert result.returncode == 0, result.output
    (folder,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    trials = [yaml.safe_load((folder / job / ".hydra" / "overrides.yaml").read_text()) for job in "01"]
    lrs = [float(o.split("=")[1]) for trial in trials for o in trial if o.startswith("optimizer.lr=")]
    mults = [float(o.split("=")[1]) for trial in trials for o in trial if o.startswith("strategy.head_lr_mult=")]
    assert len(set(lrs)) == 2 and all(1e-5 <= lr <= 1e-3 for lr in lrs)  # where AdamW fine-tunes
    assert len(mults) == 2 and all(1.0 <= m <= 100.0 for m in mults)
    results = yaml.safe_load((folder / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(max(val_acc(folder / job) for job in "01"))
    assert set(results["best_params"]) == {"optimizer.lr", "strategy.head_lr_mult"}
    runs, experiment = tensorboard_view(folder)  # the search space is what the trials vary: first in both
    assert all(run.split("/")[2].startswith("optimizer.lr=") for run in runs)
    assert [info.name for info in experiment.hparam_infos if info.differs] == ["optimizer.lr", "strategy.head_lr_mult"]


def val_acc(run_dir) -> float:
    events = EventAccumulator(str(event_dir(run_dir)))
    events.Reload()
    return events.Scalars("val/acc")[-1].value


@pytest.mark.slow  # 7 tiny train.py runs through compare.py: about a minute
def test_strategy_benchmark_runs_every_strategy_and_reports(tmp_path, image_folder):
    from benchmarks import strategies

    # 5 epochs: gradual unfreezes at epochs 1 to 4
    tiny = ["--seeds", "1", "--epochs", "5", "--image-size", "32", "--num-workers", "0", "data.batch_size=8"]
    tiny += ["data.min_steps_per_epoch=0"]  # one pass over the tiny folder per epoch
    out = strategies.main(["--data", str(image_folder), "--out", str(tmp_path), *tiny, "strategy.pretrained=false"])
    statuses = {p.parent.name: json.loads(p.read_text())["status"] for p in (out / "jobs").glob("*/status.json")}
    names = [*strategies.STRATEGIES.split(","), "scratch_lr10x"]
    assert statuses == {f"{name}-seed1": "completed" for name in names}
    report = (out / "compare.md").read_text()
    for name in names:
        assert f"| {name}-seed1 | {name} | 1 | all | " in report
    plan = json.loads((out / "jobs.json").read_text())["jobs"]
    assert "optimizer.lr=0.003" in plan[-1]["overrides"]  # scratch again at 10x the recipe's lr (AdamW 3e-4)


def test_method_benchmark_plans_each_method_on_the_recipe(tmp_path, image_folder):
    """benchmarks/methods.py: compare.py's command plans the recipe and each method x seeds x shots, and every job
    composes and passes the config rules as compare.py composes it (what the jobs run is trained in
    tests/test_regularizers.py and tests/test_peft.py)."""
    from argparse import Namespace

    from benchmarks import methods
    from finetune.compare import plan
    from finetune.validation import validate

    args = Namespace(image_size=32, num_workers=0, epochs=2, overrides=[], seeds="1,2", shots=["10", "all"])
    command = methods.compare_command(args, image_folder, tmp_path / "compare")
    jobs = plan(compose_train(tmp_path, command, "compare"))
    assert len(jobs) == 7 * 2 * 2 and {job.setting for job in jobs} == {"freeze_unfreeze", *methods.METHODS}
    for job in jobs:
        if job.seed == 1:
            cfg = compose_train(tmp_path, [*methods.recipe(args, image_folder), *job.overrides])
            validate(cfg)
            assert cfg.strategy.name == "freeze_unfreeze" and cfg.data.shots == job.shots
    assert (
        compose_train(tmp_path, [*methods.recipe(args, image_folder), "regularizer=l2sp"]).optimizer.weight_decay == 0
    )


def test_weight_space_benchmark_summarises_paired_differences():
    """benchmarks/weight_space.py's table: each model's mean and the paired difference with its 95 % t interval
    (2 seeds: t(0.975, 1) = 12.706; differences 2 and 4 points: mean 3, sem 1, half-width 12.7)."""
    from benchmarks.weight_space import summary

    records = [
        {"shots": "all", "probe": 0.70, "end": 0.78, "wise_ft": 0.80, "soup": 0.78, "soup_best_run": 0.78},
        {"shots": "all", "probe": 0.72, "end": 0.86, "wise_ft": 0.90, "soup": 0.86, "soup_best_run": 0.86},
    ]
    rows = {line.split(" | ")[1]: line for line in summary(records).splitlines()[2:]}
    assert rows["wise_ft - end"] == "| all | wise_ft - end | 0.850 | 0.820 | +3.0 ± 12.7 | 0.2 | 2 |"
    assert rows["soup - soup_best_run"] == "| all | soup - soup_best_run | 0.820 | 0.820 | +0.0 ± 0.0 | 1 | 2 |"


@pytest.mark.slow  # 4 tiny runs through compare.py, then wise_ft and soup on each seed
def test_weight_space_benchmark_on_a_comparison(tmp_path, image_folder):
    """WiSE-FT of each seed's recipe run (its probe.ckpt -> last.ckpt) and a greedy soup of each seed's runs."""
    from benchmarks.weight_space import main

    tiny = [a for a in TINY if not a.startswith("strategy=")]  # the recipe's strategy, raced as compare's
    args = ["compare.py", "data=imagefolder", f"data.root={image_folder}", *tiny, *SMALL_MODEL]
    args += ["trainer.max_epochs=2", "compare.strategies=[freeze_unfreeze]"]
    args += ['compare.settings={lr_half: ["optimizer.lr=0.005"]}', "compare.seeds=2", "compare.estimate=false"]
    result = run_cli(args, tmp_path)
    assert result.returncode == 0, result.output[-3000:]
    (folder,) = (tmp_path / "logs" / "compare").iterdir()
    records = main([str(folder), "--out", str(tmp_path / "out")])
    assert [(r["seed"], r["shots"]) for r in records] == [(1, "all"), (2, "all")]
    for record in records:
        assert record["alpha"] in [k / 10 for k in range(11)]  # wise_ft.alphas' default grid
        assert record["best_run"] in record["ingredients"] and len(record["ingredients"]) <= 2
        assert all(name.endswith(f"seed{record['seed']}") for name in record["ingredients"])  # one seed's runs
    assert "wise_ft - end" in (tmp_path / "out" / "weight_space.md").read_text()


def test_method_benchmark_tables_each_method_against_the_recipe(tmp_path):
    """benchmarks/methods.py's against_recipe.md: paired differences to the recipe (not to the best), Holm over
    the methods, fit time as a ratio over the same seeds."""
    from benchmarks.methods import RECIPE, against_recipe
    from finetune.comparison import Job
    from tests.test_compare import fake_run

    accs = {RECIPE: [0.70, 0.72, 0.71], "l2sp": [0.73, 0.75, 0.74], "lora": [0.69, 0.73, 0.70]}
    jobs = [Job(f"{s}-seed{seed}", s, seed, None, [f"seed={seed}"]) for s in accs for seed in (1, 2, 3)]
    for job in jobs:
        fake_run(tmp_path / "jobs" / job.name, "completed", accs[job.setting][job.seed - 1])
    plan = {"command": "python compare.py ...", "classes": 2, "jobs": [job.to_dict() for job in jobs]}
    (tmp_path / "jobs.json").write_text(json.dumps(plan))
    rows = {line.split(" | ")[1]: line.split(" | ") for line in against_recipe(tmp_path).splitlines()[2:]}
    assert rows["l2sp"][3] == "+3.0 ± 0.0" and float(rows["l2sp"][5]) < 1e-6  # the same 3 points in every seed
    assert rows["lora"][2:4] == ["0.707", "-0.3 ± 2.9"]  # differences -1, +1, -1
    assert rows["lora"][4:6] == ["0.67", "0.67"]  # t = -0.5, 2 df; Holm: the larger of 2 p-values x 1
    assert rows[f"**{RECIPE}** (recipe)"][6:8] == ["10", "1.00"] and rows["lora"][-1] == "1,2,3 |"

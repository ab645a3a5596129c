"""The loggers a run can have (logger=tensorboard, csv, mlflow, wandb, many), what they record, read back with each
tracker's own client or files, offline; and the settings and names they show."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning_utilities.core.imports import RequirementCache
from omegaconf import OmegaConf

from finetune import report
from finetune.builders import instantiate_loggers
from finetune.errors import MissingPackageError
from finetune.loggers import MLFlowLogger, hparams
from finetune.train import finalized, train
from tests.helpers import SMALL_MODEL, TINY, compose_train, doc_commands, run_cli, start_cli

# Keys that tell no runs apart: they must not reach HPARAMS or the trackers' params
LEFT_OUT = {"_target_", "_partial_", "num_workers", "pin_memory", "persistent_workers", "root", "paths", "ckpt_path"}


@pytest.fixture(scope="module")
def mlflow_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project root whose `logs/mlflow.db` is the module's one SQLite store: MLflow creates its tables once (about
    9 s on 2 CPU cores)."""
    root = tmp_path_factory.mktemp("mlflow")
    (root / "logs").mkdir()
    return root


@pytest.fixture(scope="module")
def mlflow_store(mlflow_root: Path) -> str:
    return f"sqlite:///{mlflow_root / 'logs' / 'mlflow.db'}"


def tiny_run(tmp_path: Path, image_folder: Path, *overrides: str):
    """The config of a tiny run, with the `.hydra/` files Hydra writes into a run folder before the run starts."""
    args = ["data=imagefolder", f"data.root={image_folder}", *TINY, *SMALL_MODEL, *overrides]
    cfg = compose_train(tmp_path, args)
    hydra_dir = Path(cfg.paths.output_dir) / ".hydra"
    hydra_dir.mkdir(parents=True)
    OmegaConf.save(cfg, hydra_dir / "config.yaml")
    OmegaConf.save(OmegaConf.create(list(cfg.hydra.overrides.task)), hydra_dir / "overrides.yaml")
    return cfg


def test_the_settings_and_the_run_name_are_what_tells_runs_apart(tmp_path):
    cfg = compose_train(
        tmp_path, ["strategy=freeze", "optimizer.lr=0.01", "data=imagefolder", "data.root=/images", "ckpt_path=last"]
    )
    assert cfg.run_name == "strategy=freeze,optimizer.lr=0.01,data=imagefolder"  # no paths
    settings = hparams(cfg)
    assert list(settings)[:3] == ["strategy", "optimizer.lr", "data"]  # the overrides first
    assert settings["strategy"] == "freeze" and settings["optimizer.lr"] == 0.01 and settings["seed"] == 42
    # a group's choice says what its _target_ said; scheduler=none is not its null
    assert (settings["optimizer"], settings["model"], settings["scheduler"]) == ("adamw", "resnet18", "warmup_cosine")
    assert hparams(compose_train(tmp_path, ["scheduler=none"]))["scheduler"] == "none"
    assert settings["data.batch_size"] == 32 and settings["strategy.head_lr_mult"] == 10.0
    assert not [key for key in settings if LEFT_OUT & set(key.split("."))]
    assert "data.seed" not in settings and "strategy.name" not in settings  # ${seed} and strategy=freeze again
    assert all(isinstance(value, (bool, int, float, str)) for value in settings.values())
    assert compose_train(tmp_path, []).run_name == "train"  # no overrides: the task's name
    assert compose_train(tmp_path, ["strategy=finetune", "strategy=freeze"]).run_name == "strategy=freeze"  # the last
    assert compose_train(tmp_path, ["run_name=baseline"]).run_name == "baseline"


def test_logger_many_is_tensorboard_csv_and_mlflow(tmp_path, mlflow_store):
    cfg = compose_train(tmp_path, ["logger=many", f"logger.mlflow.tracking_uri={mlflow_store}", "seed=3"])
    loggers = instantiate_loggers(cfg.logger)
    assert [type(logger) for logger in loggers] == [TensorBoardLogger, CSVLogger, MLFlowLogger]
    assert loggers[0].version == "seed=3"


@pytest.mark.parametrize(
    "logger, available",
    [
        ("mlflow", "lightning.pytorch.loggers.mlflow._MLFLOW_AVAILABLE"),
        ("wandb", "lightning.pytorch.loggers.wandb._WANDB_AVAILABLE"),
    ],
)
def test_a_tracker_without_its_package_says_how_to_install_it(tmp_path, monkeypatch, logger, available):
    monkeypatch.setattr(available, RequirementCache(f"{logger}-not-installed"))  # as Lightning sees a missing package
    cfg = compose_train(tmp_path, [f"logger={logger}"])
    with pytest.raises(MissingPackageError, match=re.escape('pip install -e ".[trackers]"')):
        instantiate_loggers(cfg.logger)
    default = compose_train(tmp_path, [])  # the default logger needs neither
    assert [type(logger) for logger in instantiate_loggers(default.logger)] == [TensorBoardLogger]


def test_mlflow_records_params_metrics_config_and_checkpoints_and_the_report_reads_the_run(
    tmp_path, image_folder, mlflow_store
):
    from mlflow.tracking import MlflowClient

    cfg = tiny_run(
        tmp_path, image_folder, "logger=mlflow", f"logger.mlflow.tracking_uri={mlflow_store}", "trainer.max_epochs=2"
    )
    metrics = train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    client = MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("finetune")
    (run,) = client.search_runs([experiment.experiment_id], f"tags.run_dir = '{run_dir}'")
    assert run.info.status == "FINISHED" and run.info.run_name == cfg.run_name
    params = run.data.params
    assert params["optimizer"] == "sgd" and float(params["optimizer.lr"]) == 6.4e-3 and params["data"] == "imagefolder"
    assert not [key for key in params if LEFT_OUT & set(key.split("."))]
    val_acc = client.get_metric_history(run.info.run_id, "val/acc")
    assert len(val_acc) == 3  # the initial weights, then each epoch
    assert run.data.metrics["test/acc"] == pytest.approx(metrics["test/acc"])
    assert run.data.metrics["test/macro_f1"] == pytest.approx(metrics["test/macro_f1"])
    tags = run.data.tags
    assert Path(tags["checkpoint.last"]) == run_dir / "checkpoints" / "last.ckpt"
    assert Path(tags["checkpoint.best"]).parent == run_dir / "checkpoints" and Path(tags["checkpoint.best"]).is_file()
    artifacts = {artifact.path for artifact in client.list_artifacts(run.info.run_id, "hydra")}
    assert artifacts == {"hydra/config.yaml", "hydra/overrides.yaml"}
    # not ./mlruns where it runs (the module's tests share one store: the first logger made created the experiment)
    assert Path(experiment.artifact_location).parts[-2:] == ("logs", "mlartifacts")

    (reported,) = report.load_runs(run_dir)  # no TensorBoard events: from csv/metrics.csv
    assert reported.epochs == 2 and reported.test_acc == pytest.approx(metrics["test/acc"])
    assert reported.best_val_acc == pytest.approx(max(m.value for m in val_acc[1:]))


def test_mlflow_ends_an_interrupted_run_as_failed_and_the_interrupt_goes_on(tmp_path, mlflow_store):
    cfg = compose_train(tmp_path, ["logger=mlflow", f"logger.mlflow.tracking_uri={mlflow_store}"])
    loggers = instantiate_loggers(cfg.logger)
    with pytest.raises(KeyboardInterrupt), finalized(loggers):
        loggers[-1].log_hyperparams({"seed": 1})
        raise KeyboardInterrupt
    mlflow = loggers[-1]
    assert mlflow.experiment.get_run(mlflow.run_id).info.status == "FAILED"


def fetch(url: str, body: dict | None = None) -> bytes:
    """The response to a GET of `url`, or to a POST of `body` as JSON."""
    data = None if body is None else json.dumps(body).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data, {"Content-Type": "application/json"})) as response:
        return response.read()


@pytest.mark.slow  # a server and a browser's request (38 s); what MLflow records is tested above in seconds
def test_mlflow_ui_as_documented_shows_the_run_and_its_config(tmp_path, image_folder, mlflow_root, mlflow_store):
    cfg = tiny_run(tmp_path, image_folder, "logger=mlflow", f"logger.mlflow.tracking_uri={mlflow_store}")
    train(cfg)
    with socket.socket() as probe:  # a free port: 5000, the default, may be taken where the tests run
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (typed,) = [
        line for line in doc_commands("docs/sweeps.md", "## Experiment trackers") if line.startswith("mlflow ui ")
    ]
    command = [*shlex.split(typed.split("#")[0]), "--port", str(port)]
    command[0] = str(Path(sys.executable).with_name("mlflow"))  # the venv's, active or not
    log = tmp_path / "mlflow-ui.log"
    with log.open("w") as output:  # a session of its own: the UI's workers are stopped with it
        server = subprocess.Popen(command, cwd=mlflow_root, stdout=output, stderr=output, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            with socket.socket() as client:
                if client.connect_ex(("127.0.0.1", port)) == 0:  # listening
                    break
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        api = f"http://127.0.0.1:{port}/api/2.0/mlflow"
        experiment = json.loads(fetch(f"{api}/experiments/get-by-name?experiment_name=finetune"))["experiment"]
        query = {"experiment_ids": [experiment["experiment_id"]], "filter": f"tags.run_dir = '{tmp_path / 'run'}'"}
        (run,) = json.loads(fetch(f"{api}/runs/search", query))["runs"]
        assert run["info"]["run_name"] == cfg.run_name and run["info"]["status"] == "FINISHED"
        artifact = f"http://127.0.0.1:{port}/get-artifact?path=hydra/config.yaml&run_uuid={run['info']['run_id']}"
        assert OmegaConf.create(fetch(artifact).decode()).run_name == cfg.run_name  # the config the UI shows
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def wandb_records(path: Path) -> Iterator:
    """The records of a `.wandb` file, as wandb writes them: a 7-byte file header, then blocks of 32 KiB holding
    chunks (a 7-byte header: CRC-32, length, type 1 = whole record, 2/3/4 = first/middle/last part) that make up
    `Record` protobufs."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    position, parts = 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # the tail of a block too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        parts += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            yield Record.FromString(parts)
            parts = b""


def test_wandb_runs_offline_into_the_run_folder_and_is_finished(tmp_path, image_folder, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")  # restored after the test (WandbLogger sets it for the process)
    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb-home"))
    cfg = tiny_run(tmp_path, image_folder, "logger=wandb")
    try:
        metrics = train(cfg)
        assert wandb.run is None  # finished: the next job of a sweep gets a run of its own
    finally:
        wandb.teardown()  # wandb's service process, which would otherwise wait for pytest to exit
    (run_file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    records = {}
    for record in wandb_records(run_file):
        records.setdefault(record.WhichOneof("record_type"), []).append(record)
    assert records["run"][0].run.display_name == cfg.run_name
    config = {item.key: item.value_json for record in records["config"] for item in record.config.update}
    assert config["optimizer"] == '"sgd"' and float(config["optimizer.lr"]) == 6.4e-3
    history = [{item.nested_key[0]: item.value_json for item in r.history.item} for r in records["history"]]
    assert len([row for row in history if "val/acc" in row]) == 2  # the initial weights, then the epoch
    (test,) = [row for row in history if "test/acc" in row]
    assert float(test["test/acc"]) == pytest.approx(metrics["test/acc"])
    assert records["exit"][0].exit.exit_code == 0  # the run was finished, not left to the process's exit
    (reported,) = report.load_runs(tmp_path / "run")  # no TensorBoard events: from csv/metrics.csv
    assert reported.epochs == 1 and reported.test_acc == pytest.approx(metrics["test/acc"])


@pytest.mark.slow
def test_a_sweep_with_mlflow_is_reported_from_its_run_folders_and_listed_in_mlflow(
    tmp_path, image_folder, mlflow_store
):
    from mlflow.tracking import MlflowClient

    args = [
        "-m",
        "optimizer.lr=1e-2,1e6",
        "logger=mlflow",
        f"logger.mlflow.tracking_uri={mlflow_store}",
    ]  # 1e6 diverges
    data = ["data=imagefolder", f"data.root={image_folder}", *SMALL_MODEL]
    result = run_cli(["train.py", *args, *data, *TINY], tmp_path)
    assert result.returncode == 0, result.output
    (folder,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    runs = report.load_runs(folder)
    assert [(run.name, run.lr, run.status) for run in runs] == [("0", 1e-2, "completed"), ("1", 1e6, "failed")]
    assert runs[0].epochs == 1 and 0 <= runs[0].test_acc <= 1
    assert "| run | optimizer.lr | best val acc |" in report.write_report(folder)
    client = MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("finetune").experiment_id
    for run, status in zip(runs, ("FINISHED", "FAILED"), strict=True):
        (tracked,) = client.search_runs([experiment], f"tags.run_dir = '{run.folder}'")
        assert (
            tracked.info.run_name.startswith(f"optimizer.lr={run.overrides['optimizer.lr']},")
            and tracked.info.status == status
        )
        assert float(tracked.data.params["optimizer.lr"]) == run.lr  # logged when the run starts: failed runs too
        artifacts = {artifact.path for artifact in client.list_artifacts(tracked.info.run_id, "hydra")}
        assert {"hydra/config.yaml", "hydra/overrides.yaml"} <= artifacts
    (tracked,) = client.search_runs([experiment], f"tags.run_dir = '{runs[0].folder}'")
    assert tracked.data.metrics["test/acc"] == pytest.approx(runs[0].test_acc)


@pytest.mark.parametrize("logger", ["mlflow", pytest.param("wandb", marks=pytest.mark.slow)])
def test_runs_started_together_into_one_new_store_all_log(tmp_path, logger):
    """Jobs of a parallel launcher or a SLURM array, one new FINETUNE_ROOT: MLflow's first-use migration of the
    SQLite store ran in each at once (all exited 1, `duplicate column name: step`, the store left unreadable);
    W&B's offline runs share its config and cache folders (about 10 s of CPU per job)."""
    jobs = 2  # the race needs two
    env = {"WANDB_MODE": "offline"}
    env |= {
        variable: str(tmp_path / "wandb-home") for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR")
    }
    args = ["-m", "tests.parallel_logger", str(tmp_path), logger]
    started = [start_cli([*args, str(job), str(jobs)], tmp_path, **env) for job in range(jobs)]
    results = [run.wait(240) for run in started]
    assert [result.returncode for result in results] == [0] * jobs, "\n".join(r.output[-2000:] for r in results)
    if logger == "mlflow":
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{tmp_path / 'logs' / 'mlflow.db'}")
        experiment = client.get_experiment_by_name("finetune").experiment_id
        runs = client.search_runs([experiment])
        assert sorted(run.info.run_name for run in runs) == [f"job{job}" for job in range(jobs)]
        assert {run.info.status for run in runs} == {"FINISHED"} and all(
            run.data.metrics["val/acc"] == 0.5 for run in runs
        )
    else:
        for job in range(jobs):
            (run_file,) = (tmp_path / f"run{job}" / "wandb").glob("offline-run-*/run-*.wandb")
            exits = [r.exit.exit_code for r in wandb_records(run_file) if r.WhichOneof("record_type") == "exit"]
            assert exits == [0]

"""What the loggers show of a run: its name, the settings that tell it apart from other runs (TensorBoard's
HPARAMS tab, MLflow's params, W&B's config), and how each tracker's run ends.

A sweep opened in TensorBoard lists its runs by name (`<job>/tensorboard/strategy=freeze,seed=1`), and its
HPARAMS tab opens with the keys the sweep varies: TensorBoard orders the columns by whether a key differs
between runs, then by name, and takes that flag from the experiment summary a run writes (`log_hparams_tab`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from filelock import FileLock
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.types import RunMode
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers import MLFlowLogger as LightningMLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from finetune.settings import SETTINGS, plain

# Parts of a key that never tell runs apart: how objects are built (`_target_`; the group's choice says it), how
# data is loaded, where files are, the loggers themselves. Left out of HPARAMS, the trackers' params, run names.
NOT_COMPARED = frozenset(
    {
        "_target_",
        "_partial_",
        "_convert_",
        "_recursive_",
        "backbone",  # model.name and model.weights_path again, for the builder
        "input_config",
        "num_workers",
        "pin_memory",
        "persistent_workers",
        "paths",
        "root",
        "weights_path",
        "ckpt_path",
        "cache_dir",
        "output_dir",
        "logger",
        "run_name",
        "task_name",
    }
)
# Config groups whose choice (`optimizer: sgd`) is a setting of its own
GROUPS = ("experiment", "data", "model", "strategy", "optimizer", "scheduler", "loss", "regularizer", "peft", "task")
# The HPARAMS tab's metrics a sweep is judged by, listed first
HEADLINE = ("hp/val/acc", "hp/test/acc", "hp/test/macro_f1", "hp/val/map", "hp/test/map")


def compared(key: str) -> bool:
    """Whether a dotted key (`optimizer.lr`) is a setting runs are compared by (see NOT_COMPARED)."""
    return not NOT_COMPARED.intersection(key.split("."))


def _parse(overrides: Iterable[str]) -> list[Override]:
    return OverridesParser.create().parse_overrides(list(overrides))


def swept_keys() -> list[str]:
    """The keys this job's multirun varies: its sweep overrides (`strategy=freeze,finetune`, as the sweep folder's
    `multirun.yaml` records them) and the sweeper's search space (`hydra.sweeper.params`, e.g. Optuna's); none in
    a single run."""
    hydra = HydraConfig.get()
    if hydra.mode != RunMode.MULTIRUN:
        return []
    sweep = Path(hydra.sweep.dir) / "multirun.yaml"
    given = OmegaConf.load(sweep).hydra.overrides.task if sweep.is_file() else []
    space = [f"{key}={value}" for key, value in (hydra.sweeper.get("params") or {}).items()]
    return list(dict.fromkeys(o.key_or_group for o in _parse([*space, *given]) if o.is_sweep_override()))


def job_overrides() -> list[Override]:
    """The job's overrides that tell it apart, the swept keys first, then the others in command-line order."""
    swept = swept_keys()
    parsed = _parse(HydraConfig.get().overrides.task)
    last = {o.key_or_group: o for o in parsed}  # a key given twice: the last wins, as in Hydra
    overrides = [o for o in parsed if compared(o.key_or_group) and last[o.key_or_group] is o]
    return sorted(overrides, key=lambda o: swept.index(o.key_or_group) if o.key_or_group in swept else len(swept))


def varied_keys() -> list[str]:
    """What sets this run apart: the keys its sweep varies, or in a single run every key it overrides."""
    return swept_keys() or [o.key_or_group for o in job_overrides()]


def overrides_name(default: str) -> str:
    """`${overrides_name:<default>}` (`run_name` in conf/train.yaml): the job's overrides, swept keys first
    (`strategy=freeze,seed=1`), or `default` when it has none. It names a folder (`tensorboard/<name>/`), so it
    holds no `/` and stays well below the 255 bytes of a file name."""
    name = ",".join(o.input_line for o in job_overrides())
    return name.replace("/", "_")[:200] or default


def _leaves(node: DictConfig, keys: Iterable[str], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of each compared value under `keys`, but those that restate another (`data.seed: ${seed}`)."""
    for key in keys:
        path = f"{prefix}{key}"
        if not compared(path) or OmegaConf.is_missing(node, key) or OmegaConf.is_interpolation(node, key):
            continue
        value = node[key]
        if isinstance(value, DictConfig):
            yield from _leaves(value, value.keys(), f"{path}.")
        else:
            yield path, value


def _scalar(value: Any) -> bool | int | float | str:
    """A value every logger takes: a number, a bool or text (lists and None as text)."""
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def hparams(cfg: DictConfig) -> dict[str, bool | int | float | str]:
    """The settings that tell runs apart, flat and keyed as on the command line (`optimizer.lr`): the job's overrides
    first, then each group's choice (`optimizer: sgd`, which says what its `_target_` says) and the values of the
    run's settings, without what NOT_COMPARED names or what restates another key."""
    choices = HydraConfig.get().runtime.choices
    overridden = {
        o.key_or_group: choices[o.key_or_group] if o.key_or_group in choices else OmegaConf.select(cfg, o.key_or_group)
        for o in job_overrides()
    }
    values = dict(_leaves(cfg, SETTINGS))
    groups = {group: choices[group] for group in GROUPS if choices.get(group) is not None}  # no experiment=: none
    for group, choice in groups.items():  # `strategy.name: freeze` says what `strategy: freeze` says
        if f"{group}.name" in values and values[f"{group}.name"] == choice:
            del values[f"{group}.name"]
    rest = {**values, **groups, "trainer.max_epochs": cfg.trainer.max_epochs}  # `scheduler: none`, not its null
    return {key: _scalar(plain(value)) for key, value in {**overridden, **rest}.items()}


@rank_zero_only
def log_hparams_tab(
    logger: TensorBoardLogger, params: dict[str, Any], metrics: dict[str, float], varied: Sequence[str]
) -> None:
    """The run's row in TensorBoard's HPARAMS tab: its settings, the `varied` keys flagged as differing (TensorBoard
    puts those first), and its final metrics, registered in the experiment so the tab shows them, headline first.

    Lightning's `log_hyperparams(params, metrics)` writes the same summaries with no key flagged: the tab then
    opens with whatever sorts first by name (`data._target_`)."""
    logger.log_metrics(metrics)
    names = sorted(metrics, key=lambda name: HEADLINE.index(name) if name in HEADLINE else len(HEADLINE))
    experiment, start, end = hparams_summaries(params, {name: metrics[name] for name in names})
    plugin_data = experiment.value[0].metadata.plugin_data
    content = HParamsPluginData.FromString(plugin_data.content)
    for info in content.experiment.hparam_infos:
        info.differs = info.name in varied
    plugin_data.content = content.SerializeToString()
    writer = logger.experiment._get_file_writer()
    for summary in (experiment, start, end):
        writer.add_summary(summary)


def close(logger: Logger, status: str) -> None:
    """Flushes and closes `logger` for good at the end of a run (`finetune.train.finalized`).

    A W&B run is also finished here, which Lightning never does (it finalizes its loggers after `fit` and again
    after `test`, with logging in between): else the next job of a sweep would log into the same run, and wandb's
    service would hold it open until the process exits."""
    logger.finalize(status)
    if isinstance(logger, WandbLogger) and logger._experiment is not None:
        logger._experiment.finish(exit_code=0 if status == "success" else 1)


def prepare_store(tracking_uri: str | None, experiment_name: str, artifact_location: str | None = None) -> None:
    """Creates a local SQLite store (its tables, MLflow's migrations) and the run's experiment once, under a file
    lock beside the store.

    Runs started together (a parallel Hydra launcher, a SLURM array) each run MLflow's first-use migration of a new
    file at once otherwise: all of them fail (`duplicate column name: step`) and the store is left unreadable; two
    that find no experiment both create it, and the second fails. A store that exists costs one lock and a query."""
    if not (tracking_uri or "").startswith("sqlite:///"):  # a tracking server migrates its own database
        return
    from mlflow.tracking import MlflowClient

    database = Path(tracking_uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{database}.lock"):
        client = MlflowClient(tracking_uri)  # creates and migrates the store
        if client.get_experiment_by_name(experiment_name) is None:
            client.create_experiment(experiment_name, artifact_location=artifact_location)


class MLFlowLogger(LightningMLFlowLogger):
    """Lightning's MLFlowLogger, plus what leads from an MLflow run to its files: the paths of its checkpoints as
    tags (`checkpoint.best`, `checkpoint.last`; the files stay in the run folder) and the run's Hydra config
    (`.hydra/`: config.yaml, overrides.yaml) as artifacts under `hydra/`."""

    def __init__(self, config_dir: str | os.PathLike, **kwargs: Any) -> None:
        experiment = kwargs.get("experiment_name", "lightning_logs")  # Lightning's default
        prepare_store(kwargs.get("tracking_uri"), experiment, kwargs.get("artifact_location"))
        super().__init__(**kwargs)
        self.config_dir = Path(config_dir)

    @rank_zero_only
    def after_save_checkpoint(self, checkpoint_callback: ModelCheckpoint) -> None:
        super().after_save_checkpoint(checkpoint_callback)
        kind = "best" if checkpoint_callback.monitor else "last"
        self.experiment.set_tag(self.run_id, f"checkpoint.{kind}", checkpoint_callback.best_model_path)

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        # Lightning finalizes after fit and test as well: each time the same files are written again.
        if self._initialized and self.config_dir.is_dir():  # Hydra writes it before the run starts
            self.experiment.log_artifacts(self.run_id, str(self.config_dir), "hydra")
        super().finalize(status)

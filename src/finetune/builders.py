"""Everything a run is built of, in one direction: config -> backbone metadata -> data -> model -> trainer;
and the model and data of a checkpoint, rebuilt from the settings stored in it (`rebuild`).

`train.py`, `eval.py`, the tests and the benchmarks all build through these functions, so there is one way
to make each piece (as lightning-hydra-template's `instantiate_callbacks` / `instantiate_loggers`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from hydra import compose
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.rank_zero import rank_zero_module, rank_zero_only
from omegaconf import DictConfig, OmegaConf

from finetune.checkpoint import RUN_SETTINGS, RunSettings
from finetune.data.datamodule import ImageFolderDataModule
from finetune.errors import ConfigError, MissingFileError, MissingPackageError, instantiate_unwrapped
from finetune.finetuning import StageUnfreezing
from finetune.models.backbones import load_checkpoint_file
from finetune.models.module import FineTuneModule, ModelOptions, StrategySettings
from finetune.settings import plain, run_settings

log = logging.getLogger(__name__)

# What Lightning and torch print on every run that a user of this template can do nothing about:
# frozen stages are in eval mode on purpose (their BatchNorm statistics must not move);
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
# configure_model only converts BatchNorm for DDP (see FineTuneModule): the EMA copy needs nothing from it;
warnings.filterwarnings("ignore", message=r"You're using the WeightAveraging callback with a model that overrides")
# Lightning's own use of torch's pytree (lightning/pytorch/utilities/_pytree.py), which recent torch deprecates;
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
# and of torch.distributed.nn's all_gather (lightning/fabric/utilities/distributed.py, under DDP's all_gather);
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated")


# and, on the logger that Lightning's rank_zero_info writes to: its advert for its cloud logger, that the summary
# table is ours (finetune.callbacks.ModelSummary), and that the per-step schedule counts the training batches
# (the datamodule logs what an epoch draws).
_LIGHTNING_NOTICES = (
    "💡 Tip:",
    "Trainer already configured with model summary callbacks",
    "Loading `train_dataloader` to estimate number of stepping batches",
)


def _not_a_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(_LIGHTNING_NOTICES)


rank_zero_module.log.addFilter(_not_a_notice)

# Under DDP every rank runs the whole script (Lightning starts the others as new processes): rank 0 alone says what
# the run does; the others print only their errors, so 8 GPUs do not print each line 8 times.
if rank_zero_only.rank > 0:
    logging.getLogger("finetune").setLevel(logging.ERROR)


def build_datamodule(cfg: DictConfig) -> ImageFolderDataModule:
    """The data, sized and normalised for what the backbone's weights expect (data.image_size etc. override)."""
    backbone_input = instantiate_unwrapped(cfg.model.input_config)
    return instantiate_unwrapped(cfg.data, input_config=backbone_input, _convert_="object")  # a dataclass stays one


def class_weights(loss: DictConfig, datamodule: ImageFolderDataModule) -> list[float] | None:
    """`loss.class_weights` as one weight per class: null, `balanced` (from the training split's class counts, by
    the loss's `balanced_weights`: a weight per class, BCE's pos_weight), or a list."""
    weights = plain(loss.class_weights)
    if weights is None:
        return None
    if weights == "balanced":
        counts = datamodule.class_counts()
        if not all(counts):
            raise ConfigError(f"loss.class_weights=balanced: a class has no training images (counts {counts})")
        return get_class(loss._target_).balanced_weights(counts, len(datamodule.labels["train"]))
    if isinstance(weights, str) or len(weights) != datamodule.num_classes:
        raise ConfigError(
            f"loss.class_weights={weights} must be null, balanced or a list of {datamodule.num_classes} weights "
            f"(classes {datamodule.classes})"
        )
    return [float(w) for w in weights]


def loss_terms(cfg: DictConfig) -> dict[str, Any]:
    """`loss_terms` and the chosen regulariser (`regularizer`, conf/regularizer/: a loss term too) under its name."""
    terms, regularizer = plain(cfg.loss_terms), plain(cfg.get("regularizer")) or {}
    name = regularizer.pop("name", "none")
    return terms if name == "none" else {**terms, name: regularizer}


def build_model(cfg: DictConfig, datamodule: ImageFolderDataModule) -> FineTuneModule:
    """The LightningModule for the data's classes and input; its settings typed, or plain configs (checkpointed).
    Balanced class weights come from the data's class counts (data -> model, one way)."""
    model, loss = cfg.model, plain(cfg.loss)
    if "class_weights" in loss:  # the default loss's; another loss may take none
        loss["class_weights"] = class_weights(cfg.loss, datamodule)
    return FineTuneModule(
        backbone=plain(model.backbone),
        classes=datamodule.classes,
        input_config=datamodule.input_config,
        strategy=StrategySettings.from_dict(plain(cfg.strategy)),
        optimizer=plain(cfg.optimizer),
        scheduler=plain(cfg.scheduler),
        loss=loss,
        loss_terms=loss_terms(cfg),
        peft=plain(cfg.get("peft")),
        task=plain(cfg.task),
        options=ModelOptions(
            sync_batchnorm=model.sync_batchnorm,
            channels_last=model.channels_last,
            compile=model.compile,
            head_init=model.head_init,
            head_init_map=plain(model.head_init_map),
        ),
    )


def build(cfg: DictConfig) -> tuple[ImageFolderDataModule, FineTuneModule]:
    """Backbone metadata -> data -> model, each from what came before; nothing is handed back."""
    datamodule = build_datamodule(cfg)
    return datamodule, build_model(cfg, datamodule)


def instantiate_callbacks(config: DictConfig | None) -> list[Callback]:
    """The callbacks of a `callbacks` config; an entry set to null (`callbacks.progress_bar=null`) or switched off
    (`finetune.callbacks.optional` with `enabled: false`) is left out."""
    callbacks = (instantiate_unwrapped(entry) for entry in (config or {}).values() if entry is not None)
    return [callback for callback in callbacks if callback is not None]


def _instantiate_logger(config: DictConfig) -> Logger:
    try:
        return instantiate(config)
    except InstantiationException as err:
        if not isinstance(err.__cause__, ModuleNotFoundError):
            raise
        raise MissingPackageError(
            f"{config._target_} needs a package that is not installed ({err.__cause__}): "
            'pip install -e ".[trackers]" installs MLflow and W&B'
        ) from err


def instantiate_loggers(config: DictConfig | None) -> list[Logger]:
    """The loggers of a `logger` config. The trackers (MLflow, W&B) are optional packages: without them the default
    logger runs, and choosing one says how to install them."""
    return [_instantiate_logger(entry) for entry in (config or {}).values() if entry is not None]


def build_trainer(trainer: DictConfig, callbacks: Sequence[Callback] = (), loggers: Sequence[Logger] = ()) -> L.Trainer:
    """The Trainer of a `trainer` config (no logger when none is given)."""
    return instantiate(trainer, callbacks=list(callbacks), logger=list(loggers) or False)


def build_unfreezing(cfg: DictConfig) -> StageUnfreezing:
    """The strategy's callback: which backbone stages train in which epoch."""
    schedule = {key: cfg.strategy[key] for key in ("trainable", "unfreeze_at", "unfreeze_step")}
    return StageUnfreezing(**plain(schedule))


def build_fit_trainer(cfg: DictConfig, *extra_callbacks: Callback) -> L.Trainer:
    """The Trainer of a training run: the strategy's callback first (it decides what is frozen before any
    other callback looks, e.g. the feature cache), the config's callbacks and loggers, and the run's
    settings in every checkpoint."""
    callbacks = [
        build_unfreezing(cfg),
        *instantiate_callbacks(cfg.get("callbacks")),
        RunSettings(run_settings(cfg)),
        *extra_callbacks,
    ]
    return build_trainer(cfg.trainer, callbacks, instantiate_loggers(cfg.get("logger")))


# Overrides of older runs whose keys have moved since, as the current configs spell them.
MOVED_KEYS = {
    "model.pretrained": "strategy.pretrained",
    "strategy.unfreeze_at_epoch": "strategy.unfreeze_at",
    "strategy.cache_features": "callbacks.feature_cache.enabled",
}


def _current(override: str) -> str:
    key, _, value = override.partition("=")
    if key == "strategy.unfreeze_at_epoch":
        value = f"[{value}]"
    return f"{MOVED_KEYS.get(key, key)}={value}"


def run_overrides(ckpt_path: Path) -> list[str]:
    """The command-line overrides of the run that wrote `<run>/checkpoints/<file>.ckpt`."""
    overrides = ckpt_path.resolve().parent.parent / ".hydra" / "overrides.yaml"
    if not overrides.is_file():
        raise MissingFileError(
            f"{ckpt_path} holds no run settings (written by an older version) and {overrides} is not there: "
            "evaluate it inside its train.py run folder"
        )
    return [_current(str(o)) for o in OmegaConf.load(overrides) if not str(o).startswith(("hydra.", "ckpt_path="))]


def _from_run_folder(
    ckpt_path: Path, state_dict: dict[str, Any], overrides: list[str]
) -> tuple[ImageFolderDataModule, FineTuneModule]:
    """A checkpoint of an older version: the run's overrides replayed against today's `conf/`."""
    log.warning("%s holds no run settings (an older version wrote it): rebuilding from its run folder", ckpt_path)
    cfg = compose("train", overrides=[*run_overrides(ckpt_path), "strategy.pretrained=false", *overrides])
    datamodule, model = build(cfg)
    model.load_state_dict(state_dict)
    return datamodule, model


def rebuild(ckpt_path: Path, overrides: list[str]) -> tuple[ImageFolderDataModule, FineTuneModule]:
    """The model a checkpoint holds and the data of its run (with `overrides` of `data.*`), from the settings
    stored in it: no config is read, nothing is downloaded. A checkpoint of an older version, which holds no
    settings, is rebuilt from its run folder's overrides with a warning (needs Hydra initialised, as the CLIs are)."""
    checkpoint = load_checkpoint_file(ckpt_path, key="ckpt_path")  # read once, for the settings and the weights
    settings = checkpoint.get(RUN_SETTINGS)
    if settings is None:
        return _from_run_folder(ckpt_path, checkpoint["state_dict"], overrides)
    model = FineTuneModule.from_saved(checkpoint, ckpt_path)
    data = OmegaConf.merge(OmegaConf.create(settings), OmegaConf.from_dotlist(overrides)).data
    return instantiate_unwrapped(data, input_config=model.input_config, _convert_="object"), model

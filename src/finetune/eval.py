"""The evaluation task: test a checkpoint on its run's data, rebuilt from the checkpoint alone."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra import compose
from lightning.pytorch.callbacks import RichProgressBar
from omegaconf import DictConfig, OmegaConf

from finetune.builders import build, build_trainer
from finetune.checkpoint import RUN_SETTINGS
from finetune.data.datamodule import ImageFolderDataModule
from finetune.errors import MissingFileError, UserError, instantiate_unwrapped
from finetune.models.backbones import load_checkpoint_file, load_state_dict_file
from finetune.models.module import FineTuneModule
from finetune.train import CONFIG_DIR
from finetune.validation import missing_values, validate

log = logging.getLogger(__name__)

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


def _from_run_folder(ckpt_path: Path, overrides: list[str]) -> tuple[ImageFolderDataModule, FineTuneModule]:
    """A checkpoint of an older version: the run's overrides replayed against today's `conf/`."""
    log.warning("%s holds no run settings (an older version wrote it): rebuilding from its run folder", ckpt_path)
    cfg = compose("train", overrides=[*run_overrides(ckpt_path), "strategy.pretrained=false", *overrides])
    datamodule, model = build(cfg)
    model.load_state_dict(load_state_dict_file(ckpt_path, key="ckpt_path"))
    return datamodule, model


def rebuild(ckpt_path: Path, overrides: list[str]) -> tuple[ImageFolderDataModule, FineTuneModule]:
    """The model a checkpoint holds and the data of its run, from the settings stored in it."""
    settings = load_checkpoint_file(ckpt_path, key="ckpt_path").get(RUN_SETTINGS)
    if settings is None:
        return _from_run_folder(ckpt_path, overrides)
    model = FineTuneModule.from_checkpoint(ckpt_path)
    data = OmegaConf.merge(OmegaConf.create(settings), OmegaConf.from_dotlist(overrides)).data
    return instantiate_unwrapped(data, input_config=model.input_config, _convert_="object"), model


def evaluate(cfg: DictConfig) -> dict[str, float]:
    validate(cfg, missing_values)
    ckpt_path = Path(cfg.ckpt_path).expanduser()
    if not ckpt_path.is_file():
        raise MissingFileError(f"ckpt_path: no such file: {ckpt_path}")
    datamodule, model = rebuild(ckpt_path, list(cfg.overrides))
    trainer = build_trainer(cfg.trainer, callbacks=[RichProgressBar()])
    metrics = {k: float(v) for k, v in trainer.test(model, datamodule=datamodule)[0].items()}
    print(f"Test accuracy: {metrics['test/acc']:.4f}  (checkpoint {ckpt_path})")
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg)
    except UserError as err:  # a missing or unsafe checkpoint, bad data: the message says what to change
        sys.exit(f"Error: {err}")

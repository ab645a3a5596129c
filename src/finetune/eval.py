"""The evaluation task: rebuild a run's model and data from its own config, test a checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra import compose
from hydra.utils import instantiate
from lightning.pytorch.callbacks import RichProgressBar
from omegaconf import DictConfig, OmegaConf

from finetune.errors import MissingFileError, UserError
from finetune.models.backbones import load_state_dict_file
from finetune.train import CONFIG_DIR, build
from finetune.validation import missing_values, validate


def run_overrides(ckpt_path: Path) -> list[str]:
    """The command-line overrides of the run that wrote `<run>/checkpoints/<file>.ckpt`."""
    overrides = ckpt_path.resolve().parent.parent / ".hydra" / "overrides.yaml"
    if not overrides.is_file():
        raise MissingFileError(f"{overrides} not found: ckpt_path must be a checkpoint inside a train.py run folder")
    return [str(o) for o in OmegaConf.load(overrides) if not str(o).startswith(("hydra.", "ckpt_path="))]


def evaluate(cfg: DictConfig) -> dict[str, float]:
    validate(cfg, missing_values)
    ckpt_path = Path(cfg.ckpt_path).expanduser()
    if not ckpt_path.is_file():
        raise MissingFileError(f"ckpt_path: no such file: {ckpt_path}")
    # Weights come from the checkpoint, so nothing is downloaded (pretrained=false).
    train_cfg = compose("train", overrides=[*run_overrides(ckpt_path), "model.pretrained=false", *cfg.overrides])
    datamodule, model = build(train_cfg)
    model.load_state_dict(load_state_dict_file(ckpt_path, key="ckpt_path"))  # weights only: runs no code
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[RichProgressBar()])
    metrics = {k: float(v) for k, v in trainer.test(model, datamodule=datamodule)[0].items()}
    print(f"Test accuracy: {metrics['test/acc']:.4f}  (checkpoint {ckpt_path})")
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg)
    except UserError as err:  # a missing or unsafe checkpoint, bad data: the message says what to change
        sys.exit(f"Error: {err}")

"""The settings that make a run what it is, as plain values: what its checkpoints store and its loggers show.

The lowest layer of the config code (it imports nothing of finetune), so that the builders, the loggers and the
config bootstrap (`finetune.config`) all read the same list without importing one another.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

# The settings that make a run what it is: stored in its checkpoints, and logged for TensorBoard's HPARAMS tab.
SETTINGS = (
    "seed",
    "data",
    "model",
    "strategy",
    "optimizer",
    "scheduler",
    "loss",
    "loss_terms",
    "regularizer",
    "peft",
    "task",
)


def plain(config: Any) -> Any:
    """A config node as plain Python containers, resolved (what checkpoints store and modules are given)."""
    return OmegaConf.to_container(config, resolve=True) if OmegaConf.is_config(config) else config


def run_settings(cfg: DictConfig) -> dict[str, Any]:
    """The run's SETTINGS, plain (what `finetune.checkpoint.RunSettings` stores in every checkpoint)."""
    return {key: plain(cfg.get(key)) for key in SETTINGS}

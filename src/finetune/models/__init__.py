"""Backbones split into stages, what their weights expect, and the LightningModule that fine-tunes them."""

from finetune.models.backbones import (
    Backbone,
    InputConfig,
    timm_backbone,
    timm_input_config,
    torchvision_backbone,
    torchvision_input_config,
)
from finetune.models.module import FineTuneModule

__all__ = [
    "Backbone",
    "FineTuneModule",
    "InputConfig",
    "timm_backbone",
    "timm_input_config",
    "torchvision_backbone",
    "torchvision_input_config",
]

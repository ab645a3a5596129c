"""Backbones split into stages, and the LightningModule that fine-tunes them."""

from finetune.models.backbones import Backbone, InputConfig, timm_backbone, torchvision_backbone
from finetune.models.module import FineTuneModule

__all__ = ["Backbone", "FineTuneModule", "InputConfig", "timm_backbone", "torchvision_backbone"]

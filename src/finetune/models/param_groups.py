"""Param-group rules: which parameters go into which named optimizer group, at which lr multiplier.

A rule is a pure function, as timm's `param_groups_layer_decay`: from the backbone's stages, the head and the
strategy's multipliers to a list of groups `{"name", "params", "lr_mult"}` (plus `"weight_decay": 0.0` where
decay is off); the module sets each group's lr to `optimizer.lr x lr_mult`. `strategy.param_groups` names the
rule (`_target_`, `_partial_: true`), so a method that groups the parameters otherwise (other lrs, other groups)
is a function here, not a change to the module. Every group exists from the first step: which stages train when is
the strategy callback's (`finetune.finetuning`). A parameter that does not require grad is in no group: a `peft`
method (BitFit: the biases alone; `finetune.models.parameter_efficient`) keeps it as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class LrMultipliers:
    """The strategy's lr multipliers (conf/strategy/_base.yaml): the head at `head_lr_mult`, the backbone at
    `backbone_lr_mult`, and with `group_by_stage` one group per stage, stage k of K also at
    `layer_decay ** (K - k)`."""

    head_lr_mult: float = 1.0
    backbone_lr_mult: float = 1.0
    layer_decay: float = 1.0
    group_by_stage: bool = False


def decay_split(named_params: list[tuple[str, nn.Parameter]]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decayed, not decayed) as timm's `param_groups_weight_decay`: biases and 1-D params (normalisation
    weights) get no weight decay."""
    decay = [p for n, p in named_params if p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in named_params if p.ndim <= 1 or n.endswith(".bias")]
    return decay, no_decay


def stage_groups(
    stages: nn.ModuleList, head: nn.Module, lr: LrMultipliers, filter_bias_and_bn: bool = False
) -> list[dict[str, Any]]:
    """Named groups with their lr multiplier: `backbone` (or `stage0..stageK-1`) and `head`; with
    `filter_bias_and_bn` (`optimizer.filter_bias_and_bn`), each also as `<name>_no_decay` with its biases and
    1-D params at weight_decay 0. Empty groups are left out."""
    if lr.group_by_stage:
        count = len(stages)
        groups = [
            (f"stage{k}", stage, lr.backbone_lr_mult * lr.layer_decay ** (count - k)) for k, stage in enumerate(stages)
        ]
    else:
        groups = [("backbone", stages, lr.backbone_lr_mult)]
    groups.append(("head", head, lr.head_lr_mult))
    return [group for name, module, mult in groups for group in named_groups(name, module, mult, filter_bias_and_bn)]


def named_groups(name: str, module: nn.Module, mult: float, filter_bias_and_bn: bool = False) -> list[dict[str, Any]]:
    """The group `name` of `module`'s parameters that require grad at `mult`; with `filter_bias_and_bn` also
    `<name>_no_decay`, its biases and 1-D params at weight_decay 0. Empty groups are left out."""
    named = [(key, parameter) for key, parameter in module.named_parameters() if parameter.requires_grad]
    if filter_bias_and_bn:
        decay, no_decay = decay_split(named)
        groups = [
            {"name": name, "params": decay, "lr_mult": mult},
            {"name": f"{name}_no_decay", "params": no_decay, "lr_mult": mult, "weight_decay": 0.0},
        ]
    else:
        groups = [{"name": name, "params": [p for _, p in named], "lr_mult": mult}]
    return [group for group in groups if group["params"]]

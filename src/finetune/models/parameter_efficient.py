"""Parameter-efficient fine-tuning (`peft` in conf/): a few of the backbone's parameters train, or adapters beside it.

A method is a backbone adapter: a function `Backbone -> Backbone` that the config names (`peft._target_`,
`_partial_: true`) and the LightningModule applies once, when it builds the backbone, so that a checkpoint's model,
rebuilt from its stored settings, has the same adapters before its weights load. BitFit and norm-only switch
`requires_grad` off for every other backbone parameter; LoRA injects low-rank adapters (the `peft` library) and
leaves only them requiring grad. The param-group rule (`finetune.models.param_groups`) takes only parameters that
require grad, so the others are in no optimizer group: they never change (no weight decay moves them either), and
autograd computes no gradient for them. Which stages train when stays the strategy's (`finetune.finetuning`): a
frozen stage runs under no_grad whatever its parameters require. BatchNorm statistics are buffers, not parameters:
`strategy.bn` decides them (`eval`, the default, keeps the source's under every method).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Sequence

from torch import nn

from finetune.errors import ConfigError
from finetune.models.backbones import Backbone

# torch's normalisation layers (BatchNorm and InstanceNorm derive from _NormBase) and their subclasses, e.g. timm's
# BatchNormAct2d and LayerNorm2d
NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)


def _train_only(backbone: Backbone, chosen: set[str], method: str, what: str) -> Backbone:
    """`backbone` with only the parameters named in `chosen` requiring grad."""
    if not chosen:
        raise ConfigError(f"peft={method}: the backbone has no {what}, so nothing of it would train; use peft=lora")
    for name, parameter in backbone.named_parameters():
        parameter.requires_grad_(name in chosen)
    return backbone


def bitfit(backbone: Backbone) -> Backbone:
    """BitFit (Ben Zaken et al. 2022): of the backbone only the biases train. In a BatchNorm CNN, whose
    convolutions have none, these are the BatchNorm shifts (and the biases of any linear layer)."""
    biases = {name for name, _ in backbone.named_parameters() if name.rpartition(".")[2] == "bias"}
    return _train_only(backbone, biases, "bitfit", "biases")


def norm_only(backbone: Backbone) -> Backbone:
    """Of the backbone only the normalisation layers' weights and biases train (`NORMS`; in a BatchNorm CNN its
    scales and shifts, as in Frankle et al. 2021, "Training BatchNorm and Only BatchNorm")."""
    norms = {
        f"{module_name}.{name}"
        for module_name, module in backbone.named_modules()
        if isinstance(module, NORMS)
        for name, _ in module.named_parameters(recurse=False)
    }
    return _train_only(backbone, norms, "norm_only", "normalisation layers with weights")


def lora_targets(backbone: nn.Module, targets: Sequence[str] | None = None) -> list[str]:
    """The names of the layers LoRA adapts: every dense convolution (1x1 and k x k, groups 1) and linear layer, or
    those of them that an entry of `targets` (`peft.target_modules`) names (the layer's name or its last parts, as peft matches:
    `conv_pw`, `layer4.0.conv1`). Depthwise and grouped convolutions are never targets: peft cannot merge them."""
    dense = [
        name
        for name, module in backbone.named_modules()
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)
    ]
    if targets is None:
        return dense

    named = {target: {name for name in dense if name == target or name.endswith(f".{target}")} for target in targets}
    if unmatched := [target for target, names in named.items() if not names]:
        kinds = sorted({name.rpartition(".")[2] for name in dense})
        raise ConfigError(
            f"peft.target_modules: {', '.join(unmatched)} names no dense convolution or linear layer of the backbone "
            f"(depthwise and grouped convolutions are left out: LoRA on them cannot be merged). Its layers end in: "
            f"{', '.join(kinds)}; or peft.target_modules=null for all of them"
        )
    chosen = set().union(*named.values())
    return [name for name in dense if name in chosen]


def lora(
    backbone: Backbone,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    target_modules: Sequence[str] | None = None,
) -> Backbone:
    """LoRA (Hu et al. 2022) with the `peft` library: beside each target layer W (`lora_targets`) a low-rank update
    alpha/r x B A of rank `r`, its input dropped out with probability `dropout` in training; B starts at 0, so the
    model starts as the source. Only A and B train; W and every other backbone parameter never change."""
    from peft import LoraConfig, inject_adapter_in_model  # imports transformers: seconds, only when used

    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=lora_targets(backbone, target_modules)
    )
    inject_adapter_in_model(config, backbone)  # in place; marks everything but the adapters requires_grad=False
    return backbone


def merged(network: nn.Module) -> nn.Module:
    """A copy of `network` with every LoRA update merged into the layer it adapts (W + alpha/r B A) and the adapter
    replaced by that layer: the original layer types and the same outputs, so it exports as any network does.
    `network` itself when it holds no adapter."""
    if "peft" not in sys.modules:  # no adapter exists before peft is imported
        return network
    from peft.tuners.lora import LoraLayer

    if not any(isinstance(module, LoraLayer) for module in network.modules()):
        return network
    network = copy.deepcopy(network)
    for name, layer in [(n, m) for n, m in network.named_modules() if isinstance(m, LoraLayer)]:
        layer.merge(safe_merge=True)  # refuses an update that is not finite
        parent, _, attribute = name.rpartition(".")
        setattr(network.get_submodule(parent), attribute, layer.get_base_layer())
    return network

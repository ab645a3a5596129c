"""BatchNorm folded into the convolution before it, for a network that only runs in eval mode.

In eval mode a BatchNorm is a per-channel affine map, so it merges into the preceding convolution's
weights and bias; the network then skips a full pass over every activation. The feature cache uses
this to run a frozen backbone over a dataset (BENCHMARKS.md, feature cache).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1 / torch.sqrt(bn.running_var + bn.eps)
    shift = (bn.bias if bn.affine else 0) - bn.running_mean * scale
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1), requires_grad=False)
    conv.bias = nn.Parameter(bias * scale + shift, requires_grad=False)


def _replacement(bn: nn.BatchNorm2d) -> nn.Module | None:
    """What is left of `bn` once folded: nothing, or the activation of timm's BatchNormAct2d."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    if hasattr(bn, "act") and hasattr(bn, "drop") and type(bn).__name__ == "BatchNormAct2d":
        return nn.Sequential(bn.drop, bn.act)
    return None  # an unknown subclass may do more than normalise: left as it is


def fold_batchnorm(module: nn.Module, example: torch.Tensor, atol: float = 1e-4) -> nn.Module:
    """An eval-mode copy of `module` in which every BatchNorm fed directly by a convolution is folded into it.

    Which BatchNorm reads which convolution's output is found by running `example` through the copy. The
    folded copy must give the same output on `example` (within `atol` of its largest value); otherwise
    (a convolution's output also used elsewhere, say) an unfolded eval-mode copy is returned.
    """
    model = copy.deepcopy(module).eval()
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # id of a conv output -> (conv name, output kept alive)
    pairs: list[tuple[str, str]] = []  # (conv name, BatchNorm name)

    def record(name: str) -> Callable[..., None]:
        def hook(conv: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            outputs[id(output)] = (name, output)

        return hook

    def match(name: str) -> Callable[..., None]:
        def hook(bn: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            if (source := outputs.pop(id(inputs[0]), None)) is not None:
                pairs.append((source[0], name))

        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    hooks += [
        m.register_forward_pre_hook(match(n))
        for n, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d) and _replacement(m) is not None
    ]
    with torch.no_grad():
        reference = model(example)
        for hook in hooks:
            hook.remove()
        outputs.clear()
        for conv_name, bn_name in pairs:
            bn = model.get_submodule(bn_name)
            _fold_into(model.get_submodule(conv_name), bn)
            parent, _, attribute = bn_name.rpartition(".")
            setattr(model.get_submodule(parent), attribute, _replacement(bn))
        output = model(example)
    if not torch.allclose(output, reference, rtol=0, atol=atol * float(reference.abs().max().clamp(min=1))):
        return copy.deepcopy(module).eval()
    return model

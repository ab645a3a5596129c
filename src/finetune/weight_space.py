"""What the tasks that average weights share (`wise_ft.py`, `soup.py`): which checkpoints may be averaged, the
average, its score on a split, and the stand-alone checkpoint it is written as.

Weights average into a working network only between checkpoints that share their start (Wortsman et al. 2022,
"Model soups": fine-tuned from one initialisation): the same backbone and weights, classes and input, and the same
data splits to choose on (`start`). The average covers the network's floating-point tensors, BatchNorm's running
statistics included: they are averaged as the weights are (exact for one checkpoint, an approximation between
several: the statistics of an averaged network are not the average of theirs; with the default
`strategy.bn=eval` they are the source's in every checkpoint and stay so). Integer tensors (BatchNorm's
`num_batches_tracked`, a count) and tensors outside the network (a loss term's buffers, used in training only)
have no average: they come from the first checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from finetune.checkpoint import RUN_SETTINGS, AtomicCheckpointIO, standalone
from finetune.errors import ConfigError
from finetune.eval import gather_logits
from finetune.models.module import FineTuneModule

# The state dict's entries of the network (`FineTuneModule.network`); the others train only
NETWORK = ("backbone.", "head.")
# Data settings that change how training batches are drawn, not which images are in which split
TRAINING_DATA_KEYS = {
    "batch_size", "num_workers", "pin_memory", "persistent_workers", "drop_last", "min_steps_per_epoch", "augment",
    "random_erasing", "mixup", "cutmix", "sampler", "augment_on", "store_dir", "checked_dir",
}  # fmt: skip
SPEED_MODEL_KEYS = {"sync_batchnorm", "channels_last", "compile"}  # model settings of speed, not of the weights


def start(checkpoint: Mapping[str, Any], source: str | os.PathLike) -> dict[str, Any]:
    """What checkpoints must share for their weights to be averaged, by dotted key: the classes, the input, the
    model settings (backbone, weights, head init), `strategy.pretrained`, the data splits and the network's tensor
    shapes. Training settings (optimizer, schedule, strategy, augmentation, epochs) may differ."""
    settings = checkpoint.get(RUN_SETTINGS)
    if settings is None:
        raise ConfigError(f"{source} holds no run settings (an older version wrote it): train the run again")
    if any(".lora_" in key for key in checkpoint["state_dict"]):
        raise ConfigError(
            f"{source} holds LoRA adapters (peft=lora): the average of their factors A and B is not the average of "
            "their updates B A, so their weights are not averaged here; runs of peft=none, bitfit or norm_only are"
        )
    model = {key: value for key, value in settings["model"].items() if key not in SPEED_MODEL_KEYS}
    data = {key: value for key, value in settings["data"].items() if key not in TRAINING_DATA_KEYS}
    hyper_parameters = checkpoint["hyper_parameters"]
    shared = _dotted(
        {
            "classes": hyper_parameters["classes"],
            "input_config": hyper_parameters["input_config"],
            "model": model,
            "strategy": {"pretrained": settings["strategy"]["pretrained"]},
            "data": data,
        }
    )
    network = checkpoint["state_dict"].items()
    return shared | {f"shape of {key}": list(value.shape) for key, value in network if key.startswith(NETWORK)}


def _dotted(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as one level, `{"a": {"b": 1}}` as `{"a.b": 1}`."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat |= _dotted(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differences(first: Mapping[str, Any], second: Mapping[str, Any], limit: int = 3) -> str:
    """The settings of two `start`s that differ (the first `limit`), as `key: value vs value`; "" if none."""
    absent = object()
    keys = [k for k in dict.fromkeys([*first, *second]) if first.get(k, absent) != second.get(k, absent)]
    shown = [f"{key}: {first.get(key, 'absent')} vs {second.get(key, 'absent')}" for key in keys[:limit]]
    return "; ".join(shown + ([f"and {len(keys) - limit} more"] if len(keys) > limit else []))


def average(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """sum_i weights[i] * states[i] over the network's floating-point tensors (accumulated in float64, so a weight
    of 1 and the others 0 give that state exactly); the rest from `states[0]` (see the module's docstring)."""
    averaged = dict(states[0])
    for key, value in states[0].items():
        if key.startswith(NETWORK) and value.is_floating_point():
            total = sum(weight * state[key].double() for weight, state in zip(weights, states, strict=True))
            averaged[key] = total.to(value.dtype)
    return averaged


@dataclass(frozen=True)
class Score:
    acc: float
    loss: float  # plain cross-entropy of the logits: breaks ties of accuracy

    def key(self) -> tuple[float, float]:
        """Higher is better."""
        return self.acc, -self.loss


def score(
    model: FineTuneModule, state: Mapping[str, torch.Tensor], loader: DataLoader, device: torch.device, split: str
) -> Score:
    """The accuracy and loss of `model` with the network's tensors of `state` on `loader`'s images (the rest, which
    trains only, stays the model's: runs of one start may differ in their loss terms)."""
    model.load_state_dict(model.state_dict() | {key: value for key, value in state.items() if key.startswith(NETWORK)})
    logits, labels = gather_logits(model, loader, device, "none", split)
    if labels.ndim != 1:  # multi-hot targets
        raise ConfigError("wise_ft.py and soup.py choose by single-label accuracy: a multi-label run's are not taken")
    return Score(float((logits.argmax(dim=1) == labels).float().mean()), float(F.cross_entropy(logits, labels)))


def write_checkpoint(
    template: Mapping[str, Any], state: Mapping[str, torch.Tensor], record: Mapping[str, Any], path: Path
) -> Path:
    """A stand-alone checkpoint of `template`'s model and run settings with the weights `state`, and the entries of
    `record` (plain values: how the weights were made); the temperature back to 1 (one fitted to `template`'s weights
    does not carry over: `eval.py eval.calibrate=true` fits one to these)."""
    checkpoint = standalone(dict(template)) | {"state_dict": dict(state), **record}
    checkpoint["hyper_parameters"] = {**template["hyper_parameters"], "temperature": 1.0}
    AtomicCheckpointIO().save_checkpoint(checkpoint, path)
    return path

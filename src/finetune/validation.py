"""Config rules, checked before any work starts (nothing downloaded, no model built).

Each rule lives here and only here; rules that need the data (a batch larger than the training set)
are checked by the DataModule's `setup`. Every value is read where users set it, so each message names
the key to change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from omegaconf import DictConfig, OmegaConf

from finetune.data.store import normalization_blocker
from finetune.data.transforms import AUGMENTATIONS
from finetune.errors import ConfigError
from finetune.models.losses import BCEWithLogits, CrossEntropy
from finetune.models.tasks import MultiLabel
from finetune.run_status import command_line

log = logging.getLogger(__name__)

# Every backbone here (ResNet, MobileNetV2, EfficientNet) shrinks its input 32x: below 32 px the last
# stage sees less than one pixel.
MIN_IMAGE_SIZE = 32
POSITIVE = (
    "optimizer.lr",
    "strategy.head_lr_mult",
    "strategy.backbone_lr_mult",
    "strategy.layer_decay",
    "peft.alpha",
)
NON_NEGATIVE = (
    "optimizer.weight_decay",
    "trainer.gradient_clip_val",
    "regularizer.alpha",
    "regularizer.beta",
    "regularizer.eta",
    "regularizer.trade_off",
)
# Integer keys: their least value, and the word they take besides numbers (None: no word)
INTEGERS = {
    "data.batch_size": (1, None),
    "trainer.max_epochs": (1, None),
    "data.num_workers": (0, "auto"),
    "data.shots": (1, None),
    "data.min_steps_per_epoch": (0, None),
    "trainer.accumulate_grad_batches": (1, None),
    "strategy.trainable": (0, "all"),
    "strategy.unfreeze_step": (1, "all"),
    "peft.r": (1, None),
    "regularizer.k": (1, None),
    "regularizer.source_classes": (1, None),
    "seed": (0, None),
}
# What to do instead, after a key's message
HINTS = {
    "trainer.max_epochs": "0 epochs train nothing; to test a checkpoint without training: python eval.py ckpt_path=..."
}
BOOLEANS = (
    "validate_first",
    "strategy.pretrained",
    "model.channels_last",
    "model.compile",
    "callbacks.feature_cache.enabled",
    "callbacks.ema.enabled",
    "callbacks.early_stopping.enabled",
)
# Keys that take one of a few words
CHOICES = {
    "strategy.bn": ("train", "eval"),
    "model.head_init": ("default", "source"),
    "data.sampler": ("shuffle", "balanced"),
    "data.augment_on": ("auto", "device", "workers"),
    # Lightning's precisions (`16`, `32`, `bf16` are its aliases)
    "trainer.precision": ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", 16, 32, 64, "bf16"),
}
# What the values a command must give (??? in conf/) look like, for the example command of their error
EXAMPLES = {"data.root": "/path/to/images", "ckpt_path": "logs/train/runs/<timestamp>/checkpoints/last.ckpt"}


def number(value: object) -> bool:
    """An int or float (a bool is neither here, though Python says so)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _type_problems(cfg: DictConfig) -> Iterator[str]:
    """Numbers where numbers belong (a word there stopped the run with a TypeError), integers with their least
    value, booleans, and `strategy.unfreeze_at` as a list of epochs."""
    for key, (least, word) in INTEGERS.items():
        value = OmegaConf.select(cfg, key)
        if (
            value is None
            or value == word
            or (isinstance(value, int) and not isinstance(value, bool) and value >= least)
        ):
            continue
        also = f" or {word}" if word else ""
        hint = f": {HINTS[key]}" if key in HINTS else ""
        yield f"{key}={value} must be an integer >= {least}{also}{hint}"
    for key in NON_NEGATIVE:
        if (value := OmegaConf.select(cfg, key)) is not None and not (number(value) and value >= 0):
            yield f"{key}={value} must be a number >= 0"
    for key in BOOLEANS:
        if (value := OmegaConf.select(cfg, key)) is not None and not isinstance(value, bool):
            yield f"{key}={value} must be true or false"
    epochs = OmegaConf.select(cfg, "strategy.unfreeze_at")
    if epochs is not None and not (
        OmegaConf.is_list(epochs) and all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in epochs)
    ):
        yield f"strategy.unfreeze_at={epochs} must be a list of epochs >= 0, e.g. strategy.unfreeze_at=[1]"


def _late_unfreezing(cfg: DictConfig) -> str | None:
    epochs = OmegaConf.select(cfg, "strategy.unfreeze_at")
    epochs = list(epochs) if OmegaConf.is_list(epochs) else []
    max_epochs = OmegaConf.select(cfg, "trainer.max_epochs")
    late = [e for e in epochs if max_epochs is not None and 0 <= max_epochs <= e]
    if not late:
        return None
    return (
        f"strategy.unfreeze_at={epochs} with trainer.max_epochs={max_epochs} (epochs count from 0): the stages "
        f"unfrozen at epoch {late} never train"
    )


def _augmentation_problems(cfg: DictConfig) -> Iterator[str]:
    augment = OmegaConf.select(cfg, "data.augment")
    if augment is not None and not isinstance(augment, bool) and augment not in AUGMENTATIONS:  # true/false: d2l/none
        yield f"data.augment={augment} must be one of {', '.join(AUGMENTATIONS)}"
    erasing = OmegaConf.select(cfg, "data.random_erasing")
    if erasing is not None and not (number(erasing) and 0 <= erasing <= 1):
        yield f"data.random_erasing={erasing} must be a probability in [0, 1] (0 = off)"
    alphas = {key: OmegaConf.select(cfg, key) for key in ("data.mixup", "data.cutmix")}
    yield from (
        f"{key}={alpha} must be >= 0 (0 = off)"
        for key, alpha in alphas.items()
        if alpha is not None and not (number(alpha) and alpha >= 0)
    )
    mixing = [f"{key}={alpha}" for key, alpha in alphas.items() if number(alpha) and alpha > 0]
    if mixing and OmegaConf.select(cfg, "callbacks.feature_cache.enabled"):
        yield (
            f"{' and '.join(mixing)}: MixUp and CutMix mix images, but callbacks.feature_cache.enabled=true trains on cached features: "
            "set the mix to 0 or callbacks.feature_cache.enabled=false"
        )


def _store_problems(cfg: DictConfig) -> Iterator[str]:
    """The decoded store: a positive `data.store_size`; `data.augment_on=device` only where the normalisation can
    move to the device."""
    size = OmegaConf.select(cfg, "data.store_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        yield f"data.store_size={size} must be a side in pixels >= 1 (null = the eval transform's resize)"
    if OmegaConf.select(cfg, "data.augment_on") != "device":
        return
    mixes = bool(OmegaConf.select(cfg, "data.mixup") or OmegaConf.select(cfg, "data.cutmix"))
    if blocker := normalization_blocker(OmegaConf.select(cfg, "data.random_erasing") or 0, mixes):
        yield blocker


def _fold_problems(cfg: DictConfig) -> Iterator[str]:
    """Cross-validation: `data.folds` null (off) or an integer >= 2, `data.fold` one of its folds."""
    folds, fold = OmegaConf.select(cfg, "data.folds"), OmegaConf.select(cfg, "data.fold")
    if folds is None:
        if fold not in (None, 0):
            yield f"data.fold={fold} needs data.folds, the number of folds (e.g. data.folds=5 data.fold={fold})"
    elif isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        yield f"data.folds={folds} must be an integer >= 2 (null = no cross-validation)"
    elif isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < folds:
        yield f"data.fold={fold} must be one of 0..{folds - 1} (data.folds={folds}; folds count from 0)"


def _source_problems(cfg: DictConfig, method: str, needs: str, instead: str) -> Iterator[str]:
    """A method that acts on the pretrained backbone (`method`: `regularizer=l2sp`, `peft=lora`) needs pretrained
    weights and a strategy that trains the backbone at some epoch; `needs`: what it does, `instead`: what to use."""
    strategy = OmegaConf.select(cfg, "strategy.name")
    if OmegaConf.select(cfg, "strategy.pretrained") is False:
        yield (
            f"{method} {needs}, but strategy.pretrained=false (strategy={strategy}) starts from a random init: use "
            f"{instead}, or a strategy that fine-tunes the pretrained backbone (freeze_unfreeze, finetune, gradual, llrd)"
        )
    elif OmegaConf.select(cfg, "strategy.trainable") == 0 and not OmegaConf.select(cfg, "strategy.unfreeze_at"):
        yield (
            f"{method} {needs}, but strategy={strategy} never trains the backbone (strategy.trainable=0 and no "
            f"strategy.unfreeze_at): use {instead}, or strategy=freeze_unfreeze (the default: the head alone first, "
            "then the backbone) or strategy=finetune"
        )


def _regularizer_problems(cfg: DictConfig) -> Iterator[str]:
    """A regulariser toward the source needs a source to stay near, and a name of its own among the loss terms."""
    name = OmegaConf.select(cfg, "regularizer.name")
    if name in (None, "none"):
        return
    yield from _source_problems(
        cfg, f"regularizer={name}", "keeps the fine-tuned backbone near the pretrained source", "regularizer=none"
    )
    if name in (OmegaConf.select(cfg, "loss_terms") or {}):
        yield f"regularizer={name} and loss_terms.{name}: two loss terms of one name; rename the loss_terms entry"


def _peft_problems(cfg: DictConfig) -> Iterator[str]:
    """A peft method trains a few parameters of the pretrained backbone; LoRA's dropout is a probability."""
    target = OmegaConf.select(cfg, "peft._target_")
    if target is None:  # peft=none
        return
    name = target.rpartition(".")[2]
    yield from _source_problems(
        cfg,
        f"peft={name}",
        "trains a few parameters of the pretrained backbone",
        "peft=none",
    )
    dropout = OmegaConf.select(cfg, "peft.dropout")
    if dropout is not None and not (number(dropout) and 0 <= dropout < 1):
        yield f"peft.dropout={dropout} must be in [0, 1) (0 = off)"


def _name(kind: type) -> str:
    return f"{kind.__module__}.{kind.__name__}"


def _multilabel_problems(cfg: DictConfig) -> Iterator[str]:
    """Multi-label data, task and loss go together (data=multilabel chooses the other two), and what mixes or draws
    by a single class is for single-label data: MixUp/CutMix (torchvision's take class indices, and a CutMix patch
    can cut a labelled object out of the image) and the class-balanced sampler."""
    multilabel = OmegaConf.select(cfg, "task._target_") == _name(MultiLabel)
    data = OmegaConf.select(cfg, "data._target_") == "finetune.data.MultiLabelDataModule"
    loss = OmegaConf.select(cfg, "loss._target_")
    if data != multilabel:
        yield (
            "data=multilabel trains with task=multilabel (data=multilabel chooses it): leave out task=..."
            if data
            else "task=multilabel needs multi-label data: data=multilabel data.root=DIR (train.csv, test.csv)"
        )
    if multilabel and loss == _name(CrossEntropy):
        yield "loss=default (cross-entropy) is for one class per image: data=multilabel trains with loss=multilabel"
    if not multilabel and loss == _name(BCEWithLogits):
        yield "loss=multilabel takes multi-hot targets (data=multilabel): single-label data trains with loss=default"
    if not multilabel:
        return
    mixing = [key for key in ("data.mixup", "data.cutmix") if OmegaConf.select(cfg, key)]
    if mixing:
        yield f"{' and '.join(mixing)} mix single-label images, not multi-label ones: set them to 0 with data=multilabel"
    if OmegaConf.select(cfg, "data.sampler") == "balanced":
        yield "data.sampler=balanced draws by an image's one class: with data=multilabel use loss.class_weights=balanced"


def _missing(value: object, key: str = "") -> Iterator[str]:
    """The keys whose value is `???` in a plain container (OmegaConf.missing_keys resolves every interpolation)."""
    if isinstance(value, dict):
        for name, item in value.items():
            yield from _missing(item, f"{key}.{name}" if key else str(name))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _missing(item, f"{key}[{index}]")
    elif value == "???":
        yield key


def missing_values(cfg: DictConfig) -> list[str]:
    """Every value the command line must give (`???` in the config), with a command that gives it."""
    problems = []
    for key in _missing(OmegaConf.to_container(cfg, resolve=False)):
        if key.split(".")[0] != "hydra":
            example = command_line(f"{key}={EXAMPLES.get(key, '<value>')}")
            problems.append(f"{key} is not set (??? in the config): add it, e.g. {example}")
    return problems


def config_problems(cfg: DictConfig) -> list[str]:
    """Everything wrong with a composed train config, one line each."""
    problems = missing_values(cfg) + [
        f"{key}={value} must be > 0"
        for key in POSITIVE
        if (value := OmegaConf.select(cfg, key)) is not None and not (number(value) and value > 0)
    ]
    problems += _type_problems(cfg)
    problems += [
        f"{key}={value} must be one of {', '.join(map(str, valid))}"
        for key, valid in CHOICES.items()
        if (value := OmegaConf.select(cfg, key)) is not None and value not in valid
    ]
    smoothing = OmegaConf.select(cfg, "loss.label_smoothing")
    if smoothing is not None and not (number(smoothing) and 0 <= smoothing < 1):
        problems.append(f"loss.label_smoothing={smoothing} must be in [0, 1)")
    image_size = OmegaConf.select(cfg, "data.image_size")
    if image_size is not None and not (isinstance(image_size, int) and image_size >= MIN_IMAGE_SIZE):
        problems.append(
            f"data.image_size={image_size} must be an integer >= {MIN_IMAGE_SIZE} (pixels): the backbones shrink "
            f"images {MIN_IMAGE_SIZE}x"
        )
    val_fraction = OmegaConf.select(cfg, "data.val_fraction")
    if val_fraction is not None and not (number(val_fraction) and 0 <= val_fraction < 1):
        problems.append(f"data.val_fraction={val_fraction} must be in [0, 1) (0 = validate on the test split)")
    problems += _augmentation_problems(cfg)
    problems += _store_problems(cfg)
    problems += _fold_problems(cfg)
    problems += _multilabel_problems(cfg)
    problems += _regularizer_problems(cfg)
    problems += _peft_problems(cfg)
    return problems


def validate(cfg: DictConfig, rules: Callable[[DictConfig], list[str]] = config_problems) -> None:
    """Raises one ConfigError that lists every problem of the config (`missing_values` for eval.py's)."""
    if problems := rules(cfg):
        raise ConfigError("Invalid config:\n  " + "\n  ".join(problems))
    if late := _late_unfreezing(cfg):  # a warning: a short run of the default strategy trains the head alone
        log.warning(late)
